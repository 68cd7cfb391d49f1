"""How alike the cameras of a rig see the same surface point: the figure a colour calibration improves.

On a capture with ground truth (the embedded synthetic capture), each head pixel of a reference camera is
lifted to its true 3-D point (the ground-truth depth along its ray), projected into every other camera,
kept where that camera sees the same point (its ground-truth depth agrees within ``visibility_mm``), and
the two colours are compared. The renderer's shading does not depend on the view, so on that capture
what remains is the per-camera response, sensor noise and resampling; a correction that undoes the
responses leaves the last two.
"""
from __future__ import annotations

import numpy as np


def cross_view_color_difference(source, subject: str, sequence: str, frame: int, downscale: float,
                                reference: str, max_points: int = 20000, visibility_mm: float = 2.0,
                                seed: int = 0) -> dict:
    """Colour differences between ``reference`` and every other camera at shared surface points.

    Returns ``points`` (reference pixels sampled), ``pairs`` (point, camera) seen by both,
    ``delta_e_median`` / ``delta_e_p90`` (CIE 1976 Lab distance), ``rgb_distance_median`` (8-bit
    levels, Euclidean over RGB) and ``bias_levels_mean``: per camera the median signed difference of
    each channel (its systematic offset against the reference, in 8-bit levels), its norm averaged over
    cameras. Frames are read through ``source`` exactly as the pipeline reads them (colour-corrected or
    not, as the source is configured).
    """
    import cv2
    from skimage.color import rgb2lab

    gt = source.ground_truth(subject)
    if gt is None:
        raise ValueError(f"subject {subject}: no ground truth (the cross-view colour figure needs the true surface)")
    cameras = source.cameras(subject, sequence, downscale)
    images = source.timestamp(subject, sequence, frame, downscale)
    ref_cam = cameras[reference]
    ref_maps = gt.view_maps(sequence, frame, reference, downscale)
    ys, xs = np.nonzero(ref_maps["mask"] & (ref_maps["depth"] > 0))
    rng = np.random.default_rng(seed)
    if len(ys) > max_points:
        pick = np.sort(rng.choice(len(ys), max_points, replace=False))
        ys, xs = ys[pick], xs[pick]
    centre, directions = ref_cam.pixel_rays()
    points = centre + directions[ys, xs] * ref_maps["depth"][ys, xs, None]  # (N, 3) world, metres
    ref_rgb = images[reference][ys, xs].astype(np.float32)  # (N, 3) levels
    seen_ref, seen_other, per_camera_bias = [], [], []
    for serial, cam in cameras.items():
        if serial == reference:
            continue
        uv, z = cam.project(points)
        depth = gt.view_maps(sequence, frame, serial, downscale)["depth"]
        col, row = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
        inside = (z > 0) & (col >= 0) & (row >= 0) & (col < cam.width) & (row < cam.height)
        visible = np.zeros(len(points), bool)
        visible[inside] = np.abs(depth[row[inside], col[inside]] - z[inside]) < visibility_mm * 1e-3
        if visible.sum() < 20:
            continue
        maps = uv[visible].astype(np.float32).reshape(-1, 1, 2)
        other = cv2.remap(images[serial].astype(np.float32), maps[..., 0], maps[..., 1], cv2.INTER_LINEAR)[:, 0]
        seen_ref.append(ref_rgb[visible])
        seen_other.append(other)
        per_camera_bias.append(float(np.linalg.norm(np.median(other - ref_rgb[visible], axis=0))))
    if not seen_ref:
        raise ValueError(f"subject {subject}, {sequence}/{frame}: no camera shares a surface point with {reference}")
    a, b = np.concatenate(seen_ref), np.concatenate(seen_other)
    delta_e = np.linalg.norm(rgb2lab(a[None] / 255.0)[0] - rgb2lab(np.clip(b, 0, 255)[None] / 255.0)[0], axis=1)
    return {"points": int(len(points)), "pairs": int(len(a)), "cameras": len(per_camera_bias),
            "delta_e_median": round(float(np.median(delta_e)), 3),
            "delta_e_p90": round(float(np.percentile(delta_e, 90)), 3),
            "rgb_distance_median": round(float(np.median(np.linalg.norm(a - b, axis=1))), 3),
            "bias_levels_mean": round(float(np.mean(per_camera_bias)), 3)}
