"""bench subject: one small subject through every stage in its own process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


EXE = Path(sys.executable).parent / "facecanon-data"


@pytest.mark.e2e
def test_bench_subject_measures_every_stage_in_its_own_process(tmp_path):
    """`bench subject` at a small size: per-stage seconds and peak RSS, store and work bytes, projection."""
    out = tmp_path / "bench"
    pipeline = tmp_path / "b.toml"
    pipeline.write_text(f"""work = "{out}/work"
store = "{out}/store"
[capture]
root = "{out}/capture"
downscale = 1
[reconstruct]
dense = "none"
[flame]
kind = "synthetic"
[synth]
out = "{out}"
sequences = 1
frames = 3
width = 416
height = 608
focal = 1450.0
[select]
num_expression = 2
num_pose = 1
[track]
iterations = [40, 40, 60, 60]
""")
    r = subprocess.run([str(EXE), "bench", "subject", "--pipeline", str(pipeline), "--json"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    b = json.loads(r.stdout.strip().splitlines()[-1])
    stages = ("select", "reconstruct", "track", "canonicalize", "render", "write")
    assert set(b["peak_rss_gb"]) == set(stages) == set(b["seconds"])
    assert all(0.05 < b["peak_rss_gb"][s] < 8 for s in stages), b["peak_rss_gb"]  # each a whole Python process
    assert b["peak_rss_gb_chain"] == max(b["peak_rss_gb"].values())
    assert b["timestamps"] == 3 and b["views"] == 48 and b["store_mb_per_view"] > 0.05
    assert 0 < b["work_mb_per_timestamp"] < b["work_mb_per_timestamp_all"] / 5  # the light policy applied
    p = b["projection"]
    assert p["subjects"] == 414 and p["cpu_hours"] > 0 and p["store_tb"] > 0 and p["gpu_hours"] is None
    assert (out / "capture" / "900").is_dir()  # cached for the next run
