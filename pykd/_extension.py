"""Loads the CPU extension pykd._C, building it just in time (ninja, cached) when it cannot be imported.

The compiled pykd._C can be missing (a source-only copy) or fail to load: most often torch was
upgraded after pykd was installed and the extension no longer matches its ABI ("undefined
symbol"). Then the C++ sources are compiled into the cache: an installed pykd ships them as package
data in pykd/csrc, a checkout (and an editable install) keeps them in csrc/ beside the package.
The cache, PYKD_BUILD_DIR (default ~/.cache/pykd/build), holds one build per torch version,
Python version, vector ISA and source text, so an upgrade rebuilds instead of loading a stale build.
"""
import contextlib
import functools
import hashlib
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

from . import _build_flags

_PACKAGE_DIR = Path(__file__).resolve().parent
# Where a `csrc/` directory is looked for: inside the installed package, then beside it (checkout).
_SOURCE_ROOTS = (_PACKAGE_DIR, _PACKAGE_DIR.parent)
_JIT_NAME = "pykd_C"


class ExtensionUnavailableError(RuntimeError):
    """The C++ CPU kernels could neither be imported nor built."""


@functools.cache
def cpu_extension():
    """The loaded C++ extension: pykd._C, or a just-in-time build of the same sources."""
    try:
        from . import _C
    except ImportError as import_error:
        return _build_just_in_time(import_error)
    return _C


def extension_sources() -> list[Path]:
    """The C++ sources of the extension, from the first of `_SOURCE_ROOTS` that has them."""
    for root in _SOURCE_ROOTS:
        sources = _build_flags.extension_sources(root)
        if sources:
            return sources
    return []


def build_directory(sources: list[Path]) -> Path:
    """The cache directory of a just-in-time build of `sources` for this torch, Python and ISA.

    Args:
        sources: the .cpp files; their text and that of the headers beside them is part of the key.

    Returns:
        PYKD_BUILD_DIR (default ~/.cache/pykd/build) / "torch-<version>-py<major><minor>-<ISA>-<hash>".
    """
    import torch

    base = Path(os.environ.get("PYKD_BUILD_DIR") or Path.home() / ".cache" / "pykd" / "build")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"torch-{torch.__version__}-{python}-{_build_flags.cpu_capability()}-{_source_digest(sources)}"
    return base / key.replace("+", "_")


def _source_digest(sources: list[Path]) -> str:
    files = sorted({*sources, *(header for s in sources for header in s.parent.glob("*.h"))})
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(_build_flags.compile_flags() + _build_flags.link_flags()).encode())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs `ninja` from PATH; an environment used without activation has it only in the
    `ninja` Python package's bin directory."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:
        yield  # torch reports that ninja is missing
        return
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, previous])
    try:
        yield
    finally:
        os.environ["PATH"] = previous


def _build_just_in_time(import_error: ImportError):
    sources = extension_sources()
    if not sources:
        looked_in = ", ".join(str(root / "csrc") for root in _SOURCE_ROOTS)
        raise ExtensionUnavailableError(
            f"pykd._C is not installed or does not load ({import_error}) and the C++ sources are not "
            f"beside the package (looked in {looked_in}); reinstall with "
            "`pip install --no-build-isolation pykd-distill`"
        ) from import_error
    from torch.utils import cpp_extension

    build_dir = build_directory(sources)
    if not (build_dir / f"{_JIT_NAME}.so").exists():
        warnings.warn(f"pykd._C does not load ({import_error}); building the C++ kernels into {build_dir} "
                      "(once per torch version; reinstall pykd to skip this)", RuntimeWarning, stacklevel=3)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _ninja_on_path():
            return cpp_extension.load(
                name=_JIT_NAME,
                sources=[str(s) for s in sources],
                # setup.py's ninja build quotes each flag for the shell; the JIT build does not, and
                # -DPYKD_CPU_CAPABILITY="AVX2" would lose its quotes.
                extra_cflags=[shlex.quote(flag) for flag in _build_flags.compile_flags()],
                extra_ldflags=_build_flags.link_flags(),
                build_directory=str(build_dir),
            )
    except Exception as build_error:  # any compiler failure ends in the same advice
        raise ExtensionUnavailableError(
            f"pykd._C is not installed or does not load ({import_error}) and building it just in time in "
            f"{build_dir} failed: {build_error}. A C++17 compiler and ninja (`pip install ninja`) are needed."
        ) from build_error
