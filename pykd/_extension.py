"""Loads the CPU extension pykd._C, building it just in time (ninja, cached) when it is missing."""
import functools
import os
from pathlib import Path

from . import _build_flags

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


class ExtensionUnavailableError(RuntimeError):
    """The C++ CPU kernels could neither be imported nor built."""


@functools.lru_cache(maxsize=None)
def cpu_extension():
    try:
        from . import _C
    except ImportError as import_error:
        return _build_just_in_time(import_error)
    return _C


def _build_just_in_time(import_error: ImportError):
    sources = _build_flags.extension_sources(_SOURCE_ROOT)
    if not sources:
        raise ExtensionUnavailableError(
            f"pykd._C is not installed ({import_error}) and the C++ sources are not beside the package "
            f"(looked in {_SOURCE_ROOT / 'csrc'}); reinstall with `pip install --no-build-isolation pykd-distill`"
        ) from import_error
    from torch.utils import cpp_extension

    build_dir = Path(os.environ.get("PYKD_BUILD_DIR", Path.home() / ".cache" / "pykd" / "build"))
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name="pykd_C",
            sources=[str(s) for s in sources],
            extra_cflags=_build_flags.compile_flags(),
            extra_ldflags=_build_flags.link_flags(),
            build_directory=str(build_dir),
        )
    except Exception as build_error:  # noqa: BLE001 - any compiler failure ends in the same advice
        raise ExtensionUnavailableError(
            f"pykd._C is not installed ({import_error}) and building it just in time failed: {build_error}. "
            "A C++17 compiler and ninja (`pip install ninja`) are needed."
        ) from build_error
