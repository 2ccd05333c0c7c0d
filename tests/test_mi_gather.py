"""gather=True over 2 gloo processes equals the single-process bound on the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pykd

WORLD = 2
LOCAL = 7
EMBED = 5


def global_batch():
    gen = torch.Generator().manual_seed(1234)
    return (torch.randn(WORLD * LOCAL, EMBED, generator=gen), torch.randn(WORLD * LOCAL, EMBED, generator=gen),
            torch.randn(WORLD * LOCAL, generator=gen))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, port, bound, alpha, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        local = slice(rank * LOCAL, (rank + 1) * LOCAL)
        a, b, log_q = (x[local].clone().requires_grad_() for x in global_batch())
        log_q = log_q if bound in ("tuba", "alpha") else None
        value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, gather=True, backend=backend)
        value.backward()
        torch.save({"value": value.detach(), "a": a.grad, "b": b.grad,
                    "log_q": log_q.grad if log_q is not None else None}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bound, alpha, backend", [
    ("alpha", 0.9, "cpp"), ("infonce", 0.9, "cpp"), ("nwj", 0.9, "cpp"),
    ("alpha", 0.5, "reference"), ("alpha", 0.9, "triton"),
])
def test_gather_equals_concatenated_batch(bound, alpha, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    mp.spawn(_rank_main, args=(_free_port(), bound, alpha, backend, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    a, b, log_q = (x.clone().requires_grad_() for x in global_batch())
    log_q = log_q if bound in ("tuba", "alpha") else None
    value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, backend="reference")
    value.backward()
    for got in ranks:
        assert float(got["value"]) == pytest.approx(float(value), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.cat([r["a"] for r in ranks]), a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["b"] for r in ranks]), b.grad, rtol=1e-4, atol=1e-6)
    if log_q is not None:
        torch.testing.assert_close(torch.cat([r["log_q"] for r in ranks]), log_q.grad, rtol=1e-4, atol=1e-6)


def test_gather_without_process_group_is_a_clear_error():
    a, b, _ = global_batch()
    with pytest.raises(ValueError, match="gather=True needs an initialised torch.distributed process group"):
        pykd.mi_lower_bound(a, b, gather=True)
