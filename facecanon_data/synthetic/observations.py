"""Tracking observations generated from the synthetic head: the input of ``bench track`` and of the
tracker's tests, with the exact ground truth beside them (no capture or earlier stage needed)."""
from __future__ import annotations

import numpy as np

from ..config import PipelineConfig
from ..meshes import barycentric_interpolate, cast_camera_rays, raycasting_scene
from ..stages.track import TimestampObservation


def synthetic_observations(cfg: PipelineConfig, num_timestamps: int = 8, seed: int = 0,
                           points_per_timestamp: int = 3000, point_noise_mm: float = 0.2,
                           landmark_noise_px: float = 1.0, max_view_angle_deg: float = 60.0,
                           identity_offset_mm: float = 1.5, identity_offset_width_mm: tuple[float, float] = (20, 40)):
    """Observations of random synthetic timestamps as ``reconstruct`` + MediaPipe would give them.

    Points: surface points visible from the 16 cameras (ray cast on a pixel grid), with Gaussian
    noise. Landmarks: the embedded landmarks projected into every view that sees the face within
    ``max_view_angle_deg`` (FaceMesh fails beyond), with Gaussian noise in px. The identity's static
    offsets: bumps up to ``identity_offset_mm`` over ``identity_offset_width_mm`` (larger and wider ones
    put the head outside the model's space).
    Returns (observations, ground truth {"vertices": (T, V, 3), "params": dict, "shape", "offsets"}).
    """
    import torch

    from ..flame.assets import load_assets
    from ..flame.lbs import FlameLayer, FlameParams
    from .performance import random_identity, random_performance
    from .rig import nersemble_like_rig

    assets = load_assets(cfg.flame)
    model, emb = assets.model, assets.embedding
    rng = np.random.default_rng(seed)
    ident = random_identity(rng, model.v_template, model.num_shape, identity_offset_mm / 1000,
                            (identity_offset_width_mm[0] / 1000, identity_offset_width_mm[1] / 1000))
    perf = random_performance(rng, num_timestamps * 6, model.num_expression, head_sequence=True,
                              max_yaw_deg=cfg.synth.max_yaw_deg)
    pick = np.sort(rng.choice(num_timestamps * 6, num_timestamps, replace=False))
    arrays = {k: v[pick] for k, v in perf.as_dict().items()}
    params = FlameParams.from_numpy({**arrays, "shape": ident.shape, "offsets": ident.offsets})
    with torch.no_grad():
        verts = FlameLayer(model)(params).numpy().astype(np.float64)
    s = cfg.synth
    down = cfg.capture.downscale
    cams = {c.serial: c.scaled(down) for c in nersemble_like_rig(s.width, s.height, s.focal, s.camera_distance)}
    obs = []
    for i in range(num_timestamps):
        pts = []
        for cam in cams.values():
            depth, tri, bary = cast_camera_rays(raycasting_scene(verts[i], model.faces), cam)
            hit = tri[::6, ::6] >= 0
            t, b = tri[::6, ::6][hit], bary[::6, ::6][hit]
            pts.append(barycentric_interpolate(verts[i], model.faces, t, b))
        pts = np.concatenate(pts)
        pts = pts[rng.choice(len(pts), min(points_per_timestamp, len(pts)), replace=False)]
        pts = pts + rng.normal(0, point_noise_mm / 1000, size=pts.shape)
        lmk3d = emb.points(verts[i], model.faces)
        head_dir = verts[i][1] - verts[i].mean(0)  # nose tip direction from the head centre
        head_dir /= np.linalg.norm(head_dir)
        lms = {}
        for serial, cam in cams.items():
            to_cam = cam.center - verts[i][1]
            if np.degrees(np.arccos(np.clip(head_dir @ to_cam / np.linalg.norm(to_cam), -1, 1))) > max_view_angle_deg:
                continue
            uv, _ = cam.project(lmk3d)
            lms[serial] = uv + rng.normal(0, landmark_noise_px, size=uv.shape)
        obs.append(TimestampObservation("SYN", int(pick[i]), pts, cams, lms))
    return obs, {"vertices": verts, "params": arrays, "shape": ident.shape, "offsets": ident.offsets}
