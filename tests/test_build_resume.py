"""build: a build killed in three stages resumes to the arrays of a clean build."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fakes import build_cmd as _build_cmd, build_pipeline as _pipeline

EXE = Path(sys.executable).parent / "facecanon-data"


def _arrays(store: Path) -> dict:
    import numpy as np
    import zarr

    g = zarr.open_group(str(store / "subjects" / "900"), mode="r")
    names = ["rgb", "depth", "canonical", "mask", "K", "world_2_cam", "points/xyz", "points/canonical"]
    names += [f"track/{k}" for k in g["track"].array_keys()]
    return {n: np.asarray(g[n][...]) for n in names}


@pytest.mark.e2e
def test_sigkill_at_three_stages_then_resume_gives_identical_arrays(synth_capture, tmp_path):
    import numpy as np

    cap = tmp_path / "capture"
    cap.mkdir()
    shutil.copytree(synth_capture["out"] / "capture" / "900", cap / "900")
    pipeline = _pipeline(tmp_path, cap)
    manifest = tmp_path / "m.txt"
    manifest.write_text("900\n")
    clean = tmp_path / "clean"
    r = subprocess.run(_build_cmd(manifest, pipeline, cap, clean), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    reference = _arrays(clean / "store")

    def mid(stage):
        def condition(work: Path) -> bool:
            folder = work / "900" / stage
            if stage == "reconstruct":
                return any(folder.glob("*/*/_DONE.json")) and not (folder / "_DONE.json").exists()
            return folder.is_dir() and not (folder / "_DONE.json").exists()
        return condition

    # One build killed three times in a row (mid reconstruct, then mid track, then mid render), each restart
    # resuming what the previous one left, then a last resume: its store must equal the clean build's.
    run = tmp_path / "killed"
    for stage in ("reconstruct", "track", "render"):
        proc = subprocess.Popen(_build_cmd(manifest, pipeline, cap, run), cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline and not mid(stage)(run / "work") and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"build finished before it could be killed in {stage}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (run / "store" / "subjects" / "900").exists()
    r = subprocess.run(_build_cmd(manifest, pipeline, cap, run), capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = _arrays(run / "store")
    assert got.keys() == reference.keys()
    for name, arr in reference.items():
        assert np.array_equal(got[name], arr), f"{name} differs after kills in reconstruct, track and render"
