"""Training checkpoints: what a run needs to resume bit for bit, written atomically, read safely.

A checkpoint (format CHECKPOINT_FORMAT) is a dict of tensors and plain values only (numbers,
strings, bools, None and lists/tuples/dicts of those; NumPy arrays go in as tensors) and is read
with `torch.load(weights_only=True)`: reading one runs no code. The Trainer stores models,
objective, optimiser, scheduler, every generator's state (`rng_state`), the step and its config.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..loading import bad_file, load_tensors
from .cache import replace_atomically

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: tensors and plain values only (format 1 pickled NumPy and Python RNG objects)


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (what torch.load(weights_only=True) reads)."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what rng_state returned."""
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def write_checkpoint(state: dict, path: Path) -> None:
    """torch.save of `state` (format CHECKPOINT_FORMAT added) through a partial file renamed onto `path`:
    a crash mid-write leaves the last checkpoint whole."""
    replace_atomically(Path(path), lambda partial: torch.save({"format": CHECKPOINT_FORMAT, **state}, partial))


def read_checkpoint(path, device="cpu") -> dict:
    """A checkpoint written by `write_checkpoint`, read with torch.load(weights_only=True).

    Only tensors and plain values are accepted, so reading a file from elsewhere (a shared output
    directory, a downloaded run) cannot run code.

    Args:
        path: the checkpoint file.
        device: where its tensors go (torch.load's map_location).

    Returns:
        The checkpoint's dict (format CHECKPOINT_FORMAT). Every failure (unreadable, truncated,
        unsafe, another format) is a ValueError naming the file and the way out.
    """
    way_out = "delete it (the run then starts from step 0) or set train.resume=false"
    state = load_tensors(path, "checkpoint", way_out, device)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise bad_file("checkpoint", path, f"is not a checkpoint of this pykd version (format {CHECKPOINT_FORMAT})",
                       way_out)
    return state
