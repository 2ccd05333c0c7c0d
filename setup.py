"""Builds the CPU extension pykd._C; everything else is declared in pyproject.toml."""
import importlib.util
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent


def _load_build_flags():
    # pykd/_build_flags.py is loaded by path: importing pykd here would need the extension it builds.
    spec = importlib.util.spec_from_file_location("_build_flags", ROOT / "pykd" / "_build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flags = _load_build_flags()

setup(
    ext_modules=[
        CppExtension(
            name="pykd._C",
            sources=[str(p.relative_to(ROOT)) for p in flags.extension_sources(ROOT)],
            extra_compile_args=flags.compile_flags(),
            extra_link_args=flags.link_flags(),
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
