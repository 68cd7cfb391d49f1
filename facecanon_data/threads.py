"""One thread budget per process, read by every pool and library call that can fan out.

``apply_thread_cap(n)`` (called by each stage with the pipeline's ``threads``, and set through the
environment of ``build``'s worker processes) caps torch, OpenCV, the decode / PNG pools and open3d's ray
casting and closest-point queries at ``n``; without a cap every one of them uses all cores. A cap of 1
makes a worker use one core, which ``bench build`` relies on and bit-reproducible runs need.
"""
from __future__ import annotations

import os

ENV = "FACECANON_THREADS"


def thread_cap() -> int:
    """The cap, or 0 when there is none."""
    value = os.environ.get(ENV, "")
    return int(value) if value.isdigit() else 0


def pool_size(limit: int = 16) -> int:
    """Workers for a thread pool: the cap, else the cores (at most ``limit``)."""
    return max(1, min(limit, thread_cap() or os.cpu_count() or 1))


def open3d_threads() -> int:
    """``nthreads`` for open3d's RaycastingScene queries (0 = all cores, open3d's own default)."""
    return thread_cap()


def apply_thread_cap(threads: int) -> None:
    """Cap this process at ``threads`` (0: leave the libraries' defaults)."""
    if threads <= 0:
        return
    os.environ[ENV] = str(threads)
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
