"""Stage select on the synthetic capture: outputs, no-face frames, the .task backends."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facecanon_data.config import load_pipeline
from facecanon_data.features import FACE_LANDMARKER_ENV, ModelFileError
from facecanon_data.paths import PROJECT_ROOT, default_pipeline
from facecanon_data.sources import NeRSembleSource
from facecanon_data.stages.select import read_selection, run_select


class _BlankFrames(NeRSembleSource):
    """The synthetic capture with some frontal-camera frames replaced by an empty grey image."""

    blank: set = set()

    def frames(self, subject, sequence, serial, indices=None, downscale=1):
        for i, img in super().frames(subject, sequence, serial, indices, downscale):
            yield i, (np.full_like(img, 128) if (sequence, i) in self.blank else img)


@pytest.fixture(scope="module")
def selected(synth_capture, tmp_path_factory):
    out = synth_capture["out"]
    source = _BlankFrames(out / "capture", out / "ground_truth")
    source.blank = {("EXP-1-head", 0), ("EXP-1-head", 7), ("EXP-2-eyes", 3)}
    cfg = load_pipeline(default_pipeline(), {"select": {"num_expression": 6, "num_pose": 2}})
    work = tmp_path_factory.mktemp("work")
    return run_select(source, "900", cfg, work), work, source


def test_outputs_and_counts(selected):
    result, work, _ = selected
    assert result.backend == "facemesh"
    assert (result.selected_expression, result.selected_pose) == (6, 2)
    assert result.frames_processed == 16
    assert result.frontal_detect_rate == pytest.approx(13 / 16)  # the three blank frames
    assert result.color_correction is True and result.figures()["color_correction"] is True
    folder = work / "900" / "select"
    assert not (folder / "_DONE.json").exists()  # markers are the runner's, never a stage's
    feats = {k: np.asarray(v) for k, v in pq.read_table(folder / "features.parquet").to_pydict().items()}
    det = feats["detected"].astype(bool)
    assert len(det) == 16 and det.sum() == 13
    assert {"sequence", "frame", "score", "expr_0", "pose_5"} <= set(feats)
    score = feats["score"].astype(float)
    assert ((score[det] > 0) & (score[det] <= 1)).all() and np.isnan(score[~det]).all()
    rows = read_selection(work, "900")
    assert len(rows) == 8 and len({(s, f) for s, f, _, _ in rows}) == 8  # disjoint
    assert [r[2] for r in rows].count("pose") == 2
    assert (folder / "coverage.png").stat().st_size > 10_000


def test_frames_without_a_face_are_never_selected(selected):
    _, work, source = selected
    chosen = {(s, f) for s, f, _, _ in read_selection(work, "900")}
    assert not chosen & source.blank


def test_pose_picks_include_the_extreme_head_turns(selected, synth_capture):
    result, work, source = selected
    gt = source.ground_truth("900")
    yaw = {(s, f): abs(float(gt.frame(s, f)["global_rot"][1] + gt.frame(s, f)["neck"][1]))
           for s in ("EXP-1-head", "EXP-2-eyes") for f in range(8) if (s, f) not in source.blank}
    picked = {(s, f) for s, f, _, _ in read_selection(work, "900")}
    # The most-turned frame with a face is among the picks (FPS reaches the pose extremes).
    assert max(yaw, key=yaw.get) in picked
    assert result.gt_coverage_gain is not None and result.gt_coverage_gain_mean is not None


def test_missing_task_file_is_an_error_naming_it(synth_capture, tmp_path, monkeypatch):
    out = synth_capture["out"]
    source = NeRSembleSource(out / "capture")
    cfg = load_pipeline(default_pipeline(), {"select": {"face_landmarker_task": str(tmp_path / "nope.task")}})
    with pytest.raises(ModelFileError, match=r"nope.task: face_landmarker.task not found \(set by select.face_landmarker_task"):
        run_select(source, "900", cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # failed before writing anything
    monkeypatch.setenv(FACE_LANDMARKER_ENV, str(tmp_path / "env.task"))
    cfg = load_pipeline(default_pipeline())
    with pytest.raises(ModelFileError, match=r"env.task: .*\$FACECANON_FACE_LANDMARKER"):
        run_select(source, "900", cfg, tmp_path / "w")


def _task_file() -> Path | None:
    for cand in (os.environ.get(FACE_LANDMARKER_ENV), PROJECT_ROOT / "flame_assets" / "face_landmarker.task"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


@pytest.mark.skipif(_task_file() is None,
                    reason=f"no face_landmarker.task (set ${FACE_LANDMARKER_ENV} or put it in flame_assets/): "
                           "the blendshapes backend needs MediaPipe's licensed-download model file")
def test_blendshapes_backend(synth_capture, tmp_path):
    out = synth_capture["out"]
    cfg = load_pipeline(default_pipeline(), {"select": {"face_landmarker_task": str(_task_file()),
                                                        "num_expression": 4, "num_pose": 1}})
    result = run_select(NeRSembleSource(out / "capture"), "900", cfg, tmp_path)
    assert result.backend == "blendshapes" and result.frontal_detect_rate >= 0.9
    feats = pq.read_table(tmp_path / "900" / "select" / "features.parquet").to_pydict()
    e0 = np.asarray(feats["expr_0"], float)
    assert "expr_51" in feats and ((e0[~np.isnan(e0)] >= 0) & (e0[~np.isnan(e0)] <= 1)).all()


def test_first_frames_mode_keeps_consecutive_frames_without_detection(synth_capture, tmp_path):
    out = synth_capture["out"]
    source = NeRSembleSource(out / "capture", out / "ground_truth")
    cfg = load_pipeline(default_pipeline(), {"select": {"timestamps": "first:5",
                                                        "include_sequences": ["EXP-2-eyes"]}})
    result = run_select(source, "900", cfg, tmp_path)
    rows = read_selection(tmp_path, "900")
    assert rows == [("EXP-2-eyes", f, "first", f) for f in range(5)]
    assert (result.mode, result.selected_first, result.frontal_detect_rate) == ("first:5", 5, None)
    assert result.color_correction  # the embedded capture ships color_calibration.json, like NeRSemble v2
    assert not (tmp_path / "900" / "select" / "features.parquet").exists()  # no detector ran
    cfg = load_pipeline(default_pipeline(), {"select": {"timestamps": "first:100"}})  # longer than the sequences
    run_select(source, "900", cfg, tmp_path)
    counts = {s: sum(r[0] == s for r in read_selection(tmp_path, "900")) for s in ("EXP-1-head", "EXP-2-eyes")}
    assert counts == {s: source.num_frames("900", s) for s in counts}


@pytest.mark.parametrize("mode", ["first", "first:0", "first:x", "last:4", "FIRST:4"])
def test_bad_timestamp_mode_is_refused_naming_the_key(tmp_path, mode):
    from facecanon_data.config import ConfigError

    p = tmp_path / "p.toml"
    p.write_text(f'[select]\ntimestamps = "{mode}"\n')
    with pytest.raises(ConfigError, match=r"p\.toml: select\.timestamps"):
        load_pipeline(p)


def test_manifest_timestamps_option(tmp_path):
    from facecanon_data.manifest import ManifestError, read_manifest
    from facecanon_data.orchestration.run import _entry_config

    m = tmp_path / "m.txt"
    m.write_text("900 timestamps=first:40 EXP-1-head\n901\n")
    entries = read_manifest(m)
    assert (entries[0].sequences, entries[0].timestamps, entries[1].timestamps) == (["EXP-1-head"], "first:40", "")
    cfg = load_pipeline(default_pipeline())
    assert _entry_config(cfg, entries, "900").select.timestamps == "first:40"
    assert _entry_config(cfg, entries, "901").select.timestamps == "select"
    for line, problem in (("900 timestamps=first:0", "first:N"), ("900 frames=3", "unknown option")):
        m.write_text(line + "\n")
        with pytest.raises(ManifestError, match=rf"m\.txt:1: .*{problem}"):
            read_manifest(m)
