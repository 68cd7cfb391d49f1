"""Foreground of a view from the still of the empty rig (NeRSemble v2's ``BACKGROUND`` plates).

Real releases ship no mattes: one still per camera of the studio without the subject. Per view:

1. **Difference** to the plate at two scales: per pixel, the largest channel difference of the images
   after a small blur (``blur_sigma_px``: sensor noise and codec blocks average out, an edge moves by
   under a pixel), and after a larger one (``coarse_sigma_px``), where a surface whose colour is close
   to the studio behind it (dark hair before a dark panel) still differs by a few levels, consistently.
2. **Robust per-camera threshold**: each scale's noise level is read off the view itself, as the median
   difference of the pixels that are surely studio (below the ``noise_quantile`` of the view: every
   view shows more studio than that). A connected region of weak difference (coarse scale, over
   ``low_sigmas`` noise levels) is kept when it holds a strong one (fine scale, ``high_sigmas``), with
   absolute floors for very clean plates: skin before a skin-coloured wall is kept through its edges.
3. **Clean-up**: closing, holes filled, components below ``min_component_fraction`` of the largest
   dropped.
4. **Refinement** (``refine = "grabcut"``): OpenCV GrabCut in a band of ``refine_band_px`` around the
   boundary, the rest fixed: the coarse scale leaves the boundary a few pixels wide of the subject.
   Chosen by measurement on the synthetic capture (docs/pipeline.md, "Foreground from the plates").

The torso is foreground (it is in front of the plate); head versus torso comes from the tracked head.
"""
from __future__ import annotations

import numpy as np

from .config import ForegroundConfig


def plate_difference(image: np.ndarray, plate: np.ndarray, blur_sigma_px: float) -> np.ndarray:
    """(H, W) float32 in [0, 1]: largest channel difference of (H, W, 3) uint8 ``image`` and ``plate``."""
    import cv2

    a = image.astype(np.float32) / 255.0
    b = plate.astype(np.float32) / 255.0
    if blur_sigma_px > 0:
        a = cv2.GaussianBlur(a, (0, 0), blur_sigma_px)
        b = cv2.GaussianBlur(b, (0, 0), blur_sigma_px)
    return np.abs(a - b).max(-1)


def foreground_from_plate(image: np.ndarray, plate: np.ndarray, cfg: ForegroundConfig) -> np.ndarray:
    """(H, W) bool foreground of ``image`` (H, W, 3) uint8 against its camera's ``plate`` (same size)."""
    import cv2
    import scipy.ndimage as ndi

    if image.shape != plate.shape:
        raise ValueError(f"image {image.shape} and background plate {plate.shape} differ in size")
    fine = plate_difference(image, plate, cfg.blur_sigma_px)
    # Weak evidence at a coarser scale: a surface whose colour is close to the studio behind it (dark
    # hair on a dark panel) differs by a few levels, under the codec's per-pixel noise but consistently.
    coarse = plate_difference(image, plate, cfg.coarse_sigma_px) if cfg.coarse_sigma_px > 0 else fine
    fine_noise = _noise_level(fine, cfg.noise_quantile)
    low = max(cfg.low_floor, cfg.low_sigmas * _noise_level(coarse, cfg.noise_quantile))
    high = max(cfg.high_floor, cfg.high_sigmas * fine_noise)
    weak, n = ndi.label(coarse > low)
    seeded = np.unique(weak[(fine > high) & (weak > 0)])
    mask = _close_and_fill(np.isin(weak, seeded) & (weak > 0), cfg.close_px)
    labels, n = ndi.label(mask)
    if n > 1:
        area = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(area >= cfg.min_component_fraction * area.max()) + 1
        mask = np.isin(labels, keep)
    if cfg.refine == "grabcut" and mask.any():
        mask = _grabcut(image, mask, cfg)
    elif cfg.refine == "trim" and mask.any():
        # The coarse scale spills a few pixels past the subject: in a band inside the boundary keep only
        # pixels that differ at the fine scale, then close and fill again.
        band = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.refine_band_px + 1,) * 2)
        core = cv2.erode(mask.astype(np.uint8), band) > 0
        mask = _close_and_fill(mask & (core | (fine > cfg.trim_sigmas * fine_noise)), cfg.close_px)
    elif cfg.refine not in ("none", "grabcut", "trim"):
        raise ValueError(f"foreground refine {cfg.refine!r}: choose 'none', 'grabcut' or 'trim'")
    return mask


def _noise_level(diff: np.ndarray, quantile: float) -> float:
    """A view's noise level at one scale: the median difference of its surely-studio pixels (those
    below ``quantile`` of the difference; every view shows more studio than that)."""
    quiet = diff[diff <= np.quantile(diff, quantile)]
    return float(np.median(quiet)) if quiet.size else 0.0


def _close_and_fill(mask: np.ndarray, close_px: int) -> np.ndarray:
    """Morphological closing (elliptic kernel of ``close_px``; none below 2), then holes filled."""
    import cv2
    import scipy.ndimage as ndi

    if close_px > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
    return ndi.binary_fill_holes(mask)


def _grabcut(image: np.ndarray, mask: np.ndarray, cfg: ForegroundConfig) -> np.ndarray:
    """GrabCut in a band of ``refine_band_px`` around the mask's boundary; sure labels elsewhere.
    Run on the bounding box of the band only (its cost grows with the pixels it is given)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    pad = 2 * cfg.refine_band_px + 2
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = _grabcut_crop(image[r0:r1, c0:c1], mask[r0:r1, c0:c1], cfg)
    return out


def _grabcut_crop(image: np.ndarray, mask: np.ndarray, cfg: ForegroundConfig) -> np.ndarray:
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.refine_band_px + 1,) * 2)
    m8 = mask.astype(np.uint8)
    inner, outer = cv2.erode(m8, kernel) > 0, cv2.dilate(m8, kernel) > 0
    gc = np.full(mask.shape, cv2.GC_BGD, np.uint8)
    gc[outer] = cv2.GC_PR_BGD
    gc[mask] = cv2.GC_PR_FGD
    gc[inner] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # GrabCut seeds its colour models by k-means++ from OpenCV's per-thread RNG: without a fixed seed a
    # view's mask depends on what ran before it on the same thread (IoU 0.990-0.991 on one view).
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), gc, None, bgd, fgd, cfg.grabcut_iterations,
                cv2.GC_INIT_WITH_MASK)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
