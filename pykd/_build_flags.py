"""Compiler flags of the CPU extension, shared by setup.py and the just-in-time build.

The fused loops use ATen's Vectorized<float>, whose width is chosen at compile time, so the
extension is compiled for the vector ISA that torch itself selected on this machine.
"""
from pathlib import Path

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


def cpu_capability() -> str:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def compile_flags() -> list[str]:
    capability = cpu_capability()
    return [
        "-O3",
        "-fopenmp",  # ATen's parallel_for is header code that runs serially without it
        f"-DCPU_CAPABILITY={capability}",
        f'-DPYKD_CPU_CAPABILITY="{capability}"',
        *_ISA_FLAGS.get(capability, []),
    ]


def link_flags() -> list[str]:
    return ["-fopenmp"]


def extension_sources(root: Path) -> list[Path]:
    return sorted((root / "csrc").glob("*.cpp"))
