r"""Students of an architecture search: `Architecture` (all layers alike) and `LayerwiseArchitecture`.

An :class:`Architecture` is a student whose layers are all alike: ``layers`` transformer layers
of width ``hidden``, FFN width ``intermediate = round(hidden * ffn_ratio)`` and ``heads``
attention heads. A :class:`LayerwiseArchitecture` (HAT, Mixture-of-Supernets) gives each layer its
own heads and FFN ratio. Both read and write "key=value,..." strings and dicts; which spaces hold
them and what they cost is pykd.nas.space's.

Heads and head size. A stock transformers BERT (5.x) computes its head size as
``hidden_size / num_attention_heads`` and its attention width (the Q/K/V outputs) as
``hidden_size``; the ``pruned_heads`` config that once let a checkpoint carry fewer heads of a
fixed size is gone from transformers 5. AutoDistil's paper keeps the head size at the teacher's
(64), so its attention width ``heads * 64`` differs from ``hidden`` for most students (its own
11-layer/352/10-head student has width 640): such a student cannot be saved as a stock model, and
padding it into one changes LayerNorm statistics. pykd therefore defines a sub-network's
attention as the stock model does: width ``hidden``, ``heads`` heads of size ``hidden / heads``,
and keeps out of every space the architectures whose ``hidden`` is not divisible by ``heads``
(:class:`Architecture` refuses them). Every candidate exports to a stock model with identical
outputs; heads change neither parameters nor FLOPs, only how the attention width is split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FACTORS = ("layers", "hidden", "ffn_ratio", "heads")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, order=True)
class Architecture:
    """A student whose layers are all alike (AutoDistil's factors).

    Args:
        layers: number of transformer layers.
        hidden: hidden size (also the attention width).
        ffn_ratio: FFN width over hidden; the FFN width is ``round(hidden * ffn_ratio)``.
        heads: attention heads; must divide ``hidden`` (head size ``hidden / heads``).
    """

    layers: int
    hidden: int
    ffn_ratio: float
    heads: int

    def __post_init__(self):
        for name in ("layers", "hidden", "heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"architecture {name} must be a positive int, got {value!r}")
        object.__setattr__(self, "ffn_ratio", _check_ratio(self.ffn_ratio, "architecture"))
        if self.hidden % self.heads:
            raise ValueError(f"architecture hidden={self.hidden} is not divisible by heads={self.heads}: a stock "
                             f"transformers model splits its attention width (= hidden) into heads of size "
                             f"hidden / heads, so this architecture could not be exported (see pykd.nas.architecture)")
        if self.intermediate < 1:
            raise ValueError(f"architecture FFN width round(hidden * ffn_ratio) = {self.intermediate} must be >= 1 "
                             f"(hidden={self.hidden}, ffn_ratio={self.ffn_ratio})")

    @property
    def intermediate(self) -> int:
        """FFN width, round(hidden * ffn_ratio) (halves round up)."""
        return math.floor(self.hidden * self.ffn_ratio + 0.5)

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_heads(self) -> tuple:
        """Heads of each layer (all alike)."""
        return (self.heads,) * self.layers

    @property
    def layer_ffn(self) -> tuple:
        """FFN width of each layer (all alike)."""
        return (self.intermediate,) * self.layers

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in FACTORS}

    @classmethod
    def from_dict(cls, values: dict) -> Architecture:
        """From {"layers", "hidden", "ffn_ratio", "heads"}; unknown or missing keys raise ValueError."""
        if not isinstance(values, dict):
            raise TypeError(f"an architecture must be a dict of {FACTORS}, got {type(values).__name__}")
        unknown = sorted(set(values) - set(FACTORS))
        missing = [name for name in FACTORS if name not in values]
        if unknown or missing:
            raise ValueError(f"architecture keys must be exactly {', '.join(FACTORS)}: "
                             + "; ".join(filter(None, [f"unknown {unknown}" if unknown else "",
                                                       f"missing {missing}" if missing else ""])))
        return cls(**values)

    @classmethod
    def parse(cls, text: str) -> Architecture:
        """From "layers=4,hidden=256,ffn_ratio=3,heads=8" (the form str() writes)."""
        pairs = _key_value_pairs(text, "layers=4,hidden=256,ffn_ratio=3,heads=8")
        return cls.from_dict({key: _parse_number(key, value, text) for key, value in pairs.items()})

    def __str__(self) -> str:
        return f"layers={self.layers},hidden={self.hidden},ffn_ratio={self.ffn_ratio:g},heads={self.heads}"


def _key_value_pairs(text: str, example: str) -> dict[str, str]:
    """The key=value items of an architecture string (each key once), values unparsed."""
    pairs = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"cannot parse architecture {text!r}: expected key=value pairs such as "
                             f"{example!r}, got {item!r}")
        if key in pairs:
            raise ValueError(f"architecture {text!r} gives {key!r} twice")
        pairs[key] = value.strip()
    return pairs


def _parse_number(key: str, value: str, text: str):
    try:
        return float(value) if key == "ffn_ratio" else int(value)
    except ValueError:
        raise ValueError(f"architecture {text!r}: {key}={value!r} is not a number") from None


def _check_ratio(ratio, where: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"{where} ffn_ratio must be a positive number, got {ratio!r}")
    return float(ratio)


@dataclass(frozen=True, order=True)
class LayerwiseArchitecture:
    """A student whose layers may differ in heads and FFN ratio (HAT / Mixture-of-Supernets spaces).

    Args:
        hidden: hidden size shared by all layers (the residual stream).
        heads: heads of each layer; each must divide hidden.
        ffn_ratio: FFN ratio of each layer; layer i's FFN width is round(hidden * ffn_ratio[i]).
    The layer count is len(heads). str() gives "layers=3,hidden=256,heads=8/8/4,ffn_ratio=3/2/4".
    """

    hidden: int
    heads: tuple
    ffn_ratio: tuple

    def __post_init__(self):
        if not _is_int(self.hidden) or self.hidden < 1:
            raise ValueError(f"architecture hidden must be a positive int, got {self.hidden!r}")
        heads, ratios = tuple(self.heads), tuple(self.ffn_ratio)
        if not heads or len(heads) != len(ratios):
            raise ValueError(f"a per-layer architecture needs one heads and one ffn_ratio value per layer (at least "
                             f"one layer), got heads={heads} and ffn_ratio={ratios}")
        for index, value in enumerate(heads):
            if not _is_int(value) or value < 1:
                raise ValueError(f"architecture heads of layer {index} must be a positive int, got {value!r}")
            if self.hidden % value:
                raise ValueError(f"architecture hidden={self.hidden} is not divisible by heads={value} of layer "
                                 f"{index} (see pykd.nas.architecture: a stock model's head size is hidden / heads)")
        ratios = tuple(_check_ratio(r, f"architecture layer {i}") for i, r in enumerate(ratios))
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "ffn_ratio", ratios)
        if min(self.layer_ffn) < 1:
            raise ValueError(f"architecture FFN widths {self.layer_ffn} must be >= 1")

    @property
    def layers(self) -> int:
        return len(self.heads)

    @property
    def layer_heads(self) -> tuple:
        return self.heads

    @property
    def layer_ffn(self) -> tuple:
        return tuple(math.floor(self.hidden * r + 0.5) for r in self.ffn_ratio)

    def is_uniform(self) -> bool:
        return len(set(self.heads)) == 1 and len(set(self.ffn_ratio)) == 1

    def uniform(self) -> Architecture:
        """The equal Architecture when all layers are alike; ValueError naming what differs otherwise."""
        if not self.is_uniform():
            raise ValueError(f"architecture {self} has layers that differ (heads {self.heads}, ffn_ratio "
                             f"{self.ffn_ratio}); it has no uniform equivalent")
        return Architecture(self.layers, self.hidden, self.ffn_ratio[0], self.heads[0])

    def to_dict(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "heads": list(self.heads),
                "ffn_ratio": list(self.ffn_ratio)}

    @classmethod
    def from_dict(cls, values: dict) -> LayerwiseArchitecture:
        """From {"hidden", "heads": [...], "ffn_ratio": [...]} (an optional "layers" must equal len(heads))."""
        if not isinstance(values, dict):
            raise TypeError(f"a per-layer architecture must be a dict, got {type(values).__name__}")
        keys = {"hidden", "heads", "ffn_ratio"}
        unknown, missing = sorted(set(values) - keys - {"layers"}), sorted(keys - set(values))
        if unknown or missing:
            raise ValueError("per-layer architecture keys must be hidden, heads, ffn_ratio (and optionally layers): "
                             + "; ".join(filter(None, [f"unknown {unknown}" if unknown else "",
                                                       f"missing {missing}" if missing else ""])))
        heads, ratios = values["heads"], values["ffn_ratio"]
        if not isinstance(heads, (list, tuple)) or not isinstance(ratios, (list, tuple)):
            raise ValueError(f"per-layer heads and ffn_ratio must be lists, got {heads!r} and {ratios!r}")
        arch = cls(values["hidden"], tuple(heads), tuple(ratios))
        if "layers" in values and values["layers"] != arch.layers:
            raise ValueError(f"per-layer architecture says layers={values['layers']!r} but lists {arch.layers} layers")
        return arch

    @classmethod
    def parse(cls, text: str) -> LayerwiseArchitecture:
        """From "layers=3,hidden=256,heads=8/8/4,ffn_ratio=3/2/4" (layers optional)."""
        values = {}
        for key, value in _key_value_pairs(text, "hidden=256,heads=8/8/4,ffn_ratio=3/2/4").items():
            parts = [_parse_number(key, v.strip(), text) for v in value.split("/")]
            values[key] = parts if key in ("heads", "ffn_ratio") else parts[0] if len(parts) == 1 else parts
        return cls.from_dict(values)

    def __str__(self) -> str:
        return (f"layers={self.layers},hidden={self.hidden},heads={'/'.join(map(str, self.heads))},"
                f"ffn_ratio={'/'.join(f'{r:g}' for r in self.ffn_ratio)}")


def parse_architecture(text: str):
    """An Architecture, or a LayerwiseArchitecture when a value lists one entry per layer ("8/8/4")."""
    return LayerwiseArchitecture.parse(text) if "/" in str(text) else Architecture.parse(text)


def architecture_from_dict(values: dict):
    """An Architecture, or a LayerwiseArchitecture when heads is a list (as their to_dict write)."""
    if isinstance(values, dict) and isinstance(values.get("heads"), (list, tuple)):
        return LayerwiseArchitecture.from_dict(values)
    return Architecture.from_dict(values)
