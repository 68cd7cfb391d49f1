"""The torch multi-view stereo backend (``reconstruct.dense = "torch"``): its geometry on a hand-made
textured plane, its choices, and the whole dense path on the synthetic capture against ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facecanon_data.cameras import Camera
from facecanon_data.config import ConfigError, MvsConfig, load_pipeline
from facecanon_data.errors import InputValueError
from facecanon_data.mvs import depth_map, fuse, select_source_views, subject_box
from facecanon_data.paths import default_pipeline
from facecanon_data.sampling import bounded_subset
from facecanon_data.sources import NeRSembleSource
from facecanon_data.stages.reconstruct import dense_backend, read_points, run_reconstruct, timestamp_dir
from facecanon_data.synthetic.rig import nersemble_like_rig


def _plane_views(cameras: list[Camera], plane_z: float, seed: int = 0) -> list[np.ndarray]:
    """Each camera's image of the plane z = plane_z (world, m) carrying a random texture of 2 mm cells,
    bilinearly interpolated: (H, W, 3) uint8 per camera."""
    import cv2

    rng = np.random.default_rng(seed)
    cell, extent = 0.002, 0.6  # texture cell size and the plane's half-size, m
    n = int(2 * extent / cell)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (n, n)).astype(np.float32), (0, 0), 0.8)
    views = []
    for cam in cameras:
        origin, rays = cam.pixel_rays()
        t = (plane_z - origin[2]) / rays[..., 2]
        hit = origin + rays * t[..., None]
        u = ((hit[..., 0] + extent) / cell).astype(np.float32)
        v = ((hit[..., 1] + extent) / cell).astype(np.float32)
        grey = cv2.remap(texture, u, v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        views.append(np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return views


@pytest.fixture(scope="module")
def plane_scene():
    cams = nersemble_like_rig(160, 224, 560.0)  # 16 cameras 1.05 m from the origin, looking at it
    front = [i for i, c in enumerate(cams) if abs(c.center[0]) < 0.4 and c.center[2] > 0.9]  # frontal ones
    cams = [cams[i] for i in front]
    return cams, _plane_views(cams, 0.0)


def test_plane_sweep_and_refinement_recover_a_textured_plane(plane_scene):
    """Depth of the plane z = 0 seen by the rig's frontal cameras: the reference camera's depth at each
    pixel is exact up to sub-millimetre refinement error, cropped box and coarse scale included."""
    cams, views = plane_scene
    ref = 0
    origin, rays = cams[ref].pixel_rays()  # unit camera-z rays: the ray parameter is the depth
    truth = (0.0 - origin[2]) / rays[..., 2]
    opts = MvsConfig()
    box = (20, 200, 16, 140)
    sources = [i for i in range(1, len(cams))][:opts.source_views]
    depth, cost = depth_map(ref, views, cams, sources, (float(truth.min()) - 0.1, float(truth.max()) + 0.1), opts, box)
    depth, cost = depth.numpy(), cost.numpy()
    y0, y1, x0, x1 = box
    inner = np.zeros_like(depth, bool)
    inner[y0 + 8:y1 - 8, x0 + 8:x1 - 8] = True
    outside = np.ones_like(inner)
    outside[y0:y1, x0:x1] = False
    assert not (depth[outside] > 0).any() and (cost[outside] == 2).all()  # nothing computed outside the box
    err = np.abs(depth[inner] - truth[inner]) * 1000
    assert np.median(err) < 0.5 and np.percentile(err, 90) < 1.5, (np.median(err), np.percentile(err, 90))
    assert np.median(cost[inner]) < 0.2  # a textured plane matches well (1 - NCC)


def test_fusion_keeps_consistent_pixels_and_drops_a_lone_wrong_view(plane_scene):
    """Three views with the true plane depth and one 5 cm off: fusion keeps the three (each agrees with
    two others), drops the wrong one (it agrees with none); fused points lie on the plane."""
    import torch

    cams, views = plane_scene
    cams, views = cams[:4], views[:4]
    depths = []
    for c in cams:
        origin, rays = c.pixel_rays()  # unit camera-z rays: the ray parameter is the depth
        depths.append((0.0 - origin[2]) / rays[..., 2])
    depth = torch.as_tensor(np.stack(depths), dtype=torch.float32)
    depth[3] += 0.05
    cost = torch.zeros_like(depth)
    cloud = fuse(views, cams, depth, cost, MvsConfig(min_consistent_views=2, fusion_voxel_m=0.0))
    assert (cloud.depth[3] > 0).sum() == 0
    assert all((cloud.depth[v] > 0).mean() > 0.5 for v in range(3))
    assert np.abs(cloud.positions[:, 2]).max() < 1e-4  # on the plane z = 0
    assert cloud.visibility.min() >= 3 and np.allclose(np.abs(cloud.normals[:, 2]), 1, atol=1e-3)


def test_source_views_are_those_nearest_the_preferred_angle():
    """With every point seen by every camera, the score ranks cameras by how close their triangulation
    angle at the points is to ``angle_deg``; a camera sharing no point is chosen last."""
    cams = nersemble_like_rig(208, 304, 725.0)
    target = np.array([0.0, -0.03, 0.0])  # the rig's focus
    points = target + np.random.default_rng(0).normal(0, 0.005, (200, 3))
    observed = np.ones((len(points), len(cams)), bool)
    observed[:, 5] = False  # camera 5 shares no point with anyone
    sources = select_source_views(cams, points, observed, 4, 20.0)
    rays = np.stack([c.center - target for c in cams])
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    for r, src in enumerate(sources):
        assert r not in src and len(set(src)) == 4
        if r == 5:
            continue
        angle = np.degrees(np.arccos(np.clip(rays @ rays[r], -1, 1)))
        closeness = np.abs(angle - 20.0)
        closeness[[r, 5]] = np.inf
        assert set(src) == set(np.argsort(closeness)[:4].tolist()), (r, src, angle[src])


def test_subject_box_is_the_mask_box_or_the_widened_point_box():
    cam = nersemble_like_rig(208, 304, 725.0)[0]
    mask = np.zeros((304, 208), bool)
    mask[50:100, 60:120] = True
    assert subject_box(mask, cam, np.zeros((1, 3))) == (50, 100, 60, 120)
    uv, _ = cam.project(np.array([[0.0, -0.03, 0.0]]))
    y0, y1, x0, x1 = subject_box(None, cam, np.array([[0.0, -0.03, 0.0]]))
    assert y0 <= uv[0, 1] <= y1 and x0 <= uv[0, 0] <= x1


def test_bounded_subset_is_deterministic_sorted_and_whole_when_small():
    a, b = bounded_subset(100_000, 2000), bounded_subset(100_000, 2000)
    assert np.array_equal(a, b) and len(a) == 2000 and np.all(np.diff(a) > 0)
    assert np.array_equal(bounded_subset(500, 2000), np.arange(500))
    assert np.array_equal(bounded_subset(500, 0), np.arange(500))


def test_dense_backend_names_and_errors(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[reconstruct]\ndense = "never"\n')
    with pytest.raises(ConfigError, match=r"p.toml: reconstruct.dense must be one of .*'never' is now 'none'"):
        load_pipeline(p)
    cfg = load_pipeline(default_pipeline(), {"reconstruct": {"dense": "torch"}})
    assert dense_backend(cfg.reconstruct) == "torch"
    from facecanon_data.devices import colmap_cuda_available

    if not colmap_cuda_available():
        assert dense_backend(load_pipeline(default_pipeline()).reconstruct) == "torch"  # auto, no CUDA
        with pytest.raises(InputValueError, match="reconstruct.dense = 'colmap' but no CUDA device"):
            dense_backend(load_pipeline(default_pipeline(), {"reconstruct": {"dense": "colmap"}}).reconstruct)


@pytest.fixture(scope="module")
def dense_run(synth_capture, tmp_path_factory):
    out = synth_capture["out"]
    source = NeRSembleSource(out / "capture", out / "ground_truth")
    cfg = load_pipeline(default_pipeline(), {"reconstruct": {"dense": "torch"}})
    work = tmp_path_factory.mktemp("dense")
    result = run_reconstruct(source, "900", cfg, work, timestamps=[("EXP-1-head", 2)])
    return result, work, source


def test_torch_dense_path_on_the_synthetic_capture(dense_run):
    """The whole dense path of one timestamp (COLMAP's sparse points, then the torch MVS) at the demo's
    416 x 608: the depth maps against the ground truth's, over its head pixels (hair included)."""
    result, work, source = dense_run
    (ts,) = result.timestamps
    assert ts.kept and ts.dense and ts.dense_backend == "torch" and result.dense_backend == "torch"
    folder = timestamp_dir(work, "900", "EXP-1-head", 2)
    with np.load(folder / "depth.npz") as z:
        assert str(z["kind"]) == "dense"
        depth, serials = z["depth"], [str(s) for s in z["serials"]]
    cloud = read_points(folder / "points.ply")
    assert len(cloud["positions"]) > 50_000 and "normals" in cloud and cloud["visibility"].min() >= 2
    gt = source.ground_truth("900")
    head = near = has = 0
    errors = []
    for v, s in enumerate(serials):
        g = gt.view_maps("EXP-1-head", 2, s, 2)
        m = g["mask"] & (depth[v] > 0)
        err = np.abs(depth[v] - g["depth"])[m] * 1000
        head += g["mask"].sum()
        has += m.sum()
        near += (err < 2).sum()
        errors.append(err)
    errors = np.concatenate(errors)
    assert has / head > 0.6, has / head  # depth on most head pixels (sparse: ~1 %)
    assert near / head > 0.5, near / head
    assert np.median(errors) < 1.0 and np.median(errors / 1000 / 1.0) < 0.003
    assert ts.gt_point_error_median_mm is not None and ts.gt_point_error_median_mm < 1.0
    assert json.loads((folder / "views.json").read_text())  # the sparse registration stats are still written
