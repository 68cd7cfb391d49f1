"""The embedded capture's colour calibration: written like NeRSemble v2's, it undoes each camera's
simulated response, the pipeline applies it, and a capture without one still works and says so."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from facecanon_data.bench import bench_color
from facecanon_data.sources.color import apply_color_correction
from facecanon_data.sources.nersemble import NeRSembleSource
from facecanon_data.synthetic.studio import camera_response, expose, response_correction


def test_the_fitted_correction_undoes_a_camera_response():
    responses = camera_response(np.random.default_rng(3), 8)
    reference = np.random.default_rng(4).uniform(0, 0.93, (64, 64, 3)).astype(np.float32)  # none clips
    truth = (reference * 255 + 0.5).astype(np.uint8).astype(float)
    for response in responses:
        seen = expose(reference, response, np.random.default_rng(0), noise=0.0)
        corrected = apply_color_correction(seen, response_correction(response)).astype(float)
        before, after = np.abs(seen - truth).mean(), np.abs(corrected - truth).mean()
        assert after < 0.75 and after < before / 4, (response, before, after)


def test_synth_writes_a_colour_calibration_for_every_camera(synth_capture):
    calib = synth_capture["out"] / "capture" / "900" / "calibration"
    table = json.loads((calib / "color_calibration.json").read_text())
    serials = json.loads((calib / "camera_params.json").read_text())["world_2_cam"]
    assert set(table) == set(serials)
    assert all(np.asarray(m).shape == (3, 10) for m in table.values())
    assert NeRSembleSource(synth_capture["out"] / "capture").color_correction_applied("900")


def test_corrected_cameras_agree_on_the_colour_of_a_surface_point(synth_capture, pipeline):
    out = synth_capture["out"]
    result = bench_color(NeRSembleSource(out / "capture", out / "ground_truth"), "900", pipeline)
    before, after = result["uncorrected"], result["corrected"]
    assert before["pairs"] == after["pairs"] > 10_000
    assert before["bias_levels_mean"] > 4.0  # the simulated responses (gain +-6 %, white balance +-3 %)
    assert after["bias_levels_mean"] < 1.0 and result["bias_ratio"] < 0.15
    assert after["delta_e_median"] < 0.7 * before["delta_e_median"]


def test_a_capture_without_colour_calibration_still_works_and_says_so(synth_capture, tmp_path):
    from facecanon_data.config import load_pipeline
    from facecanon_data.paths import default_pipeline
    from facecanon_data.stages.chain import STAGES
    from facecanon_data.stages.select import run_select

    root = tmp_path / "capture"
    shutil.copytree(synth_capture["out"] / "capture" / "900", root / "900")
    (root / "900" / "calibration" / "color_calibration.json").unlink()
    source = NeRSembleSource(root)
    source.check_subject("900")
    assert not source.color_correction_applied("900")
    cfg = load_pipeline(default_pipeline(), {"select": {"timestamps": "first:2"}})
    result = run_select(source, "900", cfg, tmp_path / "work")
    assert result.figures()["color_correction"] is False
    assert "no colour correction" in STAGES["select"].describe("900", result.figures())
    with pytest.raises(ValueError, match="color_calibration.json: missing"):
        bench_color(NeRSembleSource(root, synth_capture["out"] / "ground_truth"), "900", cfg)
