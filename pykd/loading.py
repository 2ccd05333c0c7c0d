"""One place for load errors: every file pykd reads goes through `reading` (or a reader built on it).

The files a user hands pykd, or that pykd wrote earlier and reads back, are run configs and HPO space
files (YAML), data files (CSV, JSON lines, text), training checkpoints and SuperLM files (torch), the
teacher-logit cache (NumPy), KD runs tables (CSV), study databases and journals (Optuna), and model
directories (transformers). Whatever the library underneath raises for a bad file (yaml's ScannerError,
torch's PytorchStreamReader RuntimeError or its weights-only UnpicklingError, NumPy's ValueError or
EOFError, zipfile's BadZipFile, json's JSONDecodeError, a UnicodeDecodeError, ...) becomes one
`LoadError`: a ValueError (exit code 2 on the command line) whose message names the file, what it
should hold and the way out. A reader that finds a well-formed file with the wrong contents (a missing
entry, the wrong shape, a NaN) raises `LoadError` itself, through `bad_file`.

No heavy imports: yaml and torch are imported by the readers that need them.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path


class LoadError(ValueError):
    """A file pykd reads is missing, unreadable, truncated, of another kind, or holds the wrong contents.

    Attributes:
        path: the file. what: what it should be ("checkpoint", "run config", ...). way_out: what to do.
    """

    def __init__(self, what: str, path, problem: str, way_out: str):
        self.what, self.path, self.way_out = what, Path(path), way_out
        super().__init__(f"{what} {path} {problem}; {way_out}")


def bad_file(what: str, path, problem: str, way_out: str) -> LoadError:
    """The error for a file that reads but holds the wrong contents (to raise)."""
    return LoadError(what, path, problem, way_out)


@contextlib.contextmanager
def reading(path, what: str, way_out: str):
    """Within the block, an exception raised while reading `path` becomes a LoadError naming it.

    Args:
        path: the file being read.
        what: what the file should be, as the message words it ("run config", "teacher-logit cache", ...).
        way_out: what the user can do about a bad copy ("delete it: it is recomputed", ...).
    """
    try:
        yield
    except LoadError:
        raise
    except Exception as error:  # noqa: BLE001 - every library raises its own types for a bad file
        raise load_error(error, path, what, way_out) from None


def load_error(error: Exception, path, what: str, way_out: str) -> LoadError:
    """The LoadError saying what `error`, raised while reading `path`, means for the user."""
    if isinstance(error, FileNotFoundError) and not Path(path).exists():  # else a file inside it is missing
        return LoadError(what, path, "does not exist", way_out)
    if isinstance(error, IsADirectoryError):
        return LoadError(what, path, "is a directory, not a file", way_out)
    if isinstance(error, PermissionError):
        return LoadError(what, path, "cannot be read (permission denied)", way_out)
    if isinstance(error, UnicodeDecodeError):
        return LoadError(what, path, f"is not UTF-8 text (undecodable byte at offset {error.start})", way_out)
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        reason = _first_line(str(error).split("WeightsUnpickler error:")[-1]).split(". ")[0]
        if reason.startswith(("Unsupported global", "Unsupported class")):
            return LoadError(what, path, f"holds objects other than tensors and plain values ({reason}); pykd does "
                             "not unpickle those, since that can run arbitrary code", way_out)
        return LoadError(what, path, f"is unreadable, truncated or not a valid {what} (UnpicklingError: {reason})",
                         way_out)
    return LoadError(what, path, f"is unreadable, truncated or not a valid {what} ({type(error).__name__}: "
                     f"{_first_line(error)})", way_out)


def _first_line(error) -> str:
    """The first line of an exception's message (torch's, yaml's and SQLAlchemy's run over several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def read_yaml(path, what: str, way_out: str):
    """The YAML document of the text file `path` (None for an empty one)."""
    import yaml

    with reading(path, what, way_out), open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_tensors(path, what: str, way_out: str, device="cpu"):
    """torch.load(path, weights_only=True): tensors and plain values only, so reading runs no code."""
    import torch

    with reading(path, what, way_out):
        return torch.load(path, map_location=device, weights_only=True)


def load_arrays(path, what: str, way_out: str, names: tuple[str, ...]) -> dict:
    """The arrays `names` of the .npz file `path`, read without unpickling (a missing one is a LoadError)."""
    import numpy as np

    with reading(path, what, way_out), np.load(path, allow_pickle=False) as archive:
        missing = [name for name in names if name not in archive.files]
        if missing:
            raise bad_file(what, path, f"lacks the array(s) {missing} (it has {sorted(archive.files)})", way_out)
        return {name: archive[name] for name in names}
