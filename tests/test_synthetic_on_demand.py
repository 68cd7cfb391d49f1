"""The path a new user takes: `build` on a synthetic manifest renders exactly the missing subjects.

Rendering is deterministic per subject id, never replaces or deletes a subject folder that exists,
and a present but malformed subject is an error naming the file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXE = Path(sys.executable).parent / "facecanon-data"


def _tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_cfg():
    from facecanon_data.config import load_pipeline
    from facecanon_data.paths import default_pipeline

    # 1 sequence x 2 frames at half the demo size: only the rendering mechanism is under test here.
    return load_pipeline(default_pipeline(), {"synth": {"frames": 2, "sequences": 1, "width": 416, "height": 608,
                                                         "workers": 2}})


@pytest.mark.e2e
def test_missing_synthetic_subject_is_rendered_alone_and_identical(tmp_path):
    from facecanon_data.orchestration.run import ensure_synthetic_capture
    from facecanon_data.synthetic.synth import synthesize

    cfg = _tiny_cfg()
    together, alone = tmp_path / "together", tmp_path / "alone"
    synthesize(cfg, out=together, verify=False, subject_ids=["900", "901"])
    synthesize(cfg, out=alone, verify=False, subject_ids=["900"])
    before = {k: _tree_digest(alone / k / "900") for k in ("capture", "ground_truth")}

    gt = ensure_synthetic_capture(cfg, str(alone / "capture"), ["900", "901"])

    assert Path(gt) == alone / "ground_truth"
    assert {k: _tree_digest(alone / k / "900") for k in ("capture", "ground_truth")} == before  # untouched
    # 901 rendered alone equals 901 rendered after 900: the same identity, performance and videos.
    for name in ("subject.npz", "EXP-1-head.npz"):
        with np.load(together / "ground_truth" / "901" / name) as a, np.load(alone / "ground_truth" / "901" / name) as b:
            assert a.files == b.files
            for key in a.files:
                assert np.array_equal(a[key], b[key]), f"{name}:{key} differs"
    assert _tree_digest(together / "capture" / "901") == _tree_digest(alone / "capture" / "901")
    # 900 and 901 are different people (the streams are per subject, not one stream restarted).
    with np.load(alone / "ground_truth" / "900" / "subject.npz") as a, np.load(alone / "ground_truth" / "901" / "subject.npz") as b:
        assert not np.allclose(a["shape"], b["shape"])
    # Nothing left to render: a second call touches nothing.
    digest = _tree_digest(alone)
    ensure_synthetic_capture(cfg, str(alone / "capture"), ["900", "901"])
    assert _tree_digest(alone) == digest


def test_synth_never_replaces_an_existing_subject(tmp_path):
    from facecanon_data.synthetic.synth import SynthError, synthesize

    cfg = _tiny_cfg()
    (tmp_path / "ground_truth" / "900").mkdir(parents=True)  # e.g. left by an interrupted run
    with pytest.raises(SynthError, match=r"ground_truth/900: already exists"):
        synthesize(cfg, out=tmp_path, verify=False, subject_ids=["900"])
    with pytest.raises(SynthError, match="not a synthetic subject id"):
        synthesize(cfg, out=tmp_path, verify=False, subject_ids=["017"])
    assert not (tmp_path / "capture" / "900").exists()


def _pipeline(folder: Path, frames: int = 6) -> Path:
    """A small pipeline whose paths are relative to the folder it runs in, like pipelines/synthetic.toml."""
    from fakes import small_pipeline

    return small_pipeline(folder / "p.toml", "out/capture", top='name = "synthetic"\nwork = "out/work"\nstore = "out/store"',
                          capture='ground_truth = "out/ground_truth"',
                          extra=f'[synth]\nout = "out"\nsubjects = 1\nsequences = 1\nframes = {frames}\n')


def test_present_subject_without_calibration_fails_naming_the_file_and_is_untouched(synth_capture, tmp_path):
    subject = tmp_path / "out" / "capture" / "900"
    shutil.copytree(synth_capture["out"] / "capture" / "900", subject)
    (subject / "calibration" / "camera_params.json").unlink()
    before = _tree_digest(subject)
    (tmp_path / "m.txt").write_text("900\n")
    r = subprocess.run([str(EXE), "build", "--subjects", "m.txt", "--pipeline", str(_pipeline(tmp_path)), "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]  # the subject fails alone (fault isolation), naming the file
    (outcome,) = json.loads(r.stdout.strip().splitlines()[-1])["subjects"]
    assert not outcome["ok"] and "900/calibration/camera_params.json: file not found" in outcome["reason"]
    assert _tree_digest(subject) == before  # never re-rendered
    assert not (tmp_path / "out" / "ground_truth").exists()
    assert not (tmp_path / "out" / "store" / "subjects" / "900").exists()


@pytest.mark.e2e
def test_build_from_an_empty_folder_renders_the_capture_and_ends_in_a_valid_store(tmp_path):
    """`facecanon-data build --subjects M` in an empty folder, as the README's `make demo` runs it."""
    (tmp_path / "m.txt").write_text("# the embedded default\n900\n")
    pipeline = _pipeline(tmp_path)
    r = subprocess.run([str(EXE), "build", "--subjects", "m.txt", "--pipeline", str(pipeline), "--workers", "1",
                        "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    (outcome,) = result["subjects"]
    assert outcome["ok"] and outcome["timestamps_kept"] >= 2, outcome
    assert (tmp_path / "out" / "capture" / "900" / "calibration" / "camera_params.json").is_file()
    assert (tmp_path / "out" / "ground_truth" / "900" / "subject.npz").is_file()
    v = subprocess.run([str(EXE), "validate", "out/store", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout.strip().splitlines()[-1])["subjects"] == ["900"]
    # The ground truth was found for the freshly rendered subject: the report carries its errors.
    rep = subprocess.run([str(EXE), "report", "out/store", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    (row,) = json.loads(rep.stdout.strip().splitlines()[-1])["subjects"]
    assert row["gt_canonical_error_mm"] is not None and row["gt_canonical_error_mm"] < 10.0
    assert row["gt_canonical_error_mm_face_hair"] is not None and row["gt_canonical_error_mm_face_hair"] < 4.0
    # render measures every transfer mode against the ground truth, near the surface and beyond
    (marker,) = (tmp_path / "out").glob("**/900/render/_DONE.json")
    by_transfer = json.loads(marker.read_text())["figures"]["gt_canonical_error_mm_by_transfer"]
    assert 0 <= by_transfer["far_pixel_fraction"] < 0.2
    for mode in ("translate", "local_frame"):
        assert 0 < by_transfer[f"{mode}_near"] < 5.0, by_transfer
    # The harder capture: the error by region covers the hair, the paper's face + hair figure holds, and
    # the torso (foreground, not head) is kept out of the labels by canonicalize's body rule.
    figures = json.loads(marker.read_text())["figures"]
    assert {"face", "hair"} <= set(figures["gt_canonical_error_mm_by_region"]), figures
    assert figures["gt_canonical_error_mm_face_hair"] < 4.0, figures
    assert figures["gt_not_head_fraction"] < 0.05, figures
    # the stored face + hair region (the evaluation's stand-in for Facer masks) against the ground truth's
    assert figures["region_iou_face_hair"] >= 0.9 and figures["region_iou_face_hair_min"] >= 0.85, figures
    (canon,) = (tmp_path / "out").glob("**/900/canonicalize/_DONE.json")
    assert json.loads(canon.read_text())["figures"]["points_body"] > 0
