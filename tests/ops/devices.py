"""Where the Triton path runs in this session."""
import torch


def triton_device() -> str:
    """Where the Triton path runs in this session: the GPU, or CPU tensors under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
