"""Checks the Triton paths on a real GPU against the float64 reference and times them.

    python tools/gpu_check.py [--out DIR]

Run from the repository root on a CUDA machine (the C++ extension is not needed). Prints one
line per case and writes gpu_check.json to --out.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels
import pykd

# Uninstalled checkout: give kernels/ the name pyproject.toml installs it under.
sys.modules.setdefault("pykd.kernels", kernels)
pykd.kernels = sys.modules["pykd.kernels"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def relation_inputs(batch, length, dt, ds, dtype, self_relation, ragged):
    t_a = torch.randn(batch, length, dt, device="cuda", dtype=dtype)
    t_b = t_a if self_relation else torch.randn_like(t_a)
    s_a = torch.randn(batch, length, ds, device="cuda", dtype=dtype, requires_grad=True)
    s_b = s_a if self_relation else torch.randn(batch, length, ds, device="cuda", dtype=dtype, requires_grad=True)
    mask = None
    if ragged:
        lengths = torch.randint(1, length + 1, (batch,), device="cuda")
        lengths[0] = 1
        mask = torch.arange(length, device="cuda")[None, :] < lengths[:, None]
    return t_a, t_b, s_a, s_b, mask


def check_relation(loss, dtype, self_relation, ragged, heads=12, shape=(3, 211, 384, 192)):
    batch, length, dt, ds = shape
    t_a, t_b, s_a, s_b, mask = relation_inputs(batch, length, dt, ds, dtype, self_relation, ragged)
    students = [s_a] if self_relation else [s_a, s_b]
    fused = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, mask=mask, loss=loss)
    grads = torch.autograd.grad(fused, students)
    ref_students = [s.detach().double().requires_grad_() for s in students]
    r_a, r_b = (ref_students[0], ref_students[0]) if self_relation else ref_students
    ref = pykd.attention_relation_loss_reference(t_a.double(), t_b.double(), r_a, r_b, heads, mask=mask, loss=loss)
    ref_grads = torch.autograd.grad(ref, ref_students)
    return {"op": "attention_relation", "loss": loss, "dtype": str(dtype), "self": self_relation, "ragged": ragged,
            "loss_rel_err": abs(float(fused) - float(ref)) / abs(float(ref)),
            "grad_rel_err": max(rel_err(g, r) for g, r in zip(grads, ref_grads))}


def time_cuda(fn, repeat=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def time_steps(row: dict, steps: dict) -> dict:
    """Adds each step's time (ms) and extra peak CUDA memory (MiB) to row."""
    for name, step in steps.items():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row[f"{name}_ms"] = time_cuda(step)
        row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def time_relation(length, dtype, batch=8, heads=12, head_dim=64):
    t_a, t_b, s_a, s_b, _ = relation_inputs(batch, length, heads * head_dim, heads * head_dim, dtype, False, False)

    def run(backend):
        loss = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, loss="kl", backend=backend)
        torch.autograd.grad(loss, [s_a, s_b])

    return time_steps({"op": "attention_relation_timing", "L": length, "dtype": str(dtype)},
                      {backend: lambda backend=backend: run(backend) for backend in ("triton", "reference")})


MI_CASES = [("infonce", 0.9, False), ("nwj", 0.9, False), ("js", 0.9, False), ("tuba", 0.9, True),
            ("alpha", 0.0, True), ("alpha", 0.5, True), ("alpha", 0.9, True), ("alpha", 1.0, False)]


def check_mi(bound, alpha, with_q, dtype, n, embed=128):
    a = (torch.randn(n, embed, device="cuda") / embed**0.25).to(dtype).requires_grad_()
    b = (torch.randn(n, embed, device="cuda") / embed**0.25).to(dtype).requires_grad_()
    log_q = torch.randn(n, device="cuda").to(dtype).requires_grad_() if with_q else None
    leaves = [x for x in (a, b, log_q) if x is not None]
    fused = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha)
    grads = torch.autograd.grad(fused, leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = pykd.mi_lower_bound_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_q else None,
                                        bound=bound, alpha=alpha)
    ref_grads = torch.autograd.grad(ref, ref_leaves, allow_unused=True)
    errs = [rel_err(g, r) for g, r in zip(grads, ref_grads) if r is not None]
    return {"op": "mi_bound", "bound": bound, "alpha": alpha, "log_q": with_q, "dtype": str(dtype), "n": n,
            "value": float(fused), "value_abs_err": abs(float(fused) - float(ref)), "grad_rel_err": max(errs)}


def time_mi(n, dtype, embed=128):
    a = torch.randn(n, embed, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, embed, device="cuda", dtype=dtype, requires_grad=True)
    log_q = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)

    def run(backend):
        value = pykd.mi_lower_bound(a, b, log_q, bound="alpha", alpha=0.9, backend=backend)
        torch.autograd.grad(value, [a, b, log_q])

    return time_steps({"op": "mi_bound_timing", "n": n, "e": embed, "dtype": str(dtype)},
                      {backend: lambda backend=backend: run(backend) for backend in ("triton", "reference")})


def check_routed(neuron_wise, with_bias, dtype, tokens=300, d=200, f=333, f_max=400, d_max=256, experts=2):
    x = torch.randn(tokens, d, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(experts, f_max, d_max, device="cuda") * d**-0.5).to(dtype).requires_grad_()
    logits = torch.randn(f, experts, device="cuda") if neuron_wise else torch.randn(experts, device="cuda")
    alpha = torch.softmax(logits, -1).to(dtype).requires_grad_()
    b = torch.randn(experts, f_max, device="cuda").to(dtype).requires_grad_() if with_bias else None
    leaves = [t for t in (x, w, alpha, b) if t is not None]
    y = pykd.routed_linear(x, w, alpha, b, out_features=f)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = pykd.routed_linear_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2],
                                       ref_leaves[3] if with_bias else None, f)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_y.double())
    return {"op": "routed_linear", "neuron_wise": neuron_wise, "bias": with_bias, "dtype": str(dtype),
            "out_rel_err": rel_err(y, ref), "grad_rel_err": max(rel_err(g, r) for g, r in zip(grads, ref_grads))}


def time_routed(tokens, neuron_wise, dtype, d=768, f=3072, experts=2):
    x = torch.randn(tokens, d, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(experts, f, d, device="cuda") * d**-0.5).to(dtype).requires_grad_()
    logits = torch.randn(f, experts, device="cuda") if neuron_wise else torch.randn(experts, device="cuda")
    alpha = torch.softmax(logits, -1).to(dtype).requires_grad_()
    b = torch.zeros(experts, f, device="cuda", dtype=dtype, requires_grad=True)
    dense_w, dense_b = w[0].detach().clone().requires_grad_(), b[0].detach().clone().requires_grad_()
    steps = {
        "triton": lambda: torch.autograd.grad(pykd.routed_linear(x, w, alpha, b, f).sum(), [x, w, alpha, b]),
        "reference": lambda: torch.autograd.grad(
            pykd.routed_linear(x, w, alpha, b, f, backend="reference").sum(), [x, w, alpha, b]),
        "dense": lambda: torch.autograd.grad(torch.nn.functional.linear(x, dense_w, dense_b).sum(),
                                             [x, dense_w, dense_b]),
    }
    return time_steps({"op": "routed_linear_timing", "tokens": tokens, "neuron_wise": neuron_wise,
                       "dtype": str(dtype)}, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--only", choices=("relation", "mi", "routed"), nargs="*",
                        default=["relation", "mi", "routed"], help="which ops to check")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    dtypes = (torch.float32, torch.bfloat16)
    cases = []
    if "relation" in args.only:
        cases += [(check_relation, (loss, dtype, self_relation, ragged))
                  for loss in ("kl", "ce", "mse_prob", "mse_logit") for dtype in dtypes
                  for self_relation, ragged in ((False, False), (True, True), (False, True))]
        cases += [(time_relation, (length, dtype)) for length in (128, 512, 1024) for dtype in dtypes]
    if "mi" in args.only:
        cases += [(check_mi, (bound, alpha, with_q, dtype, n))
                  for bound, alpha, with_q in MI_CASES for dtype in dtypes for n in (3, 300, 4097)]
        cases += [(time_mi, (n, dtype)) for n in (1024, 4096, 16384) for dtype in dtypes]
    if "routed" in args.only:
        cases += [(check_routed, (neuron_wise, with_bias, dtype))
                  for neuron_wise in (False, True) for with_bias in (False, True) for dtype in dtypes]
        cases += [(time_routed, (tokens, neuron_wise, dtype))
                  for tokens in (128, 4096) for neuron_wise in (False, True) for dtype in dtypes]
    for check, case_args in cases:
        rows.append(check(*case_args))
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_check_{'_'.join(args.only)}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
