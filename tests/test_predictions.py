"""Any model scored from files: exported frames, the project's and the released prediction layouts, the
bundled model through files equal to in process, and noise of known size giving the EPE it implies."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fakes import fake_subject
from facecanon_data.regions import REGION_LABELS
from facecanon_data.store import build_index, write_subject
from facecanon_data.training.config import EvalConfig
from facecanon_data.training.evaluate import ModelPredictor, PredictedMaps, run_protocol
from facecanon_data.training.predictions import (FilePredictor, RecordingPredictor, export_frames,
                                                 write_recorded_predictions)

H, W = 42, 28
FRAMES = [0, 1, 2, 3, 4, 5]
MM = 1e-3
MOTION_PX = 1  # the synthetic skin moves this many pixels to the right per frame


def _canonical_grid(frame: int, view: int) -> np.ndarray:
    """(H, W, 3) metres: the canonical point seen at each pixel; frame f sees the point that sat MOTION_PX * f
    pixels further left at frame 0 (1 mm per pixel), each view its own plane."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    return np.stack([(xx - MOTION_PX * frame) * MM, yy * MM, np.full_like(xx, view * 1.0)], -1)


@pytest.fixture(scope="module")
def moving_store(tmp_path_factory):
    """16 views, 6 consecutive frames; labels everywhere but a 4-pixel border; face region everywhere."""
    path = tmp_path_factory.mktemp("moving-store")
    s = fake_subject("903", views=16, h=H, w=W, frames=FRAMES)
    s.canonical = np.stack([[_canonical_grid(f, v) for v in range(16)] for f in FRAMES]).astype(np.float16)
    s.mask = np.zeros(s.mask.shape, bool)
    s.mask[..., 4:-4, 4:-4] = True
    s.depth = np.where(s.mask, 1.0 + 0.05 * np.random.default_rng(0).random(s.mask.shape), 0).astype(np.float32)
    s.region = np.full(s.mask.shape, REGION_LABELS.index("face"), np.uint8)
    write_subject(path, s)
    build_index(path)
    return path


def _protocol(**kw) -> EvalConfig:
    return EvalConfig(subjects=["903"], resolution=[H, W], first_frames=40, margins=[1, 2],
                      margins_average=[1, 3], gt_match_mm=0.4, max_queries=10_000, **kw)


class LabelsModel:
    """A 'model' made of the stored labels: depth times 3.3 (any scale), canonical 7 times the labels plus an
    offset (any units and origin), and frame f shifted right by ``shift(f)`` pixels (a known error)."""

    def __init__(self, shift=lambda f: 0):
        self.shift = shift

    def maps(self, frame: int, view: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        canonical = np.roll(_canonical_grid(frame, view), self.shift(frame), axis=1)
        return 3.3 * depth, (7.0 * canonical + 0.25).astype(np.float32)

    def __call__(self, ds, rows, sample, kind):
        r = ds.rows
        out = [self.maps(int(r["frame"][i]), int(r["v"][i]), sample["depth"][j, 0].numpy()) for j, i in enumerate(rows)]
        depth = np.stack([o[0] for o in out]).astype(np.float32)
        return PredictedMaps(depth=depth, canonical=np.stack([o[1] for o in out]), valid=np.ones(depth.shape, bool))


def _write_camera_files(root, store, cfg, model: LabelsModel, layout: str, scale: int = 1, noise: float = 0.0):
    """Per camera, the model's maps for the exported frames as a predictions file of ``layout``, at ``scale``
    times the protocol's resolution; ``noise``: Gaussian noise on canonical (its sigma in pixel spacings of
    the label grid) and on depth (its sigma relative)."""
    rng = np.random.default_rng(1)
    from facecanon_data.training.evaluate import camera_frames, protocol_dataset

    ds, views, _ = protocol_dataset(str(store), cfg)
    for subject, ids in views.items():
        for (seq, serial), sel in camera_frames(ds, ids).items():
            sample = ds.load(sel.tolist(), H, W)
            maps = model(ds, sel.tolist(), sample, "frames")
            up = lambda a: np.repeat(np.repeat(a, scale, 1), scale, 2)  # noqa: E731
            depth, canonical = up(maps.depth), up(maps.canonical)
            depth = depth * (1 + noise * rng.standard_normal(depth.shape))
            canonical = canonical + 7.0 * MM * noise * rng.standard_normal(canonical.shape)
            folder = root / subject / seq / serial
            folder.mkdir(parents=True, exist_ok=True)
            n = len(sel)
            if layout == "released":
                valid = np.ones(depth.shape, bool)
                valid[:, :scale] = False  # the top row predicts nothing
                np.savez(folder / "raw_predictions.npz", depth=depth, canonical=canonical, valid=valid,
                         intrinsics=np.tile(np.eye(3), (n, 1, 1)), extrinsics=np.tile(np.eye(4), (n, 1, 1)),
                         conf=np.zeros(0))
            else:
                np.savez(folder / "predictions.npz", depth=depth, canonical=canonical,
                         frames=ds.rows["frame"][sel].astype(np.int64))


def test_a_model_made_of_the_labels_scores_zero_and_a_known_shift_its_own_size(moving_store, tmp_path):
    cfg = _protocol()
    exact = run_protocol(LabelsModel(), str(moving_store), cfg)
    assert exact["margins"]["1"]["epe_px"] == 0 and exact["margins"]["2"]["epe_px"] == 0
    assert exact["margins"]["1"]["correspondences"] > 100 and exact["depth"]["monocular"]["absrel"] < 1e-6
    # odd frames predicted 3 px to the right: pairs one frame apart are off by exactly 3 px, two apart by 0
    shifted = run_protocol(LabelsModel(shift=lambda f: 3 * (f % 2)), str(moving_store), cfg)
    m1, m2 = shifted["margins"]["1"], shifted["margins"]["2"]
    assert m1["epe_px"] == pytest.approx(3.0) and m1["under_3px"] == 0 and m1["under_5px"] == 1
    assert m2["epe_px"] == 0
    # the same model through files (this project's layout) gives the same figures
    _write_camera_files(tmp_path / "pred", moving_store, cfg, LabelsModel(shift=lambda f: 3 * (f % 2)), "own")
    assert run_protocol(FilePredictor(tmp_path / "pred", cfg), str(moving_store), cfg) == shifted


def test_the_bundled_model_through_files_equals_in_process(moving_store, tmp_path):
    from facecanon_data.training.model import FaceAnythingModel, ModelConfig

    torch.manual_seed(0)
    model = FaceAnythingModel(ModelConfig(dim=24, depth=2, heads=2, out_layers=[0, 1, 1, 1], head_features=8,
                                          head_channels=[4, 8, 8, 8])).eval()
    cfg = _protocol(views_per_sample=4)
    recorder = RecordingPredictor(ModelPredictor(model, "cpu", cfg.views_per_sample))
    in_process = run_protocol(recorder, str(moving_store), cfg)
    files = write_recorded_predictions(recorder, tmp_path / "pred")
    assert len(files) == 16
    frontal = next(f for f in files if f.parent.name == "222200037")
    with np.load(frontal) as z:  # the frontal camera also keeps the depth of each image predicted alone
        assert set(z.files) == {"frames", "depth", "canonical", "depth_monocular"}
    from_files = run_protocol(FilePredictor(tmp_path / "pred", cfg), str(moving_store), cfg)
    assert from_files == in_process
    assert in_process["margins"]["1"]["correspondences"] > 100


@pytest.mark.e2e
def test_export_then_released_layout_scored_from_the_cli(moving_store, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "facecanon-data")
    proto = tmp_path / "protocol.toml"
    proto.write_text(f'name = "moving"\nsubjects = ["903"]\nresolution = [{H}, {W}]\nmargins = [1, 2]\n'
                     f'margins_average = [1, 3]\ngt_match_mm = 0.4\nmax_queries = 10000\n')
    r = subprocess.run([exe, "export-frames", str(moving_store), "--protocol", str(proto), "--out",
                        str(tmp_path / "frames"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["cameras"] == 16 and out["images"] == 16 * len(FRAMES)
    meta = json.loads((tmp_path / "frames" / "903" / "EXP-1-head" / "222200037" / "cameras.json").read_text())
    assert meta["frames"] == FRAMES and (meta["width"], meta["height"]) == (W, H)
    assert np.asarray(meta["intrinsics"]).shape == (len(FRAMES), 3, 3)
    pngs = sorted((tmp_path / "frames" / "903" / "EXP-1-head" / "222200037" / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{f:05d}.png" for f in FRAMES]
    # the released inference's layout at twice the resolution, top row invalid, noise of 0.1 pixel spacings
    # (a match one pixel off needs the noise to carry a point half a spacing: 5 sigma, so it stays rare)
    pred = tmp_path / "pred"
    _write_camera_files(pred, moving_store, _protocol(), LabelsModel(), "released", scale=2, noise=0.1)
    r = subprocess.run([exe, "evaluate", "--predictions", str(pred), "--store", str(moving_store), "--protocol",
                        str(proto), "--label", "labels-x7", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["files"] == 16 and res["margins"]["1"]["correspondences"] > 100
    assert res["margins"]["1"]["epe_px"] < 0.05 and res["margins"]["1"]["under_3px"] == 1
    assert 0.05 < res["depth"]["multi_view"]["absrel"] < 0.12  # E|noise| = 0.1 * sqrt(2 / pi) = 0.08
    assert res["depth"]["multi_view"]["images"] == 16 * len(FRAMES)
    assert (moving_store / "evaluations" / "moving" / "labels-x7.json").is_file()
    # a file with a frame too few is refused by name
    bad = pred / "903" / "EXP-1-head" / "222200037" / "raw_predictions.npz"
    with np.load(bad) as z:
        arrays = {k: z[k][:-1] if z[k].ndim else z[k] for k in z.files}
    np.savez(bad, **arrays)
    r = subprocess.run([exe, "evaluate", "--predictions", str(pred), "--store", str(moving_store), "--protocol",
                        str(proto)], capture_output=True, text=True)
    assert r.returncode == 2 and "222200037/raw_predictions.npz: 5 frames predicted, but 6 frames" in r.stderr


def test_export_frames_writes_every_camera_once_and_reports_progress(moving_store, tmp_path):
    calls = []
    result = export_frames(str(moving_store), _protocol(), tmp_path / "frames", progress=lambda d, t: calls.append((d, t)))
    assert result["cameras"] == 16 and result["images"] == 16 * len(FRAMES) and result["subjects"] == ["903"]
    assert calls == [(d, 16) for d in range(1, 17)]
    meta = json.loads(next((tmp_path / "frames" / "903").glob("*/*/cameras.json")).read_text())
    assert meta["frames"] == FRAMES and (meta["height"], meta["width"]) == (H, W)
