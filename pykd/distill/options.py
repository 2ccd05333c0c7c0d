"""How a run-config key is declared and checked when a configuration loads.

A config section is a dataclass; each field says all that is known of its key:

- its type: bool, int, float, str, list, dict, `X | None` (null allowed), `Literal[CHOICES]` for a
  choice, where CHOICES is the tuple the implementation of that option exports (the mapping names of
  pykd.distill.mapping, the MI bounds of pykd.ops.mi_bound, ...), or `list[Literal[CHOICES]]` for a
  list of choices;
- its range, beside it: `option(default, at_least(1))`, `option(0.1, within(0, 1))`, ... (a `Range`
  in the field's metadata, key "range"); a list of choices may say it must not be empty and what its
  items are called (metadata "non_empty", "noun").

`build` turns nested dicts (YAML) into a section, refusing unknown keys, wrong types and unknown
choices; `check_ranges` then checks every ranged field of a built section and its sub-sections.
Every error names the key, what it takes and what it got.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The numbers a key takes: low and/or high bounds (None: unbounded), each inclusive unless open.
    A null value (of an optional key) is never out of range; `or_null` makes the message say it is allowed.
    NaN and the infinities lie in no range: no key says "no limit" with an infinity (null says it where a
    key allows it), and an infinite rate or weight would only train to NaN."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    or_null: bool = False

    def contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """What the range asks, as the error message words it ("be >= 1", "lie in (0, 1]", ...)."""
        if self.low is not None and self.high is not None:
            if self.low_open and self.high_open:
                text = f"lie strictly between {self.low} and {self.high}"
            else:
                text = f"lie in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"be {'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"be {'<' if self.high_open else '<='} {self.high}"
        return text + (" or null" if self.or_null else "")

    def check(self, key: str, value) -> None:
        if value is not None and not self.contains(value):
            infinite = isinstance(value, float) and math.isinf(value)
            raise ValueError(f"config key {key} must {self.describe()}, got {value}"
                             + (" (a finite number is needed)" if infinite else ""))


def at_least(low, or_null: bool = False) -> Range:
    return Range(low=low, or_null=or_null)


def above(low, or_null: bool = False) -> Range:
    return Range(low=low, low_open=True, or_null=or_null)


def within(low, high, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low=low, high=high, low_open=low_open, high_open=high_open)


def option(default=dataclasses.MISSING, range: Range | None = None, *, factory=dataclasses.MISSING,
           noun: str | None = None, non_empty: bool = False):
    """A config field: its default (or a factory for lists and dicts), its range, and for a list of choices
    what its items are called and whether it may be empty."""
    metadata = {key: value for key, value in (("range", range), ("noun", noun), ("non_empty", non_empty)) if value}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def choices_of(hint) -> tuple | None:
    """The values of a Literal[...] type (also inside `| None` or list[...]), None for other types."""
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is typing.Literal:
            return typing.get_args(candidate)
    return None


def build(cls, values: dict, prefix: str = ""):
    """The section `cls` (a dataclass) from `values` (a dict), its sub-sections built recursively.

    Args:
        cls: the section's dataclass. values: its keys as read from YAML. prefix: the section's dotted
            path with a trailing dot ("" for the root), for messages.
    Returns:
        cls(**converted values); keys it omits take their defaults.
    """
    if not isinstance(values, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"{prefix.rstrip('.') or 'the root'} accepts {sorted(fields)}")
    built = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            built[name] = build(hint, value, f"{prefix}{name}.")
        else:
            built[name] = _convert(value, hint, prefix + name, fields[name].metadata)
    return cls(**built)


def check_ranges(section, prefix: str = "") -> None:
    """Every ranged field of a built section (and of its sub-sections) within its range."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{field.name}.")
        elif "range" in field.metadata:
            field.metadata["range"].check(prefix + field.name, value)


def _convert(value, hint, key: str, metadata):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"config key {key} may not be null")
    target = args[0] if origin in (typing.Union, types.UnionType) else hint
    if typing.get_origin(target) is typing.Literal:
        choices = typing.get_args(target)
        if isinstance(value, (list, dict)) or value not in choices:
            raise ValueError(f"config key {key} must be one of {choices}, got {value!r}")
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} must be true or false, got {value!r}")
    if target in (int, float):
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (target is int and not _integral(value)):
            bounds = f" (and {metadata['range'].describe()})" if "range" in metadata else ""
            raise ValueError(f"config key {key} must be {target.__name__}{bounds}, got {value!r}")
        return target(value)
    if target is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key} must be a string, got {value!r}")
        return value
    if (typing.get_origin(target) or target) is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key} must be a list, got {value!r}")
        _check_items(value, target, key, metadata)
        return value
    if (typing.get_origin(target) or target) is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key} must be a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _check_items(value: list, hint, key: str, metadata) -> None:
    """A list of choices holds only those choices (and something, when it must not be empty)."""
    choices = choices_of(hint)
    if choices is None:
        return
    bad = [item for item in value if isinstance(item, (list, dict)) or item not in choices]
    non_empty = metadata.get("non_empty", False)
    if bad or (non_empty and not value):
        what = f"{'a non-empty list of ' if non_empty else ''}{metadata.get('noun', 'values')}"
        raise ValueError(f"config key {key} takes {what} from {choices}, got {bad or value}")


def _integral(value) -> bool:
    """An int, or a float holding one (int(.inf) and int(.nan) would raise their own errors)."""
    return isinstance(value, int) or (math.isfinite(value) and value.is_integer())


def _number(text: str):
    """YAML 1.1 reads 5e-5 as a string; numbers written that way are still numbers."""
    try:
        return float(text)
    except ValueError:
        return text
