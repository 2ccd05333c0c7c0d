"""Teacher-to-student layer mappings (Distiller's layer-mapping stage).

Hidden states are numbered as transformers returns them: 0 is the embedding output, i >= 1
the output of layer i. Attention layers are numbered 0 .. n-1. With S student and T teacher
layers:

    skip      hidden i <-> floor(i T / S),        attention i <-> floor((i + 1) T / S) - 1
    uniform   hidden i <-> round(i T / S),        attention i <-> round((i + 1) T / S) - 1
    last      hidden S <-> T,                     attention S - 1 <-> T - 1
    pairs     the explicit [[student, teacher], ...] list given

skip is Distiller's (and PKD's) mapping; uniform spreads the student over the teacher with
rounding instead of flooring (the same as skip when S divides T). include_embeddings adds the
pair (0, 0) to a hidden-state mapping.
"""
from __future__ import annotations

MAPPINGS = ("skip", "uniform", "last", "pairs")


def _pick(kind: str, position: int, student_layers: int, teacher_layers: int) -> int:
    exact = position * teacher_layers / student_layers
    return int(exact) if kind == "skip" else int(round(exact))


def _checked_pairs(pairs, student_count: int, teacher_count: int, what: str) -> list[tuple[int, int]]:
    checked = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"layer pairs must be [student, teacher], got {pair!r}")
        student, teacher = int(pair[0]), int(pair[1])
        if not (0 <= student < student_count and 0 <= teacher < teacher_count):
            raise ValueError(f"{what} pair {pair!r} is out of range: the student has {student_count} and the "
                             f"teacher {teacher_count} {what} entries")
        checked.append((student, teacher))
    return checked


def hidden_pairs(kind: str, student_layers: int, teacher_layers: int, pairs=None,
                 include_embeddings: bool = False) -> list[tuple[int, int]]:
    """(student, teacher) indices into the hidden-state tuples (0 = embeddings)."""
    _check_kind(kind, pairs)
    if kind == "pairs":
        return _checked_pairs(pairs, student_layers + 1, teacher_layers + 1, "hidden-state")
    if kind == "last":
        mapped = [(student_layers, teacher_layers)]
    else:
        mapped = [(i, _pick(kind, i, student_layers, teacher_layers)) for i in range(1, student_layers + 1)]
    return ([(0, 0)] if include_embeddings else []) + mapped


def attention_pairs(kind: str, student_layers: int, teacher_layers: int, pairs=None) -> list[tuple[int, int]]:
    """(student, teacher) attention-layer indices (0 = first layer)."""
    _check_kind(kind, pairs)
    if kind == "pairs":
        return _checked_pairs(pairs, student_layers, teacher_layers, "attention-layer")
    if kind == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    return [(i, _pick(kind, i + 1, student_layers, teacher_layers) - 1) for i in range(student_layers)]


def _check_kind(kind: str, pairs) -> None:
    if kind not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {kind!r}")
    if (kind == "pairs") != (pairs is not None):
        raise ValueError("layer pairs are given exactly when mapping is 'pairs'")
