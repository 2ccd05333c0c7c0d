"""Forward+backward steps of SuperLMs on the packaged MiniLM-L6 teacher, for the SuperLM benchmarks.

Variants of `superlm_step(variant, batch, length)` (all eval mode, so no dropout; gradients on):
- "hf":             the plain teacher (BertModel).
- "superlm_full":   a SuperLM with the teacher's shape active.
- "superlm_mid":    the SuperLM with MID_ARCH active.
- "exported_mid":   MID_ARCH exported from the SuperLM as a plain BertModel.
The loss is the mean square of the last hidden state plus that of the pooler output.

`mos_step(experts, routing, batch, length)`: the sandwich's sub-networks of the "base" sub-space
(MOS_ARCHS), each forward + backward of that loss, then one Adam update.

    python bench/superlm_step.py mos-peak EXPERTS ROUTING BATCH LENGTH   ->  prints MiB

prints the peak resident memory of two MoS steps over the resident size once the teacher and the
batch are loaded (the SuperLM, its gradients, Adam's state and the activations), in this process.
"""
import functools
import random
import sys

import torch

from pykd.distill.models import load_pretrained
from pykd.nas import Architecture, SearchSpace, SuperLM

MID_ARCH = Architecture(layers=4, hidden=288, ffn_ratio=3.0, heads=9)  # the MiniLM "base" sub-space's middle


@functools.lru_cache(maxsize=1)
def teacher():
    return load_pretrained("minilm-l6", "unlabeled").eval()


@functools.cache
def supernet(experts: int = 1, routing: str = "layer"):
    model = teacher()
    options = {} if experts == 1 else {"experts": experts, "routing": routing}
    return SuperLM.from_teacher(model, SearchSpace.autodistil(model), **options).eval()


def encoder_loss(out) -> torch.Tensor:
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


def model_for(variant: str):
    if variant == "hf":
        return teacher()
    if variant == "superlm_full":
        net = supernet()
        net.set_active(net.space.teacher_architecture())
        return net
    if variant == "superlm_mid":
        net = supernet()
        net.set_active(MID_ARCH)
        return net
    if variant == "exported_mid":
        return supernet().export(MID_ARCH)
    raise ValueError(f"unknown SuperLM benchmark variant {variant!r}")


def superlm_step(variant: str, batch: int, length: int):
    """The fwd+bwd callable of one variant on a real-text batch (see the module docstring)."""
    from kd_step import kd_batch

    inputs = kd_batch(batch, length)
    model = model_for(variant)

    def step():
        model.zero_grad(set_to_none=True)
        loss = encoder_loss(model(**inputs))
        loss.backward()
        return float(loss.detach())

    return step


def mos_archs():
    """Largest, smallest and two random (seed 0) architectures of the MiniLM "base" sub-space."""
    subspace = supernet().space.subspace("base")
    generator = random.Random(0)
    return [subspace.largest(), subspace.smallest(), subspace.sample(generator), subspace.sample(generator)]


def mos_step(experts: int, routing: str, batch: int, length: int):
    """The callable of one teacher-free sandwich step with Adam (see the module docstring)."""
    from kd_step import kd_batch

    inputs = kd_batch(batch, length)
    teacher_model = teacher()
    torch.manual_seed(0)
    net = SuperLM.from_teacher(teacher_model, SearchSpace.autodistil(teacher_model), experts=experts,
                               routing=routing).eval()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)
    archs = mos_archs()

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for arch in archs:
            net.set_active(arch)
            loss = encoder_loss(net(**inputs))
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        return total

    return step


def _resident_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def mos_peak_mib(experts: int, routing: str, batch: int, length: int) -> float:
    from kd_step import kd_batch

    teacher()
    kd_batch(batch, length)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _resident_mib("VmRSS")
    step = mos_step(experts, routing, batch, length)
    step()
    step()
    return _resident_mib("VmHWM") - before


if __name__ == "__main__":
    if sys.argv[1] != "mos-peak":
        raise SystemExit(f"usage: superlm_step.py mos-peak EXPERTS ROUTING BATCH LENGTH, got {sys.argv[1:]}")
    print(f"{mos_peak_mib(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])):.2f}")
