"""Stage reconstruct on the synthetic capture: fixed poses, registration rule, accuracy, dense guard."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facecanon_data.config import load_pipeline
from facecanon_data.devices import colmap_cuda_available
from facecanon_data.paths import default_pipeline
from facecanon_data.sources import NeRSembleSource
from facecanon_data.orchestration.runner import run_stage
from facecanon_data.stages.chain import STAGES
from facecanon_data.stages.contract import StageContext
from facecanon_data.stages.reconstruct import (read_points, result_from_dict, run_reconstruct, summarize_reconstruct,
                                               timestamp_dir)

PICKS = [("EXP-1-head", 2), ("EXP-2-eyes", 5)]


class _NoisyCamera(NeRSembleSource):
    """The synthetic capture with one camera's frame of one timestamp replaced by noise."""

    noisy = ("EXP-2-eyes", 5, "222200042")

    def timestamps(self, subject, sequence, indices, downscale=1):
        for i, views in super().timestamps(subject, sequence, indices, downscale):
            seq, frame, serial = self.noisy
            if (sequence, i) == (seq, frame):
                rng = np.random.default_rng(0)
                views[serial] = rng.integers(0, 256, size=views[serial].shape, dtype=np.uint8)
            yield i, views


@pytest.fixture(scope="module")
def reconstructed(synth_capture, tmp_path_factory):
    out = synth_capture["out"]
    source = _NoisyCamera(out / "capture", out / "ground_truth")
    cfg = load_pipeline(default_pipeline(), {"reconstruct": {"dense": "none"}})
    work = tmp_path_factory.mktemp("work")
    run = run_stage(STAGES["reconstruct"], _context(source, cfg, work))
    assert run.status == "ran" and run.units_ran == 2
    return summarize_reconstruct("900", _unit_results(work)), work, source, cfg


def _context(source, cfg, work) -> StageContext:
    return StageContext(open_source=lambda: source, subject="900", cfg=cfg, work=work,
                        options={"timestamps": ",".join(f"{s}:{f}" for s, f in PICKS)})


def _unit_results(work):
    return [result_from_dict(json.loads((timestamp_dir(work, "900", s, f) / "_DONE.json").read_text())["result"])
            for s, f in PICKS]


def test_clean_timestamp_kept_with_all_views_and_accurate(reconstructed):
    result, work, source, _ = reconstructed
    ok = [t for t in result.timestamps if t.key == "EXP-1-head/000002"][0]
    assert ok.kept and all(v.registered for v in ok.views) and len(ok.views) == 16
    assert ok.num_points > 800
    assert ok.gt_point_error_median_mm <= 1.0
    assert all(v.mean_reprojection_error_px < 1.0 for v in ok.views)
    pts = read_points(timestamp_dir(work, "900", "EXP-1-head", 2) / "points.ply")
    assert pts["positions"].shape == (ok.num_points, 3) and (pts["visibility"] >= 2).all()
    assert np.median(pts["visibility"]) >= 3
    # No mattes in the capture: the masks come from the BACKGROUND plates, measured per view.
    assert ok.foreground_source == "plates" and len(ok.foreground_iou) == 16 and min(ok.foreground_iou) >= 0.95
    assert result.foreground_source == "plates" and result.foreground_iou_median >= 0.97
    masks = sorted(p.name for p in (timestamp_dir(work, "900", "EXP-1-head", 2) / "masks").iterdir())
    assert len(masks) == 16


def test_plate_of_another_size_is_named(synth_capture, tmp_path):
    import shutil

    import cv2

    from facecanon_data.sources import CaptureFileError

    root = tmp_path / "capture"
    shutil.copytree(synth_capture["out"] / "capture" / "900", root / "900")
    still = root / "900" / "sequences" / "BACKGROUND" / "image_222200037.jpg"
    cv2.imwrite(str(still), np.zeros((100, 80, 3), np.uint8))
    with pytest.raises(CaptureFileError, match="image_222200037.jpg: 80x100, but the videos are 832x1216"):
        NeRSembleSource(root).background_plates("900", downscale=2)


def test_known_poses_and_intrinsics_unchanged(reconstructed):
    import pycolmap

    _, work, source, cfg = reconstructed
    folder = timestamp_dir(work, "900", "EXP-1-head", 2)
    rec = pycolmap.Reconstruction(folder / "colmap" / "sparse")
    cams = source.cameras("900", downscale=cfg.capture.downscale)
    assert rec.num_reg_images() == 16
    for im in rec.images.values():
        serial = im.name[4:-4]
        pose = im.cam_from_world()
        np.testing.assert_allclose(pose.rotation.matrix(), cams[serial].world_2_cam[:3, :3], atol=1e-9)
        np.testing.assert_allclose(pose.translation, cams[serial].world_2_cam[:3, 3], atol=1e-9)
        k = cams[serial].K
        np.testing.assert_allclose(im.camera.params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], atol=1e-9)


def test_noisy_camera_drops_the_timestamp_naming_it(reconstructed):
    result, work, source, _ = reconstructed
    seq, frame, serial = source.noisy
    key = f"{seq}/{frame:06d}"
    assert result.timestamps_kept == 1 and key in result.dropped
    assert f"camera {serial}:" in result.dropped[key]
    assert all(f"camera {s}:" not in result.dropped[key] for s in source.serials("900") if s != serial)
    views = json.loads((timestamp_dir(work, "900", seq, frame) / "views.json").read_text())
    assert [v["serial"] for v in views if not v["registered"]] == [serial]


def test_sparse_depth_maps_agree_with_ground_truth(reconstructed):
    _, work, source, cfg = reconstructed
    folder = timestamp_dir(work, "900", "EXP-1-head", 2)
    with np.load(folder / "depth.npz") as z:
        depth, serials, kind = z["depth"], list(z["serials"]), str(z["kind"])
    assert kind == "sparse" and depth.shape == (16, 608, 416)
    gt = source.ground_truth("900")
    v = serials.index("222200037")
    maps = gt.view_maps("EXP-1-head", 2, "222200037", downscale=cfg.capture.downscale)
    has = depth[v] > 0
    assert has.sum() > 200
    err = np.abs(depth[v][has] - maps["depth"][has])
    assert np.median(err) < 0.002  # metres, at pixel-centre sampling


def test_the_runner_resumes_per_timestamp(reconstructed):
    result, work, source, cfg = reconstructed
    assert STAGES["reconstruct"].describe("900", run_stage(STAGES["reconstruct"], _context(source, cfg, work)).figures)
    assert run_stage(STAGES["reconstruct"], _context(source, cfg, work)).status == "reused"  # current: nothing runs
    (work / "900" / "reconstruct" / "_DONE.json").unlink()  # a crash after the timestamps, before the summary
    again = run_stage(STAGES["reconstruct"], _context(source, cfg, work))
    assert (again.status, again.units_ran, again.units_reused) == ("ran", 0, 2)
    assert again.figures["kept"] == [t.key for t in result.timestamps if t.kept]
    assert [t.total_seconds for t in _unit_results(work)] == [t.total_seconds for t in result.timestamps]


@pytest.mark.skipif(not colmap_cuda_available(),
                    reason="dense path needs a CUDA device and pycolmap-cuda12 (PatchMatch stereo is CUDA-only)")
def test_dense_path(synth_capture, tmp_path):
    out = synth_capture["out"]
    cfg = load_pipeline(default_pipeline(), {"reconstruct": {"dense": "colmap"}})
    result = run_reconstruct(NeRSembleSource(out / "capture", out / "ground_truth"), "900", cfg, tmp_path,
                             timestamps=[("EXP-1-head", 2)])
    assert result.dense and result.timestamps_kept == 1
    assert result.points_median > 10_000 and result.gt_point_error_median_mm <= 1.0
