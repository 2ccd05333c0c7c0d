"""gather=True over 2 gloo processes equals the single-process bound on the concatenated batch."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pykd
from tests.fp_bounds import assert_normwise_close, gamma

WORLD = 2
LOCAL = 7
EMBED = 5


def global_batch():
    gen = torch.Generator().manual_seed(1234)
    return (torch.randn(WORLD * LOCAL, EMBED, generator=gen), torch.randn(WORLD * LOCAL, EMBED, generator=gen),
            torch.randn(WORLD * LOCAL, generator=gen))


def _rank_main(rank, bound, alpha, backend, out_dir):
    # A file store: no port to race for on a busy machine; a timeout so a lost peer fails the test, not CI.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        local = slice(rank * LOCAL, (rank + 1) * LOCAL)
        a, b, log_q = (x[local].clone().requires_grad_() for x in global_batch())
        log_q = log_q if bound in ("tuba", "alpha") else None
        value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, gather=True, backend=backend)
        value.backward()
        torch.save({"value": value.detach(), "a": a.grad, "b": b.grad,
                    "log_q": log_q.grad if log_q is not None else None}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        # Leave together (pykd.distill.distributed.leave_process_group does the same): a rank that closed its
        # gloo pairs while the other still read from them aborted that rank (SIGABRT in CI, under load).
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("bound, alpha, backend", [
    ("alpha", 0.9, "cpp"), ("infonce", 0.9, "cpp"), ("nwj", 0.9, "cpp"),
    ("alpha", 0.5, "reference"), ("alpha", 0.9, "triton"),
])
def test_gather_equals_concatenated_batch(bound, alpha, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    mp.spawn(_rank_main, args=(bound, alpha, backend, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    a, b, log_q = (x.clone().requires_grad_() for x in global_batch())
    log_q = log_q if bound in ("tuba", "alpha") else None
    value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, backend="reference")
    value.backward()
    # The paths sum the same terms in other orders (and the fused ones by other formulas). A score is a
    # dot product over EMBED features and enters sums over the n = WORLD * LOCAL samples; an absolute
    # score error d moves every softmax weight by a relative d. So value and gradients agree to
    # gamma(n * EMBED) times the scale of the scores (and of log_q), the gradients norm-wise.
    scores = (a.detach().norm(dim=1)[:, None] * b.detach().norm(dim=1)[None]).max()
    scale = 1 + float(scores) + (float(log_q.detach().abs().max()) if log_q is not None else 0.0)
    tolerance = gamma(WORLD * LOCAL * EMBED) * scale
    expected = float(value.detach())
    for got in ranks:
        assert abs(float(got["value"]) - expected) <= tolerance
    for name, want in (("a", a.grad), ("b", b.grad), ("log_q", log_q.grad if log_q is not None else None)):
        if want is not None:
            assert_normwise_close(torch.cat([r[name] for r in ranks]), want, tolerance, name)


def test_gather_without_process_group_is_a_clear_error():
    a, b, _ = global_batch()
    with pytest.raises(ValueError, match="gather=True needs an initialised torch.distributed process group"):
        pykd.mi_lower_bound(a, b, gather=True)
