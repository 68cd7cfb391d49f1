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


# Cheung 2004 term orders, as products of the channels r=0, g=1, b=2 (an empty product is the constant 1).
_TERMS = {
    3: [(0,), (1,), (2,)],
    4: [(0,), (1,), (2,), ()],
    5: [(0,), (1,), (2,), (0, 1, 2), ()],
    7: [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), ()],
    8: [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2), ()],
    10: [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 0), (1, 1), (2, 2), ()],
    11: [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 0), (1, 1), (2, 2), (0, 1, 2), ()],
    14: [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 0), (1, 1), (2, 2), (0, 1, 2), (0, 0, 0), (1, 1, 1),
         (2, 2, 2), ()],
}


def augment_cheung2004(rgb: np.ndarray, terms: int) -> np.ndarray:
    """(N, 3) linear RGB -> (N, terms) polynomial expansion (Cheung 2004 term orders)."""
    return _augment_rows(np.ascontiguousarray(rgb.T), terms).T


def _augment_rows(rgb: np.ndarray, terms: int) -> np.ndarray:
    """(3, N) linear RGB -> (terms, N): channel-major, so every product runs over contiguous rows."""
    if terms not in _TERMS:
        raise InputValueError(f"unsupported colour-correction term count {terms} (supported: {sorted(_TERMS)})")
    out = np.empty((terms, rgb.shape[1]), rgb.dtype)
    for j, channels in enumerate(_TERMS[terms]):
        if not channels:
            out[j] = 1
            continue
        out[j] = rgb[channels[0]]
        for c in channels[1:]:
            out[j] *= rgb[c]
    return out


# Lookup tables (by hand: the two sRGB transfer functions are per-pixel powers, the slowest part of a
# correction; a uint8 input has 256 values and the output is quantized to uint8 anyway).
_TO_LINEAR = srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
_ENCODE_STEPS = 16384  # linear steps of the output table: under 0.25 of an 8-bit level even at sRGB's steepest
_TO_SRGB8 = (np.clip(linear_to_srgb(np.arange(_ENCODE_STEPS + 1) / _ENCODE_STEPS), 0, 1) * 255 + 0.5).astype(np.uint8)


def apply_color_correction_reference(image: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """:func:`apply_color_correction` in float arithmetic throughout (the definition; slow)."""
    lin = srgb_to_linear(image.reshape(-1, 3).astype(np.float32) / 255.0)
    out = augment_cheung2004(lin, ccm.shape[1]) @ ccm.T.astype(np.float32)
    srgb = linear_to_srgb(out)
    return (np.clip(srgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(image.shape)


def apply_color_correction(image: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> corrected (H, W, 3) uint8 sRGB with a (3, terms) matrix.

    Equal to :func:`apply_color_correction_reference` within one 8-bit level (tested), about an order of
    magnitude faster: decoding and encoding sRGB go through lookup tables.
    """
    import cv2

    h, w = image.shape[:2]
    lin = np.stack([cv2.LUT(channel, _TO_LINEAR).reshape(-1) for channel in cv2.split(image)])  # (3, N)
    out = ccm.astype(np.float32) @ _augment_rows(lin, ccm.shape[1])  # (3, N)
    out *= _ENCODE_STEPS
    out += 0.5
    np.clip(out, 0, _ENCODE_STEPS, out=out)
    index = out.astype(np.uint16)
    return cv2.merge([_TO_SRGB8[index[c]].reshape(h, w) for c in range(3)])


class ColorTable:
    """One camera's correction as an exact table over every 8-bit RGB value (2^24 entries, 64 MiB).

    Building it costs as much as correcting about 40 quarter-size frames arithmetically; a lookup then
    costs a few milliseconds per frame. Worth it for a camera read over many frames (``select`` reads the
    frontal camera over a whole capture); not for 16 cameras at a few timestamps. Entries come from
    :func:`apply_color_correction`, so both paths give identical images (tested).
    """

    BUILD_EQUIVALENT_FRAMES = 40

    def __init__(self, ccm: np.ndarray):
        levels = np.arange(256, dtype=np.uint8)
        rg = np.stack(np.meshgrid(levels, levels, indexing="xy"), -1).reshape(1, -1, 2)  # r fastest, then g
        packed = np.empty((256, 65536), "<u4")
        for b in range(256):
            rgb = np.concatenate([rg, np.full((1, 65536, 1), b, np.uint8)], -1)
            out = apply_color_correction(rgb, ccm)[0].astype(np.uint32)  # (65536, 3)
            packed[b] = out[:, 0] | (out[:, 1] << 8) | (out[:, 2] << 16)
        self._packed = packed.reshape(-1)  # [r | g << 8 | b << 16] -> corrected r | g << 8 | b << 16

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 sRGB -> corrected (H, W, 3) uint8 sRGB."""
        import cv2

        h, w = image.shape[:2]
        n = h * w
        padded = np.empty(3 * n + 1, np.uint8)  # one byte more: the last pixel's 4-byte read stays inside
        padded[:-1] = image.reshape(-1)
        # Pixel k's bytes r, g, b (and the next pixel's r) read as one little-endian word: its index.
        words = np.ndarray((n,), dtype="<u4", buffer=padded, strides=(3,))
        corrected = self._packed[words & np.uint32(0xFFFFFF)]
        return cv2.cvtColor(corrected.view(np.uint8).reshape(h, w, 4), cv2.COLOR_RGBA2RGB)
