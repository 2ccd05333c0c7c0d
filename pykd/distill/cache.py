"""pykd's on-disk cache, and the files several processes may write at once.

The cache root is $PYKD_CACHE, else $XDG_CACHE_HOME/pykd, else ~/.cache/pykd. It holds the fetched
corpora (wheels/, debian/: pykd.distill.corpora), augmented training sets (augment/:
pykd.distill.augment) and teacher logits (teacher/: pykd.distill.teacher_cache).

Concurrent writers (DDP ranks, HPO workers on one machine, parallel test runs) never see a torn
entry: a directory is built under an exclusive file lock in a scratch folder and published with one
rename (`publish_directory`), a file is written through a partial named for its process and thread
and renamed onto its path (`replace_atomically`).

A cached entry is named by a fingerprint of everything its values depend on; the digests here are
its pieces (model weights, a tokenizer's vocabulary, dataset rows).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import typing
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created when missing)."""
    root = os.environ.get("PYKD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pykd")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path):
    """Holds an exclusive lock on the file `path` (created when missing) for the block: processes that
    take the same lock run their blocks one after the other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_directory(build, target: Path) -> Path:
    """The directory `target`, built by build(scratch_folder) once and renamed into place.

    Under the lock target.with_suffix(".lock"): a process that waited for another's build finds the
    target and returns it; a build that fails (or a killed process) leaves no target behind.

    Returns:
        target.
    """
    target = Path(target)
    if target.is_dir():
        return target
    with file_lock(target.with_suffix(".lock")):
        if target.is_dir():  # another process finished it while we waited
            return target
        scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(scratch)
            os.replace(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def replace_atomically(path: Path, write) -> None:
    """write(partial), then rename the partial onto `path`: readers see the old file or the new one, never a
    torn one. The partial's name carries the process and thread, so writers of the same path (HPO workers
    summarising one study into one directory, trials filling one teacher cache) never rename each other's
    partial away; it keeps `path`'s suffix, which np.save and savefig go by."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---- the pieces of fingerprints ----

def model_digest(model) -> str:
    """sha256 of a module's state dict: every tensor's name and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's class and vocabulary (what it turns text into)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


def rows_digest(dataset, columns) -> str:
    """sha256 of a datasets.Dataset's values in those of `columns` it has, row order included."""
    present = [c for c in columns if c in dataset.column_names]
    return hashlib.sha256(json.dumps(dataset.select_columns(present)[:], sort_keys=True).encode()).hexdigest()


def key_digest(key: dict) -> str:
    """The fingerprint of a cached entry: 32 hex digits of sha256 over its (JSON) key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class DirectoryInUse(ValueError):
    """Another process holds the directory's lock (see DirectoryLock)."""


class DirectoryLock:
    """One writer per directory: a non-blocking exclusive lock (flock) on directory/.pykd.lock.

    Two `pykd distill` runs on one output directory once overwrote each other's checkpoint partials and
    interleaved log.jsonl; the second is now refused at once, naming the directory and the holder. The
    kernel drops the lock when its holder exits, however it dies (SIGKILL included), so a lock file left
    by a dead process locks nothing: the next run takes it over. The file holds the holder's pid, for the
    message. Within one process the lock is shared (counted): Trainers built one after another in a
    session or a test, or a step that builds a second one on the directory, are one writer's doing.

    Args:
        directory: the directory (created when missing).
        key: the config key naming it, for the message.
    """

    NAME = ".pykd.lock"
    _open: typing.ClassVar[dict] = {}  # this process's locks: resolved path -> [open file, holders]
    _guard: typing.ClassVar = threading.Lock()

    def __init__(self, directory, key: str):
        self.path, self.key = Path(directory) / self.NAME, key
        self.held = False

    def acquire(self) -> None:
        """Takes the lock (a no-op when this object holds it); DirectoryInUse when another process holds it."""
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        with self._guard:
            if key not in self._open:
                self._open[key] = [self._lock_file(), 0]
            self._open[key][1] += 1
        self.held = True

    def _lock_file(self):
        handle = open(self.path, "a+")  # noqa: SIM115 - held open past this method: the open file is the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DirectoryInUse(f"{self.key} {str(self.path.parent)!r} is in use by another pykd run (pid "
                                 f"{holder}): wait for it to end, or give this run another {self.key}") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def release(self) -> None:
        """Drops this object's hold; the last holder in the process unlocks (the file stays: removing it could
        race a run that is taking it)."""
        if not self.held:
            return
        key = str(self.path.resolve())
        with self._guard:
            entry = self._open[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                entry[0].close()
        self.held = False
