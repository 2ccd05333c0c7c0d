"""The device check a lent GPU runs: every Triton path against float64, torch.compile, then timings.

    python tools/gpu_check.py [--budget-s 420] [--out DIR] [--only PHASE ...]
    python tools/gpu_check.py --dry-run        (the same sequence at tiny sizes, CPU, TRITON_INTERPRET=1)

Installs nothing and needs no C++ extension: the ops' Triton paths and float64 references are
Python and Triton (an uninstalled checkout works: kernels/ is mapped to pykd.kernels).

Order (the plan is printed first, each step with its predicted duration on an H100):
  1. correctness: relation (kl, ce, mse_prob, mse_logit; ragged masks with NaN under the padding,
     self-relations, odd and long lengths up to 4096, head sizes 32 to 256; fp32, bf16, fp16), MI
     (every bound; alpha at 10-80 nat separations against tests/ops/mi_exact.py's 90-digit evaluation;
     n up to 16384 against float64 and n = 65536 checked for consistency, since its float64
     reference would need ~15 n x n float64 matrices), routed (layer- and neuron-wise, E = 2 and 4,
     with and without bias; fp32, bf16, fp16), vocab KD (BERT's V = 30522; kl with a projected
     teacher at N = 4096, d_s 384, d_t 768; jsd with dense teacher logits at d_s 768; reverse KL with
     a spread top-k teacher at an odd N; hard labels at T = 2, ignored rows; fp32, bf16);
  2. torch.compile(fullgraph=True) of a step that uses all three ops, against eager;
  3. timings, most informative first (tools/gpu_roofline.py TIMING_CASES): each op's fwd+bwd
     against its anchor (SDPA flash, three cuBLAS GEMMs, dense F.linear, the peers' KD step, the
     four cuBLAS GEMMs of the vocabulary loss's materialised logits and gradients), the
     median of triton.testing.do_bench (host overhead included) and of do_bench_cudagraph (kernels
     only), with the roofline's predictions beside them.
A step that does not fit the rest of --budget-s (predicted) is skipped and recorded as such; a
step that fails or raises is recorded and the run goes on (after a CUDA error that poisons the
context, the remaining GPU steps are recorded as not run). The JSON is rewritten after every step
(bench/results/gpu_check_<device>.json, the Markdown table beside it), so a timeout keeps what ran.

Tolerances (each check records its error and bound): relation and routed use the tests' relative
bounds (tests/ops/test_attention_relation.py: loss 1e-5, gradients 1e-4 fp32, 5e-3 fp16, 2e-2 bf16;
tests/ops/test_routed_linear.py: 1e-5, 5e-3, 2e-2) or twice the rounding of the exact result to the
output dtype, or Higham's gamma_n growth for the longer sums at these sizes, whichever is larger;
MI at moderate scores uses tests/ops/test_mi_bound.py's (value 1e-5, gradients 2e-4 fp32 / 5e-3 / 2e-2)
with the same growth; MI at confident critics uses tests/ops/mi_exact.py's exact_errors bounds. Vocab KD
(against pykd.vocab_kd_loss_reference in float64 on the same exactly representable inputs) uses the
relation bounds with the growth of its vocabulary-long sums and width-long dots, gamma(V + d_s + d_t):
bf16's 2e-2 covers G rounded to bf16 (2^-8) before the gradient dots.
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

STARTED = time.perf_counter()  # the budget counts the imports too
ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels are defined at import

import torch  # noqa: E402

# tests is a package (its helpers are imported as tests.<module>), so the checkout root goes on the path
sys.path[:0] = [str(ROOT / "tools"), str(ROOT), str(ROOT / "bench")]
import gpu_roofline  # noqa: E402
from tests.fp_bounds import UNIT_ROUNDOFF, gamma  # noqa: E402


def import_pykd():
    """pykd, from the installed package or from this checkout (kernels/ then serves as pykd.kernels)."""
    try:
        import pykd.kernels.configs
    except ModuleNotFoundError:
        import importlib.util

        for name in [name for name in sys.modules if name == "pykd" or name.startswith("pykd.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location("pykd", ROOT / "pykd" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "pykd"), str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["pykd"] = module
        spec.loader.exec_module(module)
    import pykd

    return pykd


pykd = import_pykd()
from tests.ops.relation_cases import reference_loss_and_grads, relation_inputs, students, token_mask  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSSES = ("kl", "ce", "mse_prob", "mse_logit")
RELATION_TOL = {"fp32": (1e-5, 1e-4), "fp16": (1e-5, 5e-3), "bf16": (1e-5, 2e-2)}
MI_GRAD_TOL = {"fp32": 2e-4, "fp16": 5e-3, "bf16": 2e-2}
ROUTED_TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}
VOCAB_TOL = {"fp32": (1e-5, 1e-4), "bf16": (1e-5, 2e-2)}
MI_BOUNDS = [("infonce", 0.9, False), ("nwj", 0.9, False), ("js", 0.9, False), ("tuba", 0.9, True),
             ("alpha", 0.0, True), ("alpha", 0.5, True), ("alpha", 0.9, True), ("alpha", 1.0, False)]
COMPILE_S = 1.0       # predicted seconds to compile one new Triton kernel variant on the device's host
STARTUP_S = 15.0      # imports, CUDA context, the first allocations
INDUCTOR_S = 45.0     # torch.compile of the three-op step (inductor, cold cache)


@dataclass(frozen=True)
class Sizes:
    """The shapes of a run: the real one, or the dry run's tiny ones (same sequence)."""

    relation: tuple = (4, 256, 768, 384, 12)       # (B, L, D_t, D_s, relation heads): d_t 64, d_s 32
    relation_odd: tuple = (3, 211, 768, 768, 12)
    relation_long: tuple = (2, 4096, 768, 768, 12)
    relation_wide: tuple = ((2, 512, 1536, 1536, 12), (2, 512, 768, 768, 3))  # head sizes 128 and 256
    mi_n: int = 4097
    mi_embed: int = 128
    mi_reference_n: int = 16384
    mi_huge_n: int = 65536
    mi_confident_n: int = 37
    routed: tuple = (300, 200, 333, 400, 256)     # (tokens, d, f, F_max, D_max)
    compile_relation: tuple = (2, 128, 384, 384, 12)
    compile_mi: tuple = (256, 64)
    compile_routed: tuple = (256, 384, 1536)
    vocab: tuple = (4096, 30522, 384, 768)         # (N, V, d_s, d_t): BERT's vocabulary
    vocab_logits: tuple = (1024, 30522, 768, 0)    # a dense teacher: no d_t
    vocab_topk: tuple = (511, 30522, 384, 0)       # a spread top-k teacher, an odd N
    vocab_k: int = 64


DRY = Sizes(relation=(2, 24, 32, 16, 2), relation_odd=(2, 21, 32, 32, 2), relation_long=(1, 48, 16, 16, 1),
            relation_wide=((1, 20, 256, 256, 2), (1, 20, 256, 256, 1)), mi_n=37, mi_embed=16, mi_reference_n=64,
            mi_huge_n=96, mi_confident_n=12, routed=(21, 23, 33, 41, 29), compile_relation=(2, 16, 16, 16, 2),
            compile_mi=(24, 8), compile_routed=(20, 16, 24), vocab=(21, 37, 16, 24), vocab_logits=(19, 41, 24, 0),
            vocab_topk=(17, 39, 16, 0), vocab_k=5)


def dry_case(case: gpu_roofline.Case) -> gpu_roofline.Case:
    """A timing case shrunk to interpreter size (same op, dtype and anchor)."""
    params = {"relation": lambda p: (1, 2, 16, 32), "mi": lambda p: (48, 16),
              "routed": lambda p: (32, 24, 40, p[3], p[4]), "kd": lambda p: (2, 16),
              "vocab": lambda p: (24, 40, 16, 32)}[case.op](case.params)
    return gpu_roofline.Case(case.op, params, case.dtype, case.anchor, case.priority, case.target)


# ---- the run: steps, budget, incremental records ----

@dataclass
class Step:
    name: str
    phase: str            # "correctness", "compile", "timing"
    predicted_s: float    # on an H100 (the real sizes)
    run: object           # () -> list of result rows (dicts; "pass": False marks a failed check)


@dataclass
class Run:
    device: str
    dry: bool
    budget_s: float
    out: Path
    slug: str
    started: float = STARTED
    record: dict = field(default_factory=dict)
    cuda_lost: str = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        """Rewrites the JSON and the Markdown (a write to a temporary name, then a rename)."""
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        for suffix, text in (("json", json.dumps(self.record, indent=1, default=str)), ("md", markdown(self.record))):
            path = self.out / f"gpu_check_{self.slug}.{suffix}"
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)


def device_slug(dry: bool) -> str:
    if dry:
        return "cpu_dry_run"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def run_step(step: Step, run: Run) -> dict:
    entry = {"step": step.name, "phase": step.phase, "predicted_s": round(step.predicted_s, 1)}
    left = run.budget_s - run.elapsed()
    if run.cuda_lost:
        return dict(entry, status="not run", reason=f"the CUDA context was lost in {run.cuda_lost}")
    if not run.dry and step.predicted_s > left:
        return dict(entry, status="skipped", reason=f"does not fit: predicted {step.predicted_s:.0f} s, "
                                                    f"{max(left, 0):.0f} s of the budget left")
    if run.dry and left <= 0:
        return dict(entry, status="skipped", reason="the budget is spent")
    begin = time.perf_counter()
    try:
        rows = step.run()
        failed = [r for r in rows if r.get("pass") is False]
        entry.update(status="fail" if failed else "ok", rows=rows)
    except torch.cuda.OutOfMemoryError as error:
        entry.update(status="error", error=f"out of memory: {error}")
        torch.cuda.empty_cache()
    except Exception as error:  # noqa: BLE001 - one failure must not lose the rest of the run
        entry.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        if not run.dry and ("CUDA error" in str(error) or "illegal" in str(error)):
            run.cuda_lost = step.name
    entry["seconds"] = round(time.perf_counter() - begin, 2)
    return entry


def execute(steps: list[Step], run: Run) -> dict:
    run.record.update(plan=[{"step": s.name, "phase": s.phase, "predicted_s": round(s.predicted_s, 1)} for s in steps],
                      predicted_total_s=round(STARTUP_S + sum(s.predicted_s for s in steps), 1), steps=[])
    print_plan(steps, run)
    for step in steps:
        entry = run_step(step, run)
        run.record["steps"].append(entry)
        run.save()
        detail = entry.get("reason") or entry.get("error", "")
        print(f"[{run.elapsed():6.1f} s] {entry['status']:8s} {step.name} {detail}", flush=True)
        for row in entry.get("rows", []):
            print("           " + json.dumps({k: v for k, v in row.items() if k != "params"}, default=str), flush=True)
    statuses = [e["status"] for e in run.record["steps"]]
    run.record["summary"] = {status: statuses.count(status) for status in sorted(set(statuses))}
    run.save()
    return run.record


def print_plan(steps: list[Step], run: Run) -> None:
    print(f"gpu_check on {run.device}: {len(steps)} steps, budget {run.budget_s:.0f} s; predicted on an H100: "
          f"{run.record['predicted_total_s']:.0f} s (startup {STARTUP_S:.0f} s, a new kernel variant "
          f"{COMPILE_S:.0f} s to compile)")
    total = STARTUP_S
    for step in steps:
        total += step.predicted_s
        fits = "" if total <= run.budget_s else "   (past the budget: skipped unless earlier steps run faster)"
        print(f"  {step.phase:11s} {step.predicted_s:6.1f} s  (at {total:6.1f} s)  {step.name}{fits}")
    sys.stdout.flush()


# ---- correctness ----

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def reference_too_big(device, matrices: int, elements: int) -> str:
    """Why a float64 reference holding `matrices` float64 arrays of `elements` would not fit in the
    GPU's free memory (empty when it fits, and always on CPU)."""
    if device == "cpu":
        return ""
    free, _ = torch.cuda.mem_get_info()
    needed = matrices * 8 * elements
    return "" if needed < 0.8 * free else f"its float64 reference needs ~{needed / 2**30:.0f} GiB"


def relation_check(device, dtype: str, loss: str, shape: tuple, mask_kind: str = "ragged", relation: str = "qk",
                   nan_padding: bool = True) -> dict:
    batch, length, width_t, width_s, heads = shape
    # The reference holds about a dozen (B, A, L, L) float64 maps (scores, softmaxes, their gradients).
    too_big = reference_too_big(device, 12, batch * heads * length * length)
    if too_big:
        return {"check": f"relation {loss} {dtype} shape={shape}", "pass": None, "note": f"not run: {too_big}"}
    rng = torch.Generator().manual_seed(zlib.crc32(repr((dtype, loss, shape, mask_kind, relation)).encode()))
    t_a, t_b, s_a, s_b = relation_inputs(shape, relation, DTYPES[dtype], rng, device=device)
    mask = token_mask(mask_kind, batch, length, rng)
    if mask is not None:
        mask = mask.to(device)
        if nan_padding:  # no path may read the padding: NaN there must not reach the loss or a gradient
            with torch.no_grad():
                for x in {id(x): x for x in (t_a, t_b, s_a, s_b)}.values():
                    x[~mask] = float("nan")
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, mask=mask, loss=loss, backend="triton")
    grads = torch.autograd.grad(value, students(s_a, s_b))
    ref_value, ref_grads = reference_loss_and_grads(t_a, t_b, s_a, s_b, heads, mask, loss)
    head_dim = max(width_t, width_s) // heads
    growth = gamma(length + head_dim)
    loss_tol = max(RELATION_TOL[dtype][0], growth)
    loss_err = abs(float(value.detach()) - float(ref_value.detach())) / abs(float(ref_value.detach()))
    grad_errs, grad_tols, padding_clean = [], [], True
    for grad, ref_grad, student in zip(grads, ref_grads, students(s_a, s_b)):
        grad_errs.append(rel_err(grad, ref_grad))
        grad_tols.append(max(RELATION_TOL[dtype][1], 2 * rel_err(ref_grad.to(student.dtype), ref_grad), 4 * growth))
        if mask is not None:
            padding_clean &= bool(torch.isfinite(grad).all()) and not bool(grad[~mask].any())
    passed = loss_err <= loss_tol and all(e <= t for e, t in zip(grad_errs, grad_tols)) and padding_clean
    return {"check": f"relation {loss} {dtype} B={batch} L={length} d_t={width_t // heads} d_s={width_s // heads} "
                     f"{relation} mask={mask_kind}{'+NaN' if nan_padding and mask is not None else ''}",
            "loss_rel_err": loss_err, "loss_bound": loss_tol, "grad_rel_err": max(grad_errs),
            "grad_bound": min(grad_tols), "padding_grads_zero": padding_clean, "pass": passed}


def mi_inputs(n, embed, dtype, with_q, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b = ((torch.randn(n, embed, generator=gen) / embed**0.25).to(device=device, dtype=DTYPES[dtype])
            for _ in range(2))
    log_q = torch.randn(n, generator=gen).to(device=device, dtype=DTYPES[dtype]) if with_q else None
    return [x.requires_grad_() if x is not None else None for x in (a, b, log_q)]


def mi_check(device, dtype: str, bound: str, alpha: float, with_q: bool, n: int, embed: int) -> dict:
    # The reference keeps about 16 n x n float64 matrices alive (scores, masks, its leave-one-out
    # sums and their autograd buffers).
    too_big = reference_too_big(device, 16, n * n)
    if too_big:
        return {"check": f"mi {bound} alpha={alpha} {dtype} n={n}", "pass": None, "note": f"not run: {too_big}"}
    a, b, log_q = mi_inputs(n, embed, dtype, with_q, device)
    leaves = [x for x in (a, b, log_q) if x is not None]
    value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, backend="triton")
    grads = torch.autograd.grad(value, leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = pykd.mi_lower_bound_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_q else None,
                                        bound=bound, alpha=alpha)
    ref_grads = torch.autograd.grad(ref, ref_leaves, allow_unused=True)
    growth = gamma(n + embed)
    value_err = abs(float(value.detach()) - float(ref.detach()))
    value_tol = max(1e-5, growth) * abs(float(ref.detach())) + 1e-6
    errors, tols = [], []
    for grad, ref_grad, leaf in zip(grads, ref_grads, leaves):
        if ref_grad is None or not bool(ref_grad.any()):
            continue
        errors.append(rel_err(grad, ref_grad))
        tols.append(max(MI_GRAD_TOL[dtype], 2 * rel_err(ref_grad.to(leaf.dtype), ref_grad), 4 * growth))
    del ref_leaves, ref, ref_grads
    return {"check": f"mi {bound} alpha={alpha} {'log_q ' if with_q else ''}{dtype} n={n} e={embed}",
            "value": float(value.detach()), "value_abs_err": value_err, "value_bound": value_tol,
            "grad_rel_err": max(errors), "grad_bound": min(tols),
            "pass": value_err <= value_tol and all(e <= t for e, t in zip(errors, tols))}


def mi_confident_check(device, dtype: str, layout: str, sep: float, bound: str, alpha: float, with_q: bool,
                       n: int) -> dict:
    """Against the 90-digit evaluation of tests/ops/mi_exact.py, with its error bounds."""
    from tests.ops import mi_exact

    a, b, log_q, scale = mi_exact.layout_inputs(layout, n, sep, DTYPES[dtype], seed=0)
    log_q = log_q if with_q else None
    ref = mi_exact.exact_bound(mi_exact.exact_scores(a, b, scale), log_q, bound, alpha)
    leaves = [x.detach().to(device).requires_grad_() for x in (a, b, log_q) if x is not None]
    value = pykd.mi_lower_bound(leaves[0], leaves[1], leaves[2] if log_q is not None else None, bound=bound,
                                alpha=alpha, scale=scale, backend="triton")
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    out = 0.0
    if dtype == "bf16":
        out = mi_exact.BF16_INTERPRETER_ROUNDING if device == "cpu" else mi_exact.BF16_GRAD_ROUNDING
    errors = mi_exact.exact_errors(float(value.detach()), [g.detach().cpu().double() for g in grads], a, b, log_q,
                                   scale, ref, UNIT_ROUNDOFF[torch.float32], out)
    worst = max(errors, key=lambda e: e[1] / e[2] if e[2] else math.inf)
    return {"check": f"mi exact {layout} sep={sep} {bound} alpha={alpha}{' log_q' if with_q else ''} {dtype} n={n}",
            "worst": worst[0], "error": worst[1], "bound": worst[2], "pass": all(e <= t for _, e, t in errors)}


def mi_consistency_check(device, dtype: str, n: int, embed: int, blocks: int = 4) -> dict:
    """At n where no float64 reference fits: the op's value and gradients finite, and the kernels'
    per-row statistics of all rows equal to those of its row blocks run on their own (each block's
    rows against all columns, its positives offset). Rows are independent, so only rounding may
    differ (a few ulps, 1e-5 relative bounds it); a row or offset mix-up differs by O(1)."""
    from pykd.kernels import mi_bound as kernel

    a, b, log_q = mi_inputs(n, embed, dtype, True, device)
    value = pykd.mi_lower_bound(a, b, log_q, bound="alpha", alpha=0.9, backend="triton")
    grads = torch.autograd.grad(value, [a, b, log_q])
    finite = math.isfinite(float(value.detach())) and all(bool(torch.isfinite(g).all()) for g in grads)

    def stats(start, stop):
        return kernel.bound_forward(a[start:stop], b, log_q[start:stop], kernel.ALPHA, 0.9, 1.0,
                                    diag_offset=start)[2]

    with torch.no_grad():
        whole = stats(0, n)
        rows = -(-n // blocks)
        blocked = torch.cat([stats(start, min(n, start + rows)) for start in range(0, n, rows)], dim=1)
    difference = float(((blocked - whole).abs() / (whole.abs() + 1.0)).max())
    tolerance = 1e-5
    return {"check": f"mi alpha=0.9 log_q {dtype} n={n} e={embed}: finite, {blocks} row blocks' statistics = the "
                     "whole's (no float64 reference fits)", "value": float(value.detach()),
            "max_rel_diff": difference, "bound": tolerance, "finite": finite,
            "pass": finite and difference <= tolerance}


def routed_check(device, dtype: str, neuron_wise: bool, with_bias: bool, experts: int, sizes: tuple) -> dict:
    tokens, d, f, f_max, d_max = sizes
    gen = torch.Generator().manual_seed(tokens + d + experts + 2 * neuron_wise + with_bias)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=DTYPES[dtype]).requires_grad_()

    x, w = leaf(tokens, d), leaf(experts, f_max, d_max, scale=d**-0.5)
    logits = torch.randn(f, experts, generator=gen) if neuron_wise else torch.randn(experts, generator=gen)
    alpha = torch.softmax(logits, -1).to(device=device, dtype=DTYPES[dtype]).requires_grad_()
    bias = leaf(experts, f_max) if with_bias else None
    leaves = [t for t in (x, w, alpha, bias) if t is not None]
    y = pykd.routed_linear(x, w, alpha, bias, out_features=f, backend="triton")
    grad_y = torch.randn(y.shape, generator=gen).to(device=device, dtype=y.dtype)
    grads = torch.autograd.grad(y, leaves, grad_y)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = pykd.routed_linear_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2],
                                       ref_leaves[3] if with_bias else None, f)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_y.double())
    growth = 2 * gamma(max(tokens, d, f))
    errors, tols = [], []
    for got, want, like in [(y, ref, x), *zip(grads, ref_grads, leaves)]:
        errors.append(rel_err(got, want))
        tols.append(max(ROUTED_TOL[dtype], 2 * rel_err(want.to(like.dtype), want), growth))
    return {"check": f"routed {'neuron' if neuron_wise else 'layer'} E={experts} {'bias ' if with_bias else ''}"
                     f"{dtype} tokens={tokens} d={d} f={f}", "rel_err": max(errors), "bound": min(tols),
            "pass": all(e <= t for e, t in zip(errors, tols))}


def vocab_check(device, dtype: str, divergence: str, teacher: str, shape: tuple, k: int) -> dict:
    """The Triton path's value and gradients against the float64 reference on the same inputs
    (tests/ops/vocab_cases.py's make_case: exactly representable in the dtype, every third row
    ignored, hard labels at weight 0.5, T = 2, jsd's beta 0.3)."""
    from tests.ops.vocab_cases import Case, make_case

    n, vocab, d_s, d_t = shape
    label = (f"vocab {divergence} {teacher} {dtype} N={n} V={vocab} d_s={d_s}"
             f"{f' d_t={d_t}' if teacher == 'projected' else ''}{f' k={k}' if teacher.startswith('topk') else ''}")
    # The reference keeps about a dozen N x V float64 arrays (logits, log-softmaxes, their
    # probabilities, autograd's buffers) alive.
    too_big = reference_too_big(device, 24, n * vocab)
    if too_big:
        return {"check": label, "pass": None, "note": f"not run: {too_big}"}
    rng = torch.Generator().manual_seed(zlib.crc32(label.encode()))
    kind, options = teacher, dict(divergence=divergence, beta=0.3, temperature=2.0, hard_label_weight=0.5)
    if teacher == "topk_spread":
        kind, options["topk_tail"] = "topk", "spread"
    case = make_case(rng, n=n, vocab=vocab, d_s=d_s, d_t=max(d_t, 1), teacher=kind, dtype=DTYPES[dtype], k=k,
                     device=device, **options)
    value = case.run("triton")
    grads = torch.autograd.grad(value, case.students())
    wide = {key: x.double() if x.is_floating_point() else x for key, x in case.teacher.items()}
    students64 = [x.detach().double().requires_grad_() for x in case.students()]
    reference = Case(students64[0], students64[1], students64[2] if case.b_s is not None else None, wide,
                     case.labels, case.options)
    ref_value = reference.run("reference")
    ref_grads = torch.autograd.grad(ref_value, reference.students())
    growth = gamma(vocab + d_s + d_t)
    value_err = abs(float(value.detach()) - float(ref_value.detach())) / abs(float(ref_value.detach()))
    value_tol = max(VOCAB_TOL[dtype][0], growth)
    errors, tols = [], []
    for grad, ref_grad, student in zip(grads, ref_grads, case.students()):
        errors.append(rel_err(grad, ref_grad))
        tols.append(max(VOCAB_TOL[dtype][1], 2 * rel_err(ref_grad.to(student.dtype), ref_grad), 4 * growth))
    del reference, students64, ref_grads
    return {"check": label, "value": float(value.detach()), "value_rel_err": value_err, "value_bound": value_tol,
            "grad_rel_err": max(errors), "grad_bound": min(tols),
            "pass": value_err <= value_tol and all(e <= t for e, t in zip(errors, tols))}


def compile_check(device, sizes: Sizes, dry: bool) -> dict:
    """torch.compile(fullgraph=True) of one step using all three ops: the same value and gradients as eager."""
    gen = torch.Generator().manual_seed(7)
    batch, length, width_t, width_s, heads = sizes.compile_relation
    n, embed = sizes.compile_mi
    tokens, d, f = sizes.compile_routed

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    t_a, t_b = (torch.randn(batch, length, width_t, generator=gen).to(device) for _ in range(2))
    leaves = [make(batch, length, width_s), make(batch, length, width_s), make(n, embed, scale=embed**-0.25),
              make(n, embed, scale=embed**-0.25), make(n), make(tokens, d), make(2, f, d, scale=d**-0.5),
              make(f, 2), make(2, f)]

    def step(s_a, s_b, a, b, log_q, x, w, logits, bias):
        relation = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, loss="kl")
        bound = pykd.mi_lower_bound(a, b, log_q, bound="alpha", alpha=0.9)
        y = pykd.routed_linear(x, w, torch.softmax(logits, -1), bias)
        return relation - bound + y.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if dry else "inductor")
    eager_value = step(*leaves)
    eager_grads = torch.autograd.grad(eager_value, leaves)
    value = compiled(*leaves)
    grads = torch.autograd.grad(value, leaves)
    # The same kernels run in both; only the compiled glue (softmax, square, mean) may reassociate.
    tolerance = 4 * gamma(max(tokens * f, n * embed, batch * length * width_s))
    errors = [rel_err(value, eager_value)] + [rel_err(g, e) for g, e in zip(grads, eager_grads)]
    return {"check": f"torch.compile(fullgraph=True, backend={'aot_eager' if dry else 'inductor'}) of relation + "
                     "MI + routed", "rel_err": max(errors), "bound": tolerance, "pass": max(errors) <= tolerance}


def correctness_steps(device, sizes: Sizes, dry: bool) -> list[Step]:
    """Every check, the core ones first; predicted seconds count the new kernel variants compiled."""
    seen: set = set()

    def cost(variants, run_s=0.5):
        new = [v for v in variants if v not in seen]
        seen.update(new)
        return run_s + COMPILE_S * len(new)

    def relation_variants(dtype, loss, shape):
        _, length, width_t, width_s, heads = shape
        return {("relation", k, dtype, loss, width_t // heads, width_s // heads, length % 16 == 0)
                for k in ("fwd", "dx", "dy")}

    steps = []

    def relation(dtype, loss, shape, **kwargs):
        steps.append(Step(f"relation {loss} {dtype} shape={shape} {kwargs or ''}".strip(), "correctness",
                          cost(relation_variants(dtype, loss, shape)),
                          lambda: [relation_check(device, dtype, loss, shape, **kwargs)]))

    def mi(dtype, bound, alpha, with_q, n):
        mode = "interior" if 0 < alpha < 1 else alpha
        variants = {("mi", k, dtype, bound, mode, with_q, sizes.mi_embed, n % 16 == 0) for k in ("fwd", "da", "db")}
        ref_s = 3.0 if n > 8192 else 0.5
        steps.append(Step(f"mi {bound} alpha={alpha} q={with_q} {dtype} n={n}", "correctness",
                          cost(variants, ref_s), lambda: [mi_check(device, dtype, bound, alpha, with_q, n,
                                                                  sizes.mi_embed)]))

    def routed(dtype, neuron_wise, with_bias, experts):
        variants = {("routed", k, dtype, neuron_wise, experts, with_bias and k == "fwd") for k in ("fwd", "dx", "dw")}
        steps.append(Step(f"routed {'neuron' if neuron_wise else 'layer'} E={experts} bias={with_bias} {dtype}",
                          "correctness", cost(variants),
                          lambda: [routed_check(device, dtype, neuron_wise, with_bias, experts, sizes.routed)]))

    def vocab(dtype, divergence, teacher, shape):
        n, vocab_size, d_s, _ = shape
        variants = {("vocab", kernel, dtype, divergence, teacher, n % 16 == 0, d_s % 16 == 0)
                    for kernel in ("fwd", "dh", "dw")}
        # The float64 reference: ~0.1 s of device time per 10^8 logits, the inputs drawn on the host.
        steps.append(Step(f"vocab {divergence} {teacher} {dtype} shape={shape}", "correctness",
                          cost(variants, 1.0 + 2e-8 * n * vocab_size),
                          lambda: [vocab_check(device, dtype, divergence, teacher, shape, sizes.vocab_k)]))

    # Core: every loss and dtype on ragged masks with NaN padding; MI's heaviest bound; routed MoS default.
    for dtype in ("bf16", "fp32", "fp16"):
        for loss in LOSSES:
            relation(dtype, loss, sizes.relation)
    for dtype in ("bf16", "fp32"):
        mi(dtype, "alpha", 0.9, True, sizes.mi_n)
    for dtype in ("bf16", "fp32", "fp16"):
        routed(dtype, True, True, 2)
    for dtype in ("bf16", "fp32"):
        vocab(dtype, "kl", "projected", sizes.vocab)
    # MI at confident critics (10-80 nats), against the 90-digit evaluation.
    for dtype, separations in (("fp32", (10, 20, 40, 80)), ("bf16", (20, 80))):
        for bound, alpha, with_q in (("alpha", 0.5, True), ("alpha", 1.0, False), ("infonce", 0.9, False)):
            mode = "interior" if 0 < alpha < 1 else alpha
            variants = {("mi", k, dtype, bound, mode, with_q, 16, False) for k in ("fwd", "da", "db")}
            steps.append(Step(f"mi exact {bound} alpha={alpha} {dtype} seps={separations}", "correctness",
                              cost(variants, 1.0 * len(separations)),
                              lambda dtype=dtype, separations=separations, bound=bound, alpha=alpha, with_q=with_q: [
                                  mi_confident_check(device, dtype, layout, sep, bound, alpha, with_q,
                                                     sizes.mi_confident_n)
                                  for sep in separations for layout in ("confident", "confused")]))
    # Long sequences, large batches.
    for dtype in ("bf16", "fp32"):
        relation(dtype, "kl", sizes.relation_long, mask_kind="ragged")
    for dtype in ("bf16", "fp32"):
        steps.append(Step(f"mi alpha=0.9 q {dtype} n={sizes.mi_reference_n} vs float64", "correctness",
                          cost({("mi", "ref", dtype, sizes.mi_reference_n)}, 4.0),
                          lambda dtype=dtype: [mi_check(device, dtype, "alpha", 0.9, True, sizes.mi_reference_n,
                                                        sizes.mi_embed)]))
        steps.append(Step(f"mi alpha=0.9 q {dtype} n={sizes.mi_huge_n} consistency", "correctness",
                          cost({("mi", "huge", dtype, sizes.mi_huge_n)}, 3.0),
                          lambda dtype=dtype: [mi_consistency_check(device, dtype, sizes.mi_huge_n, sizes.mi_embed)]))
    # The rest of the matrix.
    for dtype in ("bf16", "fp32", "fp16"):
        for neuron_wise, with_bias, experts in ((False, True, 2), (True, False, 4), (False, False, 4), (True, True, 4)):
            routed(dtype, neuron_wise, with_bias, experts)
    for dtype in ("bf16", "fp32"):
        relation(dtype, "kl", sizes.relation, relation="self")
        relation(dtype, "mse_prob", sizes.relation_odd, mask_kind="none")
        relation(dtype, "kl", sizes.relation_odd, mask_kind="single")
        for shape in sizes.relation_wide:
            relation(dtype, "kl", shape)
    for dtype in ("bf16", "fp32"):
        for bound, alpha, with_q in MI_BOUNDS:
            if (bound, alpha) != ("alpha", 0.9):
                mi(dtype, bound, alpha, with_q, sizes.mi_n)
    for dtype in ("bf16", "fp32"):
        vocab(dtype, "jsd", "logits", sizes.vocab_logits)
    vocab("bf16", "reverse_kl", "topk_spread", sizes.vocab_topk)
    return steps


# ---- timings ----

def bench_ms(fn, device) -> float:
    """Median ms of fn() after warm-up: triton.testing.do_bench on a GPU, a wall clock on CPU."""
    if device == "cpu":  # the dry run: one call exercises the path; its time means nothing
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def graph_ms(fn, device):
    """Median ms of fn() replayed from a CUDA graph (no host overhead); None on CPU or if it cannot be captured."""
    if device == "cpu":
        return None
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
    except Exception as error:  # noqa: BLE001 - a capture failure is recorded, not fatal
        torch.cuda.synchronize()
        return f"not captured: {type(error).__name__}: {str(error)[:120]}"


def peak_mib(fn, device):
    if device == "cpu":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def relation_steps(case, device):
    batch, heads, head_dim, length = case.params
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    t_a, t_b, s_a, s_b = (torch.randn(batch, length, heads * head_dim, generator=gen).to(device, dtype)
                          for _ in range(4))
    s_a.requires_grad_()
    s_b.requires_grad_()
    q, k, v = (x.detach().view(batch, length, heads, head_dim).transpose(1, 2).contiguous().requires_grad_()
               for x in (t_a, t_b, s_a))
    grad_out = torch.randn_like(q)

    def ours():
        loss = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, loss="kl", backend="triton")
        return torch.autograd.grad(loss, [s_a, s_b])

    def anchor():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = ([SDPBackend.MATH] if device == "cpu" else
                    [SDPBackend.EFFICIENT_ATTENTION] if case.dtype == "fp32" else [SDPBackend.FLASH_ATTENTION])
        with sdpa_kernel(backends):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return ours, anchor


def mi_steps(case, device):
    n, embed = case.params
    a, b, log_q = mi_inputs(n, embed, case.dtype, True, device)

    def ours():
        value = pykd.mi_lower_bound(a, b, log_q, bound="alpha", alpha=0.9, backend="triton")
        return torch.autograd.grad(value, [a, b, log_q])

    a_const, b_const = a.detach(), b.detach()

    def anchor():
        scores = a_const @ b_const.T
        return scores @ b_const, scores.T @ a_const

    return ours, anchor


def routed_steps(case, device):
    tokens, d, f, experts, neuron_wise = case.params
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(experts, f, d, generator=gen) * d**-0.5).to(device, dtype).requires_grad_()
    logits = torch.randn(f, experts, generator=gen) if neuron_wise else torch.randn(experts, generator=gen)
    alpha = torch.softmax(logits, -1).to(device, dtype).requires_grad_()
    bias = torch.zeros(experts, f, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, f, generator=gen).to(device, dtype)
    dense_w, dense_b = w[0].detach().clone().requires_grad_(), bias[0].detach().clone().requires_grad_()

    def ours():
        y = pykd.routed_linear(x, w, alpha, bias, f, backend="triton")
        return torch.autograd.grad(y, [x, w, alpha, bias], grad_y)

    def anchor():
        y = torch.nn.functional.linear(x, dense_w, dense_b)
        return torch.autograd.grad(y, [x, dense_w, dense_b], grad_y)

    return ours, anchor


def vocab_steps(case, device):
    """kl with a projected teacher and both biases at T = 2, every row selected; the anchor: the
    four GEMMs of the materialised logits (z_s, z_t) and of the student's gradients (z_s standing in
    for G)."""
    n, vocab, d_s, d_t = case.params
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    h_s, w_s, b_s = make(n, d_s, grad=True), make(vocab, d_s, scale=d_s**-0.5, grad=True), make(vocab, grad=True)
    h_t, w_t, b_t = make(n, d_t), make(vocab, d_t, scale=d_t**-0.5), make(vocab)

    def ours():
        loss = pykd.vocab_kd_loss(h_s, w_s, b_s, h_t, w_t, b_t, divergence="kl", temperature=2.0, backend="triton")
        return torch.autograd.grad(loss, [h_s, w_s, b_s])

    h_const, w_const, t_const, wt_const = h_s.detach(), w_s.detach(), h_t.detach(), w_t.detach()

    def anchor():
        z_s = h_const @ w_const.T
        z_t = t_const @ wt_const.T
        return z_t, z_s @ w_const, z_s.T @ h_const

    return ours, anchor


def kd_steps(case, device):
    from kd_step import kd_step

    batch, length = case.params
    return kd_step("pykd", batch, length, device), kd_step("peers", batch, length, device)


def anchor_fits(case, device) -> str:
    """Why the anchor cannot run (empty when it can): the GEMM anchor writes the n x n scores."""
    if device == "cpu" or case.op != "mi":
        return ""
    n = case.params[0]
    needed = 2 * n * n * gpu_roofline.BYTES[case.dtype]
    free, _ = torch.cuda.mem_get_info()
    return "" if needed < 0.8 * free else f"the n x n scores need {needed / 2**30:.0f} GiB"


def timing_row(case, real, device) -> dict:
    """Times `case` (the dry run's shrunk copy of `real`, or `real` itself) and sets `real`'s
    roofline predictions beside the measurement."""
    work, anchor_work = gpu_roofline.case_work(real)
    floor, bound = gpu_roofline.floor_seconds(work, gpu_roofline.H100)
    ours, anchor = {"relation": relation_steps, "mi": mi_steps, "routed": routed_steps, "kd": kd_steps,
                    "vocab": vocab_steps}[case.op](case, device)
    fill = gpu_roofline.grid_fill(real)
    row = {"case": case.label, "op": case.op, "params": list(case.params), "dtype": case.dtype,
           "anchor": case.anchor, "target": case.target, "H100_floor_us": 1e6 * floor, "H100_bound": bound,
           "predicted_kernel_ms": gpu_roofline.predicted_kernel_ms(work, case.op, fill),
           "predicted_anchor_kernel_ms": gpu_roofline.predicted_kernel_ms(anchor_work, case.anchor),
           "predicted_ms": gpu_roofline.predicted_ms(work, case.op, fill),
           "predicted_anchor_ms": gpu_roofline.predicted_ms(anchor_work, case.anchor)}
    if case.op == "kd":
        from kd_step import MODEL_SOURCE

        row["models"] = dict(MODEL_SOURCE)
        row["loss"], row["anchor_loss"] = ours(), anchor()
        row["pass"] = math.isclose(row["loss"], row["anchor_loss"], rel_tol=1e-4)
    else:
        ours()  # compiles the kernels outside the timing
    row["ms"] = bench_ms(ours, device)
    row["graph_ms"] = graph_ms(ours, device) if case.op != "kd" else None
    row["peak_mib"] = peak_mib(ours, device)
    why_not = anchor_fits(case, device)
    if why_not:
        row["anchor_note"] = f"anchor not run: {why_not}"
    else:
        anchor()
        row["anchor_ms"] = bench_ms(anchor, device)
        row["anchor_graph_ms"] = graph_ms(anchor, device) if case.op != "kd" else None
        row["anchor_peak_mib"] = peak_mib(anchor, device)
        row["ratio"] = row["ms"] / row["anchor_ms"]
        if isinstance(row["graph_ms"], float) and isinstance(row["anchor_graph_ms"], float):
            row["graph_ratio"] = row["graph_ms"] / row["anchor_graph_ms"]
    return row


def timing_cost_s(case, new_kernels: int) -> float:
    """Predicted seconds of a timing step: input set-up, then for each side a warm-up call, do_bench
    (~5 estimate calls and 60 ms), a CUDA-graph replay (~30 ms plus capture) and one peak-memory
    call, and the compiles of kernel variants no earlier step has used."""
    work, anchor_work = gpu_roofline.case_work(case)
    total = 1.0 if case.op != "kd" else 8.0
    for ms in (gpu_roofline.predicted_ms(work, case.op, gpu_roofline.grid_fill(case)),
               gpu_roofline.predicted_ms(anchor_work, case.anchor)):
        calls = 5 + 2 + 5 + 3 + max(1, 60 / ms) + max(1, 30 / ms)
        total += 0.3 + calls * ms / 1e3
    return total + COMPILE_S * new_kernels


def timing_steps(device, dry: bool) -> list[Step]:
    """One step per timing case; the dry run keeps one case per distinct shrunk case. Cases of one
    op and dtype share kernel variants (head size 64, lengths and n multiples of 16) except the
    routed op's expert count."""
    steps, seen_labels, seen_variants = [], set(), set()
    for real in gpu_roofline.TIMING_CASES:
        case = dry_case(real) if dry else real
        if case.label in seen_labels:
            continue
        seen_labels.add(case.label)
        variant = (real.op, real.dtype, real.params[3] if real.op == "routed" else None)
        new_kernels = 0 if variant in seen_variants or real.op == "kd" else 3
        seen_variants.add(variant)
        steps.append(Step(f"time {case.label} vs {case.anchor}", "timing", timing_cost_s(real, new_kernels),
                          lambda case=case, real=real: [timing_row(case, real, device)]))
    return steps


# ---- report ----

def _fmt(value, spec=".3f"):
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        "-" if value is None else str(value))


def markdown(record: dict) -> str:
    steps = record.get("steps", [])
    lines = [f"# gpu_check on {record.get('device')}", "",
             f"torch {record.get('torch')}, triton {record.get('triton')}, capability {record.get('capability')}; "
             f"budget {record.get('budget_s')} s, ran {record.get('elapsed_s')} s, predicted on an H100 "
             f"{record.get('predicted_total_s')} s{' (dry run: tiny sizes on CPU)' if record.get('dry_run') else ''}.",
             "", "## Correctness", "", "| check | error | bound | pass |", "|---|---|---|---|"]
    for step in steps:
        for row in step.get("rows", []):
            if "check" in row:
                error = row.get("grad_rel_err", row.get("rel_err", row.get("error", row.get("max_rel_diff",
                                                                                             row.get("note")))))
                bound = row.get("grad_bound", row.get("bound"))
                lines.append(f"| {row['check']} | {_fmt(error, '.2e')} | {_fmt(bound, '.2e')} | {row.get('pass')} |")
    lines += ["", "## Timings (median ms, fwd+bwd)", "",
              "| case | ms | graph ms | anchor | anchor ms | anchor graph ms | ratio | graph ratio | target | "
              "predicted call ms / anchor | predicted graph ms / anchor | H100 floor us |", "|" + "---|" * 12]
    for step in steps:
        for row in step.get("rows", []):
            if "case" in row:
                lines.append(
                    f"| {row['case']} | {_fmt(row.get('ms'))} | {_fmt(row.get('graph_ms'))} | {row['anchor']} | "
                    f"{_fmt(row.get('anchor_ms', row.get('anchor_note')))} | {_fmt(row.get('anchor_graph_ms'))} | "
                    f"{_fmt(row.get('ratio'), '.2f')} | {_fmt(row.get('graph_ratio'), '.2f')} | "
                    f"{_fmt(row.get('target'), 'g')} | {_fmt(row['predicted_ms'])} / "
                    f"{_fmt(row['predicted_anchor_ms'])} | {_fmt(row['predicted_kernel_ms'])} / "
                    f"{_fmt(row['predicted_anchor_kernel_ms'])} | {_fmt(row['H100_floor_us'], '.1f')} |")
    others = [s for s in steps if s["status"] not in ("ok",)]
    if others:
        lines += ["", "## Not passed, skipped or failed", ""]
        lines += [f"- {s['status']}: {s['step']}: {s.get('reason') or s.get('error') or 'a check failed'}"
                  for s in others]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of gpu_check_<device>.{json,md} (default bench/results; the dry run: a "
                             "temporary folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same sequence at tiny sizes on CPU under TRITON_INTERPRET=1 (no CUDA)")
    parser.add_argument("--only", nargs="*", choices=("correctness", "compile", "timing"),
                        default=["correctness", "compile", "timing"], help="phases to run")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        print("--dry-run needs TRITON_INTERPRET=1 before triton is imported: run it as a script", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or use --dry-run", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    out = args.out or (Path(tempfile.gettempdir()) / "pykd_gpu_check" if args.dry_run else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    import triton

    run = Run(device="CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(), dry=args.dry_run,
              budget_s=args.budget_s, out=out, slug=device_slug(args.dry_run))
    run.record.update(device=run.device, dry_run=args.dry_run, budget_s=args.budget_s, torch=torch.__version__,
                      triton=triton.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                      capability=None if args.dry_run else ".".join(map(str, torch.cuda.get_device_capability())))
    torch.manual_seed(0)
    sizes = DRY if args.dry_run else Sizes()
    steps = []
    if "correctness" in args.only:
        steps += correctness_steps(device, sizes, args.dry_run)
    if "compile" in args.only:
        steps.append(Step("torch.compile(fullgraph=True) of a step with all three ops", "compile", INDUCTOR_S,
                          lambda: [compile_check(device, sizes, args.dry_run)]))
    if "timing" in args.only:
        steps += timing_steps(device, args.dry_run)
    record = execute(steps, run)
    print(f"wrote {out / f'gpu_check_{run.slug}.json'} and .md: {record['summary']}")
    return 1 if any(s["status"] in ("fail", "error") for s in record["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
