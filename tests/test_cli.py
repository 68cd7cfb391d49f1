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


def test_tables_never_cut_a_cell_in_a_log_or_on_a_narrow_terminal():
    import io

    from rich.console import Console

    from facecanon_data.cli import _print_table

    reason = "FAILED in reconstruct: /a/very/long/path/to/the/capture/900/calibration/camera_params.json: not found"
    log = io.StringIO()
    _print_table("build: 0 ok, 1 failed", ["subject", "status", "seconds"], [["900", reason, "12.3456789"]],
                 Console(file=log, force_terminal=False, width=40))
    lines = log.getvalue().splitlines()
    assert lines[0] == "build: 0 ok, 1 failed" and lines[1].split("\t") == ["subject", "status", "seconds"]
    assert lines[2].split("\t") == ["900", reason, "12.3456789"]  # machine-readable, every cell whole
    term = io.StringIO()
    _print_table("t", ["status"], [[reason]], Console(file=term, force_terminal=True, width=40, color_system=None))
    folded = "".join(ch for ch in term.getvalue() if ch not in "│┃┏┓┗┛┡┩└┘━─╇┯┷┳┻ \n")
    assert reason.replace(" ", "") in folded  # wrapped over lines, not cut with an ellipsis
    assert "…" not in term.getvalue()
