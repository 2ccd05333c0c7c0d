"""Inputs for the attention-relation tests: random (never zero), odd sizes, ragged padding."""
import torch

# (batch, length, D_t, D_s, relation heads): lengths are not multiples of any tile, D_t != D_s.
SHAPES = {
    "A1": (2, 13, 24, 16, 1),
    "A4": (3, 37, 48, 24, 4),
    "A12": (2, 29, 96, 72, 12),
}
# The interpreter runs every program in Python: a smaller case that still crosses 16-wide tiles.
TRITON_SHAPE = (2, 21, 32, 24, 4)
MASKS = ("none", "ragged", "single")


def token_mask(kind: str, batch: int, length: int, rng: torch.Generator):
    """none: no mask; ragged: random lengths and one left-padded example; single: one example of one token."""
    if kind == "none":
        return None
    # At least two tokens each, so the gradient is never identically zero; 'single' makes the one-token case.
    lengths = torch.randint(2, length + 1, (batch,), generator=rng)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if kind == "single":
        mask[0] = False
        mask[0, length // 2] = True
    elif batch > 1:
        mask[1] = mask[1].flip(0)  # left padding: valid tokens need not be a prefix
    return mask


def relation_inputs(shape, relation: str, dtype, rng, device="cpu", student_dtype=None):
    """Teacher (t_a, t_b) and student (s_a, s_b) leaves; relation 'self' passes one tensor twice."""
    batch, length, width_t, width_s, _ = shape
    student_dtype = student_dtype or dtype

    def leaf(width, dt, requires_grad):
        x = torch.randn(batch, length, width, generator=rng).to(device=device, dtype=dt)
        return x.requires_grad_(requires_grad)

    t_a = leaf(width_t, dtype, False)
    t_b = t_a if relation == "self" else leaf(width_t, dtype, False)
    s_a = leaf(width_s, student_dtype, True)
    s_b = s_a if relation == "self" else leaf(width_s, student_dtype, True)
    return t_a, t_b, s_a, s_b


def students(s_a, s_b):
    return [s_a] if s_a is s_b else [s_a, s_b]


def reference_loss_and_grads(t_a, t_b, s_a, s_b, heads, mask, loss, **kwargs):
    """float64 reference on the same (possibly half-precision) input values."""
    import pykd

    leaves = [s.detach().double().requires_grad_() for s in students(s_a, s_b)]
    r_a, r_b = (leaves[0], leaves[0]) if len(leaves) == 1 else leaves
    value = pykd.attention_relation_loss_reference(t_a.double(), t_b.double(), r_a, r_b, heads, mask=mask,
                                                   loss=loss, **kwargs)
    return value, torch.autograd.grad(value, leaves)
