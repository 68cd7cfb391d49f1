"""Per-pixel label confidence: its evidence on known answers (two cameras over a plane with labels moved by
a known amount), its stored form, the loader's resampling, the trainer's weighting and its ranking of the
label error (the confident half)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facecanon_data.cameras import Camera
from facecanon_data.confidence import (ConfidenceScales, cross_view_disagreement_mm, from_levels, label_confidence,
                                       nearest_cameras, to_levels)
from facecanon_data.label_motion import ViewLabels, pair_errors, summarize
from facecanon_data.meshes import barycentric_interpolate, cast_camera_rays, raycasting_scene

SCALES = ConfidenceScales(surface_mm=2.0, cross_view_mm=2.0, observers=3)


def test_each_piece_of_evidence_scales_the_confidence_as_documented():
    mask = np.array([True, True, True, True, True, False])
    surface = np.array([0.0, 2.0, 0.0, 0.0, 4.0, 0.0])
    disagreement = np.array([0.0, 0.0, np.nan, 0.0, 2.0, 0.0])
    observers = np.array([3, 5, 3, 1, 3, 3])
    c = label_confidence(mask, surface, disagreement, observers, SCALES)
    want = [1.0, math.exp(-0.5), math.exp(-0.5), 1 / 3, math.exp(-2.0) * math.exp(-0.5), 0.0]
    np.testing.assert_allclose(c, want, rtol=1e-6)
    levels = to_levels(c, mask)
    assert levels.dtype == np.uint8 and levels[-1] == 0 and (levels[:-1] >= 1).all()
    np.testing.assert_allclose(from_levels(levels), want, atol=0.5 / 255 + 1e-7)
    tiny = to_levels(np.array([1e-6], np.float32), np.array([True]))
    assert tiny[0] == 1  # a labelled pixel never reads as "no label"


W, H, F = 120, 90, 1500.0  # the plane at 1 m: 1 px ~ 0.67 mm


def _camera(serial: str, x: float) -> Camera:
    w2c = np.eye(4)
    w2c[0, 3] = -x  # the camera centre at (x, 0, 0), looking down +z
    return Camera(serial, np.array([[F, 0, (W - 1) / 2], [0, F, (H - 1) / 2], [0, 0, 1.0]]), w2c, W, H)


def _plane_maps(cameras: list[Camera], moved_mm: float):
    """Two views of a plane at z = 1 m whose canonical point is its world point; view 1's labels in its
    left half are moved by ``moved_mm`` in x. Each view's pixels are distinct points (ids never shared)."""
    ys, xs = np.mgrid[-0.2:0.2:41j, -0.3:0.3:61j]
    vertices = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1)
    idx = np.arange(xs.size).reshape(xs.shape)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
    scene = raycasting_scene(vertices, faces)
    depth, canonical, mask, index = [], [], [], []
    for v, cam in enumerate(cameras):
        dep, tri, bary = cast_camera_rays(scene, cam)
        hit = tri >= 0
        can = np.zeros((H, W, 3), np.float32)
        can[hit] = barycentric_interpolate(vertices.astype(np.float32), faces, tri[hit], bary[hit])
        if v == 1:
            can[:, :W // 2, 0] += np.where(hit[:, :W // 2], moved_mm / 1000, 0)
        depth.append(np.where(hit, dep, 0).astype(np.float32))
        canonical.append(can)
        mask.append(hit)
        index.append(np.where(hit, v * H * W + np.arange(H * W).reshape(H, W), -1))
    return SimpleNamespace(serials=[c.serial for c in cameras], depth=np.stack(depth), canonical=np.stack(canonical),
                           mask=np.stack(mask), index=np.stack(index))


def test_cross_view_disagreement_finds_the_labels_a_neighbour_view_moved():
    cameras = [_camera("a", 0.0), _camera("b", 0.01), _camera("far", 0.5)]  # b sees the plane 15 px to the left
    assert nearest_cameras(["a", "b", "far"], {c.serial: c for c in cameras}, 1) == {"a": ["b"], "b": ["a"],
                                                                                        "far": ["b"]}
    maps = _plane_maps(cameras[:2], moved_mm=5.0)
    cams = {c.serial: c for c in cameras[:2]}
    x = cross_view_disagreement_mm(maps, cams, {"a": ["b"], "b": ["a"]}, tol_m=0.003)
    assert np.isnan(x[~maps.mask]).all()
    # b's labels left of its column 60 are moved by 5 mm; a's column u lands on b's column u - 15. Where
    # either side of a pair is moved the views disagree by ~5 mm, elsewhere by less than a pixel's footprint
    # on the plane (~0.67 mm)
    median = lambda v, cols: float(np.nanmedian(x[v][:, cols][maps.mask[v][:, cols]]))  # noqa: E731
    assert median(0, slice(80, 117)) < 0.7 and median(1, slice(64, 100)) < 0.7
    assert 4.3 < median(0, slice(20, 70)) < 5.7 and 4.3 < median(1, slice(5, 56)) < 5.7
    c = label_confidence(maps.mask, np.zeros(maps.mask.shape), x, np.full(maps.mask.shape, 3), SCALES)
    assert np.median(c[1][:, 5:56]) < 0.1 < 0.9 < np.median(c[0][:, 80:117])


def test_the_confident_half_leaves_out_labels_marked_unreliable():
    """Query labels moved by 4 px on the right half with confidence 0.2 there: all pixels' EPE grows, the
    confident half stays at the floor."""
    camera = _camera("cam", 0.0)
    vertices = np.array([[-0.3, -0.2, 1.0], [0.3, -0.2, 1.0], [-0.3, 0.2, 1.0], [0.3, 0.2, 1.0]])
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    from facecanon_data.label_motion import ViewTruth

    depth, tri, bary = cast_camera_rays(raycasting_scene(vertices, faces), camera)
    head = tri >= 0
    canon = np.zeros((H, W, 3), np.float32)
    canon[head] = barycentric_interpolate(vertices.astype(np.float32), faces, tri[head], bary[head])
    region = np.where(head, 0, -1).astype(np.int8)
    truth = ViewTruth(canon, head, tri, bary, np.where(head, depth, 0).astype(np.float32), region)
    interior = np.zeros((H, W), bool)
    interior[10:-10, 10:-10] = True
    moved = canon.copy()
    moved[:, W // 2:] = np.roll(canon, 4, axis=1)[:, W // 2:]
    confidence = np.where(np.arange(W)[None, :] >= W // 2, 0.2, 0.9).astype(np.float32) * np.ones((H, 1))
    labels_a = ViewLabels(moved, interior & head, np.ones((H, W), bool), confidence.astype(np.float32))
    labels_b = ViewLabels(canon, interior & head, np.ones((H, W), bool))
    errors = pair_errors(labels_a, labels_b, truth, truth, vertices, faces, camera, 0.01, 4000,
                         np.random.default_rng(0))
    head_figures = summarize([errors], ("face",), 1.0)["head"]
    half = head_figures["confident_half"]
    assert head_figures["label_epe_px"] > 1.5  # half of the queries are 4 px off
    assert half["label_epe_px_504"] < 0.01 and half["confidence_min"] == pytest.approx(0.9)
    assert half["queries"] == (head_figures["queries"] + 1) // 2


def test_the_loader_resamples_confidence_with_the_labels_and_the_loss_weighs_by_it(tmp_path):
    from fakes import fake_subject
    from facecanon_data.store import build_index, write_subject
    from facecanon_data.training.config import TrainConfig
    from facecanon_data.training.dataset import FaceCanonDataset
    from facecanon_data.training.losses import sample_targets, total_loss

    data = fake_subject("900", t=2, views=3, h=60, w=40)
    write_subject(tmp_path, data)
    build_index(tmp_path)
    ds = FaceCanonDataset(tmp_path, mode="views", images_per_sample=3, resolution=(60, 40), with_confidence=True)
    s = ds[0]
    assert s["confidence"].shape == s["mask"].shape and s["confidence"].dtype == torch.float32
    assert (s["confidence"][~s["mask"]] == 0).all() and (s["confidence"][s["mask"]] > 0).all()
    rows = ds.samples[0]
    for j, row in enumerate(rows):  # at the stored size the labels stay where they are
        t, v = int(ds.rows["t"][row]), int(ds.rows["v"][row])
        np.testing.assert_array_equal(s["confidence"][j, 0].numpy(), from_levels(data.confidence[t, v]))
    plain = FaceCanonDataset(tmp_path, mode="views", images_per_sample=3, resolution=(60, 40))
    assert "confidence" not in plain[0]
    # the weighted loss: an error on pixels of confidence 0 does not count, one on confidence 1 does
    cfg = TrainConfig().loss
    cfg.label_weight, cfg.gradient = "confidence", 0.0  # the gradient term keeps the plain mask
    targets = sample_targets(s, cfg.canonical_scale)
    pred = {k: targets[k].clone() for k in ("depth", "canonical", "ray")}
    pred.update({f"{k}_conf": torch.ones_like(targets["depth"]) for k in ("depth", "canonical", "ray")})
    targets["weight"] = torch.where(targets["mask"], 1.0, 0.0) * (torch.arange(40) < 20)
    pred["depth"] = pred["depth"] + torch.where(torch.arange(40) < 20, 0.0, 1.0)  # errors where weight is 0
    assert total_loss(pred, targets, cfg)[1]["loss_depth"] == pytest.approx(0.0, abs=1e-6)
    pred["depth"] = targets["depth"] + 0.5  # everywhere: the weighted mean is 0.5 (reg) + 0.5 (conf)
    assert total_loss(pred, targets, cfg)[1]["loss_depth"] == pytest.approx(1.0, abs=1e-5)
    del targets["weight"]
    with pytest.raises(ValueError, match="label confidence"):
        total_loss(pred, targets, cfg)


def test_tracked_surface_labels_read_the_canonical_mesh_where_each_ray_meets_it():
    from facecanon_data.stages.render import tracked_surface_labels

    faces = np.array([[0, 1, 2]])
    canonical_vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) * 0.1
    triangle = np.array([[[0, -1], [0, 0]]])  # (V=1, H=2, W=2): one pixel misses the mesh
    bary = np.array([[[[1, 0, 0], [0, 0, 0]], [[0, 1, 0], [0.2, 0.3, 0.5]]]], np.float32)
    mask = np.array([[[True, True], [False, True]]])
    maps = SimpleNamespace(triangle=triangle, bary=bary, mask=mask, region=np.ones((1, 2, 2), np.uint8))
    labels = tracked_surface_labels(maps, 0, canonical_vertices, faces)
    np.testing.assert_array_equal(labels.labelled, [[True, False], [False, True]])  # labelled and hit
    np.testing.assert_allclose(labels.canonical[1, 1], [0.03, 0.05, 0.0], atol=1e-7)
    np.testing.assert_allclose(labels.canonical[0, 0], [0.0, 0.0, 0.0])
