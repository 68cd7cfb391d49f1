"""A look at the labels: one stored view beside its depth map and its canonical map (``facecanon-data figure``).

Colours: depth with OpenCV's turbo map over the view's own label range (near = blue); canonical
positions map x, y, z linearly to red, green, blue over a fixed cube of +-``CANONICAL_HALF_EXTENT_M``
around FLAME's origin, so one canonical point has one colour in every view, timestamp and subject.
Pixels without a label are black.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CANONICAL_HALF_EXTENT_M = 0.12  # a FLAME head fits in +-12 cm of its canonical origin
FRONTAL_SERIAL = "222200037"


def depth_colors(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) metres + (H, W) bool -> (H, W, 3) uint8 RGB, turbo over the labelled range, black elsewhere."""
    import cv2

    out = np.zeros(depth.shape + (3,), np.uint8)
    if not mask.any():
        return out
    lo, hi = np.percentile(depth[mask], [1, 99])
    scaled = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    colored = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    out[mask] = colored[mask]
    return out


def canonical_colors(canonical: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) metres in canonical space + (H, W) bool -> (H, W, 3) uint8: x, y, z as red, green, blue."""
    scaled = np.clip(canonical.astype(np.float32) / (2 * CANONICAL_HALF_EXTENT_M) + 0.5, 0, 1)
    return np.where(mask[..., None], (scaled * 255 + 0.5).astype(np.uint8), 0).astype(np.uint8)


def label_figure(store: str | Path, subject: str | None = None, timestamp: int = 0, view: str | None = None,
                 scale: float = 0.5) -> tuple[np.ndarray, dict]:
    """(H, 3 W, 3) uint8 RGB: the stored view, its depth map and its canonical map side by side, resized
    by ``scale``; and what it shows (subject, sequence, frame, serial). ``view``: a serial (default the
    frontal camera when the subject has it, else the first)."""
    import cv2

    from .store import StoreError, subject_attrs, subject_readers, subjects

    names = subjects(store)
    if not names:
        raise StoreError(f"{store}: no committed subject")
    subject = subject or names[0]
    attrs = subject_attrs(store, subject)
    serials = attrs["serials"]
    serial = view or (FRONTAL_SERIAL if FRONTAL_SERIAL in serials else serials[0])
    if serial not in serials:
        raise StoreError(f"{store}: subject {subject} has no view {serial} (views: {', '.join(serials)})")
    if not 0 <= timestamp < len(attrs["timestamps"]):
        raise StoreError(f"{store}: subject {subject} has timestamps 0..{len(attrs['timestamps']) - 1}, not {timestamp}")
    readers = subject_readers(store, subject, names=("rgb", "depth", "canonical", "mask"))
    v = serials.index(serial)
    chunk = {k: r.read_chunk((timestamp, v) + (0,) * (len(r.shape) - 2))[0, 0] for k, r in readers.items()}
    panels = [chunk["rgb"], depth_colors(chunk["depth"], chunk["mask"]),
              canonical_colors(chunk["canonical"], chunk["mask"])]
    image = np.concatenate(panels, axis=1)
    if scale != 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    stamp = attrs["timestamps"][timestamp]
    return image, {"subject": subject, "sequence": stamp.get("sequence"), "frame": stamp.get("frame"),
                   "serial": serial, "timestamp": timestamp}
