"""Extra peak memory of one fwd+bwd call, measured in a fresh process.

    python bench/peak_memory.py OP VARIANT SIZE...  ->  prints MiB
    (OP "relation": B A_r d_r L;  OP "mi": n e;  OP "routed": tokens d f E neuron_wise;
     OP "vocab": N V d;  OP "kd" with VARIANT pykd|peers: batch length;
     OP "mlm" with VARIANT pykd|eager|eager_selected: batch length)

Inputs are built and the step is run once (compiling, warming caches); then the kernel's
high-water mark is reset (/proc/self/clear_refs) and the step runs again: the growth of
VmHWM over the resident size before that call is the step's extra peak memory. Run with
MALLOC_MMAP_THRESHOLD_ fixed so freed blocks return to the system between the two calls.
"""
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import step_for


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def extra_peak_mib(step) -> float:
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_mib("VmRSS")
    step()
    return _status_mib("VmHWM") - before


def main() -> None:
    op, variant, case = sys.argv[1], sys.argv[2], tuple(map(int, sys.argv[3:]))
    print(f"{extra_peak_mib(step_for(op, variant, case)):.2f}")


if __name__ == "__main__":
    main()
