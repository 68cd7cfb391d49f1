"""Accelerator detection that imports nothing heavy and never initializes a framework."""
from __future__ import annotations

import ctypes
from functools import lru_cache


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or a device)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    return 0


def colmap_cuda_available() -> bool:
    """pycolmap built with CUDA *and* a device present (the CUDA wheel aborts without one)."""
    import pycolmap

    return bool(getattr(pycolmap, "has_cuda", False)) and cuda_device_count() > 0


def pick_torch_device(requested: str, key: str) -> str:
    """"auto" -> "cuda" when torch sees a device, else "cpu"; "cuda" without one is an error naming the
    config ``key`` that asked for it."""
    import torch

    from .errors import InputValueError

    if requested == "cuda" and not torch.cuda.is_available():
        raise InputValueError(f"{key} = cuda but torch sees no CUDA device")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested
