"""Every numeric config key has a range beside its field, and every value outside it is refused when the
configuration loads, with an error naming the key, the value and the range (issue 21, section 3).

The probes are generated from the config's own field metadata, so a key added without a range fails
test_every_numeric_key_has_a_range, and one whose range is not enforced fails the probes."""
import math
import typing

import pytest

from pykd.distill import config as run_config
from pykd.distill.options import Range
from tests.config_fields import leaf_fields


def _numeric_type(hint):
    """int or float for a numeric field (also `X | None`), None for any other."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _fields(section_cls):
    """(dotted key, numeric type or None, field) of every leaf field of a config section."""
    for key, hint, field in leaf_fields(section_cls):
        yield key, _numeric_type(hint), field


NUMERIC = [(key, kind, field.metadata.get("range")) for key, kind, field in _fields(run_config.RunConfig) if kind]
RANGED = [(key, kind, bounds) for key, kind, bounds in NUMERIC if isinstance(bounds, Range)]


def test_every_numeric_key_has_a_range():
    unranged = [key for key, _, bounds in NUMERIC if not isinstance(bounds, Range)]
    assert not unranged, f"numeric config keys without a range beside their field: {unranged}"
    assert len(RANGED) > 60  # the walk reached the nested sections (nas.budget, nas.latency, ...)


def _outside(kind, bounds: Range) -> list:
    """Values just outside the range on each bounded side, and the non-finite ones."""
    step = 1 if kind is int else 1e-3
    values = [math.nan, math.inf, -math.inf]
    if bounds.low is not None:
        values.append(kind(bounds.low) if bounds.low_open else kind(bounds.low - step))
    if bounds.high is not None:
        values.append(kind(bounds.high) if bounds.high_open else kind(bounds.high + step))
    return values


def _inside(kind, bounds: Range) -> list:
    """The range's closed ends (what it must still accept)."""
    return [kind(end) for end, open_ in ((bounds.low, bounds.low_open), (bounds.high, bounds.high_open))
            if end is not None and not open_]


def _yaml(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


PROBES = [pytest.param(key, kind, bounds, value, id=f"{key}={_yaml(value)}")
          for key, kind, bounds in RANGED for value in _outside(kind, bounds)]


@pytest.mark.parametrize("key, kind, bounds, value", PROBES)
def test_a_value_outside_its_range_is_refused_naming_key_value_and_range(key, kind, bounds, value):
    with pytest.raises(ValueError) as error:
        run_config.load(None, [f"{key}={_yaml(value)}"])
    message = str(error.value)
    assert f"config key {key} must" in message and bounds.describe() in message, message
    assert f"got {value}" in message or f"got {value!r}" in message, message


@pytest.mark.parametrize("key, kind, bounds", [pytest.param(*r, id=r[0]) for r in RANGED if _inside(r[1], r[2])])
def test_the_closed_ends_of_a_range_load(key, kind, bounds):
    for value in _inside(kind, bounds):
        try:
            config = run_config.load(None, [f"{key}={_yaml(value)}"])
        except ValueError as error:  # an end another key forbids (parents <= population, heads | width)
            assert f"config key {key} must" not in str(error), error
            continue
        section = config
        for part in key.split("."):
            section = getattr(section, part)
        assert section == value


@pytest.mark.parametrize("override, message", [
    # issue 21 section 3: each once failed after the models loaded, or inside a library without the key
    ("losses.relation.relation_heads=0", r"config key losses.relation.relation_heads must be >= 1, got 0"),
    ("student.dropout=1.5", r"config key student.dropout must lie in \[0, 1\), got 1.5"),
    ("student.dropout=1", r"config key student.dropout must lie in \[0, 1\), got 1.0"),
    ("train.seed=-1", r"config key train.seed must lie in \[0, 4294967295\], got -1"),
    ("train.seed=1099511627776", r"config key train.seed must lie in \[0, 4294967295\], got 1099511627776"),
    ("augment.seed=-1", r"config key augment.seed must lie in \[0, 4294967295\]"),
    ("student.hidden_size=0", r"config key student.hidden_size must be >= 1, got 0"),
    ("student.num_attention_heads=0", r"config key student.num_attention_heads must be >= 1, got 0"),
    # section 4: non-finite or negative weights and rates ran to the end with NaN losses and exit 0
    ("losses.hidden.weight=.nan", r"config key losses.hidden.weight must be >= 0, got nan"),
    ("losses.prediction.weight=-1", r"config key losses.prediction.weight must be >= 0, got -1.0"),
    ("losses.relation.weight=.inf", r"config key losses.relation.weight must be >= 0, got inf \(a finite number"),
    ("losses.mi.weight=-0.5", r"config key losses.mi.weight must be >= 0"),
    ("losses.prediction.hard_weight=.nan", r"config key losses.prediction.hard_weight must be >= 0, got nan"),
    ("train.lr=.inf", r"config key train.lr must be > 0, got inf \(a finite number is needed\)"),
    ("train.lr=-1e-4", r"config key train.lr must be > 0, got -0.0001"),
    ("train.steps=.inf", r"config key train.steps must be int \(and be >= 1\), got inf"),
    ("train.steps=.nan", r"config key train.steps must be int \(and be >= 1\), got nan"),
    ("losses.mi.alpha=1.5", r"config key losses.mi.alpha must lie in \[0, 1\], got 1.5"),
    ("nas.proxy.lr=0", r"config key nas.proxy.lr must be > 0, got 0.0"),
    ("nas.eval_batches=0", r"config key nas.eval_batches must be >= 1 or null, got 0"),
    ("nas.eval_batches=-1", r"config key nas.eval_batches must be >= 1 or null, got -1"),
])
def test_values_that_once_failed_late_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ValueError, match=message):
        run_config.load(None, [override])


@pytest.mark.parametrize("hidden, heads", [(4, 6), (192, 7), (10, 20)])
def test_a_student_head_count_that_does_not_divide_the_width_is_refused(hidden, heads):
    """hidden < heads once made a head size of 0 and a ZeroDivisionError inside transformers."""
    with pytest.raises(ValueError, match=rf"config key student.num_attention_heads must divide student.hidden_size "
                                         rf".*got {heads} heads for {hidden}"):
        run_config.load(None, [f"student.hidden_size={hidden}", f"student.num_attention_heads={heads}"])


def test_a_checkpoint_student_keeps_its_own_shape():
    """student.init checkpoint reads the shape from the checkpoint: the section's sizes do not apply."""
    config = run_config.load(None, ["student.init=checkpoint", "student.checkpoint=somewhere",
                                    "student.hidden_size=4", "student.num_attention_heads=6"])
    assert config.student.init == "checkpoint"
