"""The command line: help, lazy imports, JSON output contract."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "facecanon-data"


def test_package_import_is_light():
    code = ("import sys, facecanon_data, facecanon_data.cli, facecanon_data.config, facecanon_data.flame;"
            "print([m for m in ('torch', 'open3d', 'mediapipe', 'pycolmap', 'cv2') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_is_fast_and_documents_every_synth_option():
    t = time.perf_counter()
    subprocess.run([str(EXE), "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t < 2.0
    out = subprocess.run([str(EXE), "synth", "--help"], capture_output=True, text=True, check=True,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    for opt in ("--out", "--subjects", "--sequences", "--frames", "--seed", "--workers", "--verify",
                "--pipeline", "--json"):
        assert opt in out
    assert out.count("\n") > 10


def test_bad_pipeline_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("[synth]\nframes = -3\n")
    r = subprocess.run([str(EXE), "synth", "--pipeline", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "p.toml: synth.frames must be >= 1" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_synth_json_is_last_stdout_line(tmp_path):
    r = subprocess.run([str(EXE), "synth", "--out", str(tmp_path / "s"), "--frames", "1", "--sequences", "1",
                        "--no-verify", "--workers", "1", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["images_written"] == 16 and result["subjects"] == ["900"]
    assert (tmp_path / "s" / "capture" / "900" / "calibration" / "camera_params.json").is_file()
