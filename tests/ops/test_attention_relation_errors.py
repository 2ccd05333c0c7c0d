"""Bad input to pykd.attention_relation_loss: each error names the argument and the shapes it got."""
import pytest
import torch

import pykd


def inputs(batch=2, length=7, width_t=12, width_s=8):
    t = torch.randn(batch, length, width_t)
    s = torch.randn(batch, length, width_s, requires_grad=True)
    return t, t.clone(), s, s.detach().clone().requires_grad_()


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda a: a.update(t_a=a["t_a"][0]), ValueError, r"t_a must have 3 dimensions, got shape \(7, 12\)"),
        (lambda a: a.update(t_b=torch.randn(2, 7, 16)), ValueError, r"t_a and t_b must have the same shape"),
        (lambda a: a.update(s_b=torch.randn(2, 7, 4)), ValueError, r"s_a and s_b must have the same shape"),
        (lambda a: a.update(s_a=torch.randn(3, 7, 8), s_b=torch.randn(3, 7, 8)), ValueError,
         r"\(batch, length\).*\(2, 7, 12\).*\(3, 7, 8\)"),
        (lambda a: a.update(s_a=torch.randn(2, 6, 8), s_b=torch.randn(2, 6, 8)), ValueError,
         r"\(batch, length\)"),
        (lambda a: a.update(num_relation_heads=3), ValueError, r"s_a last dimension 8 .* num_relation_heads=3"),
        (lambda a: a.update(num_relation_heads=5), ValueError, r"t_a last dimension 12 .* num_relation_heads=5"),
        (lambda a: a.update(num_relation_heads=0), ValueError, r"num_relation_heads must be a positive int"),
        (lambda a: a.update(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
         r"mask must have shape \(2, 7\), got \(2, 6\)"),
        (lambda a: a.update(mask=torch.ones(2, 7)), TypeError, r"mask must have dtype torch.bool"),
        (lambda a: a.update(mask=torch.tensor([[True] * 7, [False] * 7])), ValueError,
         r"no valid token in example\(s\) \[1\]"),
        (lambda a: a.update(t_a=a["t_a"].int(), t_b=a["t_b"].int()), TypeError, r"t_a has dtype torch.int32"),
        (lambda a: a.update(loss="l2"), ValueError, r"loss must be one of"),
        (lambda a: a.update(scale_s=-1.0), ValueError, r"scale_s must be a positive finite number"),
        (lambda a: a.update(backend="cuda"), ValueError, r"backend must be one of"),
        (lambda a: a.update(t_a=a["t_a"].to("meta"), t_b=a["t_b"].to("meta")), ValueError,
         r"t_a is on device meta \(shape \(2, 7, 12\)\)"),
    ],
)
def test_bad_input_raises_clear_error(mutate, error, pattern):
    t_a, t_b, s_a, s_b = inputs()
    args = dict(t_a=t_a, t_b=t_b, s_a=s_a, s_b=s_b, num_relation_heads=2)
    mutate(args)
    with pytest.raises(error, match=pattern):
        pykd.attention_relation_loss(**args)


@pytest.mark.parametrize("name", ("t_a", "s_b"))
def test_nan_check_names_the_input(name):
    t_a, t_b, s_a, s_b = inputs()
    args = dict(t_a=t_a, t_b=t_b, s_a=s_a.detach().clone(), s_b=s_b.detach().clone(), num_relation_heads=2)
    args[name][1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{name} contains NaN or Inf at a valid token \(shape \(2, 7, \d+\)\)"):
        pykd.attention_relation_loss(**args, check_inputs_finite=True)


def test_missing_extension_and_sources_give_one_clear_error(monkeypatch, tmp_path):
    from pykd import _extension

    monkeypatch.setattr(_extension, "_SOURCE_ROOTS", (tmp_path,))
    with pytest.raises(_extension.ExtensionUnavailableError, match="not installed .* C\\+\\+ sources"):
        _extension._build_just_in_time(ImportError("No module named 'pykd._C'"))
