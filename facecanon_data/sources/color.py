"""NeRSemble colour calibration: Cheung et al. 2004 polynomial colour correction in linear RGB.

``color_calibration.json`` maps each serial to a (3, terms) matrix applied to the augmented linear RGB
vector of every pixel; images are sRGB-encoded before and after.
"""
from __future__ import annotations

import numpy as np
from ..errors import InputValueError


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, None)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def augment_cheung2004(rgb: np.ndarray, terms: int) -> np.ndarray:
    """(N, 3) linear RGB -> (N, terms) polynomial expansion (Cheung 2004 term orders)."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    one = np.ones_like(r)
    table = {
        3: [r, g, b],
        4: [r, g, b, one],
        5: [r, g, b, r * g * b, one],
        7: [r, g, b, r * g, r * b, g * b, one],
        8: [r, g, b, r * g, r * b, g * b, r * g * b, one],
        10: [r, g, b, r * g, r * b, g * b, r * r, g * g, b * b, one],
        11: [r, g, b, r * g, r * b, g * b, r * r, g * g, b * b, r * g * b, one],
        14: [r, g, b, r * g, r * b, g * b, r * r, g * g, b * b, r * g * b, r ** 3, g ** 3, b ** 3, one],
    }
    if terms not in table:
        raise InputValueError(f"unsupported colour-correction term count {terms} (supported: {sorted(table)})")
    return np.stack(table[terms], 1)


def apply_color_correction(image: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> corrected (H, W, 3) uint8 sRGB with a (3, terms) matrix."""
    lin = srgb_to_linear(image.reshape(-1, 3).astype(np.float32) / 255.0)
    out = augment_cheung2004(lin, ccm.shape[1]) @ ccm.T.astype(np.float32)
    srgb = linear_to_srgb(out)
    return (np.clip(srgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(image.shape)
