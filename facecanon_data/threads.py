"""One thread budget per process, read by every pool and library call that can fan out.

``apply_thread_cap(n)`` (called by each stage with the pipeline's ``threads``; ``build`` also puts
``thread_env(n)`` in its worker processes' environment) caps torch, OpenCV, BLAS / OpenMP, FFmpeg's
decoder, the decode / PNG pools and open3d's ray casting and closest-point queries at ``n``; without a
cap every one of them uses all cores. A cap of 1 makes a process use one core (but see
``orchestration.run.PinWorkerCores`` for threads no setting reaches).
"""
from __future__ import annotations

import os
import sys

ENV = "FACECANON_THREADS"
_LIBRARY_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")


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


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps a process at ``threads`` from its start (empty for no cap)."""
    return {k: str(threads) for k in (ENV, *_LIBRARY_ENV)} if threads > 0 else {}


def apply_thread_cap(threads: int) -> None:
    """Cap this process at ``threads`` (0: leave the libraries' defaults). Libraries imported later read
    the environment; torch and OpenCV, if already imported, are told directly. Imports nothing heavy."""
    if threads <= 0:
        return
    os.environ.update(thread_env(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(threads)
