"""The paper's evaluation protocol: margins in frames, the face + hair region, monocular vs multi-view
inputs, and the metric definitions on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fakes import fake_subject
from facecanon_data.regions import REGION_LABELS, eval_region, region_map
from facecanon_data.store import build_index, write_subject
from facecanon_data.training.config import EvalConfig
from facecanon_data.training.evaluate import (Prediction, correspondence_errors, depth_errors, epe_summary,
                                              evaluate_model, frame_pairs)
from facecanon_data.training.tables import load_evaluations, paper_tables, save_evaluation

FRAMES = [0, 1, 2, 3, 5, 8, 13, 40]  # known frame numbers, gaps where reconstruct or track dropped some
FRONTAL = "222200037"  # the rig's frontal camera: view 8 of 16


class RecordingModel(torch.nn.Module):
    """Returns depth 1 and canonical 0 for any input and records how many images each call saw."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x):
        b, n, _, h, w = x.shape
        self.calls.append(n)
        return {"depth": torch.ones(b, n, 1, h, w), "canonical": torch.zeros(b, n, 3, h, w)}


@pytest.fixture(scope="module")
def frames_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-store")
    write_subject(path, fake_subject("902", views=16, h=42, w=28, frames=FRAMES))
    build_index(path)
    return path


def test_frame_pairs_count_frames_not_kept_timestamps():
    assert frame_pairs(FRAMES, 2) == [(0, 2), (1, 3), (3, 4)]  # 0-2, 1-3, 3-5
    assert frame_pairs(FRAMES, 8) == [(0, 5), (4, 6)]  # 0-8 and 5-13: five and two kept timestamps apart
    assert frame_pairs(FRAMES, 1) == [(0, 1), (1, 2), (2, 3)]
    assert frame_pairs([0, 10, 20], 1) == []


def test_protocol_uses_frames_the_frontal_camera_and_the_first_frames(frames_store):
    model = RecordingModel()
    cfg = EvalConfig(subjects=["902"], resolution=[42, 28], first_frames=20, margins=[2, 8],
                     margins_average=[1, 10], views_per_sample=16, gt_match_mm=50, max_pairs=1000)
    r = evaluate_model(model, str(frames_store), cfg)
    kept = [f for f in FRAMES if f < 20]  # frame 40 is beyond the first 20 frames
    assert r["frontal_frames"] == len(kept)
    assert r["margins"]["2"]["pairs"] == 3 and r["margins"]["8"]["pairs"] == 2  # 0-8 and 5-13
    assert r["margins"]["1"]["pairs"] == 3 and r["margins"]["4"]["pairs"] == 1 and r["margins"]["9"]["pairs"] == 0
    assert r["epe_average"]["margins"] == "1-10"
    # inputs: one frontal image per monocular pass, all 16 views per multi-view pass, frontal frames together
    assert model.calls.count(16) == len(kept)  # one multi-view pass per timestamp
    assert model.calls.count(1) == len(kept)  # one monocular pass per frontal frame
    assert len(kept) in model.calls  # the frontal frames of the sequence in one pass (correspondences)
    assert r["depth"]["monocular"]["images"] <= len(kept) and r["depth"]["multi_view"]["images"] <= 16 * len(kept)
    assert r["depth"]["multi_view"]["images"] > r["depth"]["monocular"]["images"]


def test_a_store_without_the_frontal_camera_is_refused_by_name(frames_store, tmp_path):
    write_subject(tmp_path, fake_subject("902", views=4, h=42, w=28))
    build_index(tmp_path)
    with pytest.raises(ValueError, match=f"no view of the frontal camera {FRONTAL}"):
        evaluate_model(RecordingModel(), str(tmp_path), EvalConfig(subjects=["902"], resolution=[42, 28]))


def test_depth_metrics_hand_computed():
    gt = np.array([1.0] * 6 + [2.0] * 6).reshape(1, 3, 4)
    pred = np.ones_like(gt)  # median scale 1.5: the prediction becomes 1.5 everywhere
    absrel, rmse = depth_errors(pred, gt, np.ones_like(gt, bool))
    assert absrel == [pytest.approx((6 * 0.5 / 1 + 6 * 0.5 / 2) / 12)] and rmse == [pytest.approx(0.5)]
    mask = np.ones_like(gt, bool)
    mask[0, 0, :2] = False  # two gt = 1 pixels outside the region: median 2, the prediction becomes 2
    absrel, rmse = depth_errors(pred, gt, mask)
    assert absrel == [pytest.approx(4 * 1.0 / 10)] and rmse == [pytest.approx(np.sqrt(4 / 10))]
    mask[0, 0, 2] = False  # fewer than 10 pixels left: no figure for the image
    assert depth_errors(pred, gt, mask) == ([], [])


def test_epe_thresholds_and_cce_hand_computed():
    s = epe_summary(np.array([1.0, 4.0, 6.0, 12.0]), np.array([0.0, 2.0]), pairs=2)
    assert s["epe_px"] == pytest.approx(5.75) and s["cce_px"] == pytest.approx(1.0)
    assert (s["under_3px"], s["under_5px"], s["under_10px"]) == (0.25, 0.5, 0.75)
    assert s["correspondences"] == 4 and s["pairs"] == 2


def test_correspondences_stay_inside_the_region():
    h = w = 20
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.stack([xx * 1e-2, yy * 1e-2, np.zeros_like(xx)], -1).astype(np.float32)
    gt = np.stack([gt, gt])
    mask = np.ones((2, h, w), bool)
    region = np.zeros((2, h, w), bool)
    region[:, :, :10] = True  # the left half is face + hair
    pred = Prediction(canonical=gt.copy(), gt_canonical=gt, mask=mask, region=region)
    epe, cce = correspondence_errors(pred, 0, 1, gt_match_mm=1.0, max_queries=10_000, rng=np.random.default_rng(0))
    assert len(epe) == region[0].sum() and epe.max() == 0 and cce.max() == 0
    # a predictor whose best match lies outside B's region cannot pick it: it lands on the region's edge
    pred.canonical[1] = np.roll(gt[1], -12, axis=1)
    epe, _ = correspondence_errors(pred, 0, 1, gt_match_mm=1.0, max_queries=10_000, rng=np.random.default_rng(0))
    assert epe.min() > 0


def test_region_map_hair_above_the_chin_body_below():
    """A 'head' of 4 vertices seen straight on: face at rows 10-14, hair (scalp) at the top, neck below."""
    codes = {n: REGION_LABELS.index(n) for n in REGION_LABELS}
    labels = np.array([codes["face"], codes["face"], codes["hair"], codes["neck"]], np.uint8)
    px = np.array([[10.0, 14.0], [14.0, 10.0], [12.0, 5.0], [12.0, 22.0]])  # (x, y): chin at y = 14
    faces = np.array([[0, 1, 2], [3, 0, 1]])
    triangle = np.full((30, 24), -1)
    triangle[10:15, 10:15] = 0  # face triangle
    triangle[16:20, 10:15] = 1  # neck triangle (its first vertex is the neck)
    foreground = np.zeros((30, 24), bool)
    foreground[5:10, 9:16] = True  # above the face, touching it: hair
    foreground[6, 6] = True  # above the chin and within reach, but detached from the head: not hair
    foreground[22:26, 8:17] = True  # below the chin: body
    foreground[0, 0] = True  # far from the head: not hair
    r = region_map(triangle, faces, labels, px, np.ones(4, bool), foreground)
    assert (r[10:15, 10:15] == codes["face"]).all() and (r[16:20, 10:15] == codes["neck"]).all()
    assert (r[5:10, 9:16] == codes["hair"]).all() and (r[22:26, 8:17] == codes["body"]).all()
    assert r[0, 0] == codes["body"] and r[6, 6] == codes["body"] and r[28, 2] == codes["none"]
    assert eval_region(r).sum() == 25 + 5 * 7
    assert (region_map(triangle, faces, labels, px, np.ones(4, bool), None)[5:10, 9:16] == 0).all()  # no foreground


def test_tables_have_the_paper_layout_and_are_saved_per_protocol(tmp_path):
    def result(epe):
        m = {"epe_px": epe, "cce_px": 0.5, "under_3px": 0.8, "under_5px": 0.9, "under_10px": 1.0,
             "correspondences": 10, "pairs": 2}
        return {"protocol": "synthetic-held-out", "depth": {"monocular": {"absrel": 0.05, "rmse_m": 0.01, "images": 3},
                                                            "multi_view": {"absrel": 0.02, "rmse_m": 0.004, "images": 9}},
                "margins": {"2": m, "8": {**m, "epe_px": epe * 2}}, "margins_reported": [2, 8],
                "epe_average": {"margins": "1-10", "epe_px": epe * 1.5}}

    text = paper_tables({"untrained": result(20.0), "trained": result(2.0)})
    assert "| Method | Margin = 2: EPE(2D) | <3px | <5px | <10px | Margin = 8: EPE(2D) |" in text
    assert "| trained | 2.000 | 0.800 | 0.900 | 1.000 | 4.000 |" in text
    assert "| trained | 0.0100 / 0.0040 | 0.0500 / 0.0200 |" in text  # Tab. 1: monocular / 16 views
    assert "| untrained | 0.0500 | 20.000 | 0.0200 |" in text  # Tab. 7
    save_evaluation(tmp_path, result(2.0), "trained")
    save_evaluation(tmp_path, result(20.0), "untrained")
    assert set(load_evaluations(tmp_path)["synthetic-held-out"]) == {"trained", "untrained"}
    with pytest.raises(ValueError, match="label"):
        save_evaluation(tmp_path, result(2.0), "../escape")
