"""A capture shaped like NeRSemble v2's frame size and colour calibration, made from a synthetic one.

Rendering 16 cameras at 2200 x 3208 is far too slow for a benchmark, and ``select`` reads only the
frontal camera, so this writes a one-camera capture: the frontal videos upscaled to the real frame size,
its intrinsics scaled to match, and a ``color_calibration.json`` with a non-trivial polynomial CCM, so
decoding and colour correction cost what they cost on the real release.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..sources.base import CaptureSource
from ..sources.video import VideoWriter

REAL_SIZE = (2200, 3208)  # (width, height) of NeRSemble v2's full-size frames


def example_ccm(terms: int = 11, seed: int = 0) -> np.ndarray:
    """(3, terms) Cheung-2004 colour matrix near identity: a per-channel gain, cross-talk and small
    higher-order terms, of the size real per-camera calibrations have."""
    rng = np.random.default_rng(seed)
    ccm = np.zeros((3, terms))
    ccm[:, :3] = np.diag([1.06, 0.97, 1.03]) + rng.normal(0, 0.02, (3, 3))
    ccm[:, 3:] = rng.normal(0, 0.01, (3, terms - 3))
    return ccm


def write_real_size_frontal_capture(source: CaptureSource, subject: str, serial: str, out: str | Path,
                                    size: tuple[int, int] = REAL_SIZE, frames_per_sequence: int | None = None,
                                    ccm_terms: int = 11) -> Path:
    """Write ``{out}/{subject}/`` holding camera ``serial`` only, every performance sequence upscaled to
    ``size`` (width, height), plus a colour calibration. Returns the capture root ``out``.

    Args:
        frames_per_sequence: frames written per sequence (None: the source's count). Fewer takes the
            first ones; more plays the source forwards and backwards (motion stays continuous), since a
            real sequence has hundreds of frames where the embedded capture has tens.
    """
    out = Path(out)
    calib = out / subject / "calibration"
    calib.mkdir(parents=True, exist_ok=True)
    cam = source.cameras(subject)[serial]
    k = cam.K.copy()
    k[0] *= size[0] / cam.width
    k[1] *= size[1] / cam.height
    (calib / "camera_params.json").write_text(json.dumps(
        {"world_2_cam": {serial: cam.world_2_cam.tolist()}, "intrinsics": k.tolist()}))
    (calib / "color_calibration.json").write_text(json.dumps({serial: example_ccm(ccm_terms).tolist()}))
    import cv2

    for seq in source.sequences(subject):
        n = source.num_frames(subject, seq)
        frames = [cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
                  for _, img in source.frames(subject, seq, serial, range(min(n, frames_per_sequence or n)))]
        writer = VideoWriter(out / subject / "sequences" / seq / "images" / f"cam_{serial}.mp4", *size)
        try:
            for i in _ping_pong(len(frames), frames_per_sequence or n):
                writer.write(frames[i])
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return out


def _ping_pong(n: int, count: int) -> list[int]:
    """``count`` indices into ``n`` frames: 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ..."""
    if n == 1:
        return [0] * count
    cycle = list(range(n)) + list(range(n - 2, 0, -1))
    return [cycle[i % len(cycle)] for i in range(count)]
