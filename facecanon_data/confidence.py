"""Per-pixel label confidence: how far a stored label can be trusted, from what the pipeline itself knows.

Three pieces of evidence per labelled pixel, each a factor in (0, 1]:

- **surface**: the distance ``s`` of the pixel's reconstructed point to the tracked mesh. A point on the
  surface takes the deformation of the surface under it; one far from it (hair strands, noise) takes its
  nearest surface point's, which is only an approximation. Factor ``exp(-s² / 2σs²)``.
- **cross-view**: the pixel's canonical label against the labels that nearby cameras store for the same
  surface point (reprojected by depth, matched within the depth tolerance, points other than the pixel's
  own). Mean canonical distance ``x`` over the neighbours that see it; factor ``exp(-x² / 2σx²)``, and a
  pixel no neighbour can check counts as disagreeing by ``σx``.
- **observers**: how many cameras observed the reconstructed point, ``n``; factor ``min(1, n / n0)``.

Their product is the confidence; the store keeps it as ``uint8`` levels (``round(255 c)``, at least 1 on
a labelled pixel, 0 where there is no label). Pure functions of arrays; ``render`` calls them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVELS = 255  # stored confidence = round(LEVELS * c); 0 = no label


@dataclass(frozen=True)
class ConfidenceScales:
    """The evidence's scales (``render.confidence_*`` in the pipeline config)."""

    surface_mm: float  # σs
    cross_view_mm: float  # σx
    observers: int  # n0


def camera_centre(camera) -> np.ndarray:
    """(3,) world position of a camera's centre, metres."""
    return -camera.world_2_cam[:3, :3].T @ camera.world_2_cam[:3, 3]


def nearest_cameras(serials: list[str], cameras: dict, count: int) -> dict[str, list[str]]:
    """Per serial, the ``count`` other serials whose camera centres are nearest (nearest first)."""
    centre = {s: camera_centre(cameras[s]) for s in serials}
    return {s: [b for _, b in sorted((float(np.linalg.norm(centre[b] - centre[s])), b) for b in serials if b != s)
                ][:count] for s in serials}


def reprojected_labels(maps, cameras: dict, a: int, b: int, ys: np.ndarray, xs: np.ndarray, tol_m: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The label view ``b`` stores for the surface points under pixels (ys, xs) of view ``a``.

    ``maps`` holds serials, depth (V, H, W) m, canonical (V, H, W, 3), mask (V, H, W) and index (V, H, W)
    point ids (``render.ViewMaps``). Each pixel is lifted by its depth, projected into ``b`` and matched to
    the labelled pixel of b's 3x3 neighbourhood nearest to the projection (pixel centres; ties to the first
    in row order) among those whose depth agrees with the point's within ``tol_m`` and that show a
    *different* reconstructed point (a point shared by both views agrees trivially).
    Returns (P,) bool found and (P, 3) float64 canonical labels of the matches (zero where not found)."""
    ca, cb = cameras[maps.serials[a]], cameras[maps.serials[b]]
    z = maps.depth[a][ys, xs]
    pix = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
    cam_pts = (pix @ np.linalg.inv(ca.K).T) * z[:, None]
    world = (cam_pts - ca.world_2_cam[:3, 3]) @ ca.world_2_cam[:3, :3]
    uv, zb = cb.project(world)
    w, h = cb.width, cb.height
    point_b = np.where(maps.mask[b], maps.index[b], -1).ravel()  # flat lookups: one take per pass and array
    depth_b = maps.depth[b].ravel()
    best = np.full(len(world), np.inf)  # squared pixel distance of the best candidate so far
    best_pixel = np.zeros(len(world), np.int64)
    own = maps.index[a][ys, xs]
    centre = np.floor(uv + 0.5).astype(np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            px, py = centre[:, 0] + dx, centre[:, 1] + dy
            ok = (px >= 0) & (px < w) & (py >= 0) & (py < h) & (zb > 0)
            flat = np.where(ok, py * w + px, 0)
            point = np.take(point_b, flat)
            valid = ok & (point >= 0) & (point != own) & (np.abs(np.take(depth_b, flat) - zb) < tol_m)
            dist = (px - uv[:, 0]) ** 2 + (py - uv[:, 1]) ** 2
            better = valid & (dist < best)
            best[better] = dist[better]
            best_pixel[better] = flat[better]
    found = np.isfinite(best)
    label = np.zeros((len(world), 3))
    label[found] = maps.canonical[b].reshape(-1, 3)[best_pixel[found]]
    return found, label


def cross_view_disagreement_mm(maps, cameras: dict, neighbours: dict[str, list[str]], tol_m: float) -> np.ndarray:
    """(V, H, W) float32: per labelled pixel, the mean canonical distance (mm) to the labels its neighbour
    views store for the same surface point (:func:`reprojected_labels`); NaN where no neighbour sees it or
    the pixel has no label."""
    out = np.full(maps.mask.shape, np.nan, np.float32)
    index_of = {s: i for i, s in enumerate(maps.serials)}
    for a, serial in enumerate(maps.serials):
        ys, xs = np.nonzero(maps.mask[a])
        if not len(ys):
            continue
        total, count = np.zeros(len(ys)), np.zeros(len(ys))
        own = maps.canonical[a][ys, xs].astype(np.float64)
        for other in neighbours.get(serial, []):
            found, label = reprojected_labels(maps, cameras, a, index_of[other], ys, xs, tol_m)
            total[found] += np.linalg.norm(label[found] - own[found], axis=1) * 1000
            count[found] += 1
        checked = count > 0
        out[a][ys[checked], xs[checked]] = total[checked] / count[checked]
    return out


def label_confidence(mask: np.ndarray, surface_mm: np.ndarray, disagreement_mm: np.ndarray, observers: np.ndarray,
                     scales: ConfidenceScales) -> np.ndarray:
    """(…, H, W) float32 confidence in [0, 1] (module docstring); 0 where ``mask`` is false.

    mask bool; surface_mm float (distance of the pixel's point to the tracked surface); disagreement_mm
    float, NaN = unchecked; observers int (cameras that observed the point); all of one shape."""
    mask = np.asarray(mask, bool)
    s = np.asarray(surface_mm, np.float64)[mask] / scales.surface_mm
    x = np.nan_to_num(np.asarray(disagreement_mm, np.float64)[mask], nan=scales.cross_view_mm) / scales.cross_view_mm
    seen = np.minimum(1.0, np.asarray(observers, np.float64)[mask] / scales.observers)
    out = np.zeros(mask.shape, np.float32)
    out[mask] = np.exp(-0.5 * (s * s + x * x)) * seen
    return out


def to_levels(confidence: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Stored form: uint8 ``round(255 c)``, at least 1 where labelled, 0 elsewhere."""
    levels = np.clip(np.rint(confidence * LEVELS), 1, LEVELS).astype(np.uint8)
    return np.where(mask, levels, 0).astype(np.uint8)


def from_levels(levels: np.ndarray) -> np.ndarray:
    """float32 confidence in [0, 1] from stored levels."""
    return np.asarray(levels, np.float32) * np.float32(1 / LEVELS)  # the loader's conversion, bit for bit
