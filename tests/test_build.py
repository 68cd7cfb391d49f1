"""build: manifests refused before work, fault isolation per subject, resumability."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import build_cmd as _build_cmd, build_pipeline as _pipeline
from facecanon_data.manifest import ManifestError, read_manifest

EXE = Path(sys.executable).parent / "facecanon-data"


@pytest.mark.parametrize("line, message", [("../x", "is not a 3-digit"), ("17", "is not a 3-digit"),
                                           ("900 ../../etc", "invalid sequence"), ("900\n900", "listed twice"),
                                           ("\u0660\u0661\u0667", "is not a 3-digit")])
def test_bad_manifests_are_refused_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "m.txt"
    path.write_text("# subjects\n" + line + "\n")
    with pytest.raises(ManifestError, match=rf"m.txt:\d+: .*{message}"):
        read_manifest(path)


def test_build_refuses_a_malicious_manifest_before_any_work(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("900\n../x\n")
    r = subprocess.run([str(EXE), "build", "--subjects", str(m), "--out", str(tmp_path / "store"),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "m.txt:2: subject id '../x'" in r.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "work").exists()
    assert read_manifest(Path(__file__).parent.parent / "manifests" / "synthetic.txt")[0].subject == "900"


@pytest.mark.e2e
def test_failing_subjects_fail_alone_naming_the_file(synth_capture, tmp_path):
    cap = tmp_path / "capture"
    shutil.copytree(synth_capture["out"] / "capture", cap)
    shutil.copytree(synth_capture["out"] / "ground_truth", tmp_path / "ground_truth")
    shutil.copytree(cap / "900", cap / "901")
    shutil.copytree(cap / "900", cap / "902")
    shutil.copytree(cap / "900", cap / "903")
    (cap / "901" / "calibration" / "camera_params.json").write_text('{"world_2_cam": ')  # malformed
    for seq in ("EXP-1-head", "EXP-2-eyes"):  # a camera missing from every sequence: no usable timestamp
        (cap / "902" / "sequences" / seq / "images" / "cam_222200042.mp4").unlink()
    for seq in ("EXP-1-head", "EXP-2-eyes"):  # truncated video (a non-frontal camera)
        video = cap / "903" / "sequences" / seq / "images" / "cam_222200044.mp4"
        video.write_bytes(video.read_bytes()[:3000])
    pipeline = _pipeline(tmp_path, cap, threads=0)
    manifest = tmp_path / "m.txt"
    manifest.write_text("900\n901\n902\n903\n")
    r = subprocess.run([str(EXE), "build", "--subjects", str(manifest), "--pipeline", str(pipeline), "--root", str(cap),
                        "--out", str(tmp_path / "store"), "--work", str(tmp_path / "work"), "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 1, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    by = {s["subject"]: s for s in result["subjects"]}
    assert by["900"]["ok"] and by["900"]["timestamps_kept"] == 3
    assert not by["901"]["ok"] and "901/calibration/camera_params.json" in by["901"]["reason"]
    assert not by["902"]["ok"] and "cam_222200042.mp4" in by["902"]["reason"]
    assert not by["903"]["ok"] and "cam_222200044.mp4" in by["903"]["reason"]
    v = subprocess.run([str(EXE), "validate", str(tmp_path / "store"), "--json"], capture_output=True, text=True)
    assert v.returncode == 0 and json.loads(v.stdout.strip().splitlines()[-1])["subjects"] == ["900"]
    assert all(status == "ran" for status in by["900"]["stages"].values()) and len(by["900"]["stages"]) == 6

    # A new selection reruns every stage, reconstructs only the timestamps not reconstructed before,
    # and the store holds exactly the new selection; an identical run then reuses everything.
    def build_900(pipeline_file):
        r = subprocess.run([str(EXE), "build", "--subjects", str(manifest), "--pipeline", str(pipeline_file), "--root",
                            str(cap), "--out", str(tmp_path / "store"), "--work", str(tmp_path / "work"), "--json",
                            "--subject", "900"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])["subjects"][0]

    def store_timestamps():
        import zarr

        attrs = zarr.open_group(str(tmp_path / "store" / "subjects" / "900"), mode="r").attrs.asdict()
        return sorted((t["sequence"], t["frame"]) for t in attrs["timestamps"])

    def reconstructed_timestamps():
        marker = json.loads((tmp_path / "work" / "900" / "reconstruct" / "_DONE.json").read_text())["figures"]
        return {(k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])) for k in marker["kept"] + list(marker["dropped"])}

    before = reconstructed_timestamps()  # the store may hold fewer: track drops outlier timestamps
    more = _pipeline(tmp_path, cap, threads=0, name="more.toml", num_expression=3)
    changed = build_900(more)
    assert changed["stages"] == dict.fromkeys(("select", "reconstruct", "track", "canonicalize", "render", "write"),
                                              "ran")
    units = changed["units"]["reconstruct"]
    assert units["ran"] + units["reused"] == 4 and units["ran"] == len(set(_selection(tmp_path)) - set(before))
    import numpy as np

    with np.load(tmp_path / "work" / "900" / "track" / "vertices.npz") as z:
        tracked = sorted((str(k).rsplit("/", 1)[0], int(str(k).rsplit("/", 1)[1])) for k in z["keys"])
    now = store_timestamps()
    assert now == tracked and set(now) <= set(_selection(tmp_path)) and len(now) >= 3
    reconstructed = json.loads((tmp_path / "work" / "900" / "reconstruct" / "_DONE.json").read_text())["figures"]
    assert sorted(reconstructed["kept"] + list(reconstructed["dropped"])) == \
        sorted(f"{s}/{f:06d}" for s, f in _selection(tmp_path))  # exactly the new selection, nothing older
    again = build_900(more)
    assert set(again["stages"].values()) == {"reused"} and sum(again["seconds"].values()) < 5.0


def test_sbatch_array_template_runs_the_array_index_subject(tmp_path):
    template = Path(__file__).parent.parent / "pipelines" / "slurm_array.sbatch"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    stub = tmp_path / "bin" / "facecanon-data"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$@" > "$CALLS"\n')
    stub.chmod(0o755)
    manifest = tmp_path / "m.txt"
    manifest.write_text("# training\n017\n\n018  EXP-1-head\n021\n")
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "2",
           "CALLS": str(tmp_path / "calls")}
    r = subprocess.run(["bash", str(template), str(manifest), "/shared/store"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "calls").read_text().split()
    assert args[args.index("--subject") + 1] == "018" and args[args.index("--out") + 1] == "/shared/store"
    env["SLURM_ARRAY_TASK_ID"] = "9"
    r = subprocess.run(["bash", str(template), str(manifest), "/shared/store"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no subject for array index 9" in r.stderr


def _selection(tmp_path) -> list[tuple[str, int]]:
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "work" / "900" / "select" / "selection.parquet").to_pydict()
    return [(s, int(f)) for s, f in zip(t["sequence"], t["frame"])]


def test_slurm_cluster_has_separate_gpu_jobs():
    """`--cluster slurm`: the job scripts dask-jobqueue would submit (nothing is submitted here)."""
    from facecanon_data.config import load_pipeline
    from facecanon_data.orchestration.slurm import job_scripts

    cfg = load_pipeline(Path(__file__).parent.parent / "pipelines" / "nersemble.toml").slurm
    scripts = job_scripts(cfg)
    cpu, gpu = scripts["cpu"], scripts["gpu"]
    assert "#SBATCH -p cpu" in cpu and "--gres" not in cpu and "--resources" not in cpu
    assert "#SBATCH -p gpu" in gpu and "#SBATCH --gres=gpu:1" in gpu and "--resources GPU=1" in gpu
    assert "--nworkers 4" in cpu and "--cpus-per-task=16" in cpu
    assert all("source .venv/bin/activate" in s for s in (cpu, gpu))


def test_progress_bars_count_stages_and_failures():
    from io import StringIO

    from rich.console import Console

    from facecanon_data.progress import RichBuildProgress
    from facecanon_data.stages.chain import CHAIN

    console = Console(file=StringIO(), width=100)
    with RichBuildProgress(console) as p:
        p.start(["900", "901"], {s.name: s.fans_out for s in CHAIN})
        p.units("900", "reconstruct", 3)
        p.units("901", "reconstruct", 2)
        for _ in range(3):
            p.done("900", "reconstruct")
        p.failed("901", "reconstruct", "calibration.json: malformed")
        for stage in ("select", "track", "canonicalize", "render", "write"):
            p.done("900", stage)
    tasks = {t.description: (t.completed, t.total) for t in p.progress.tasks}
    assert tasks["reconstruct"] == (3, 5) and tasks["track"] == (1, 1) and tasks["write"] == (1, 1)
    assert "subject 901 failed in reconstruct" in console.file.getvalue()


def test_training_manifest_from_nersemble_metadata(tmp_path):
    """`manifest --metadata metadata_sequences.csv`: every participant but the paper's test subjects."""
    csv = tmp_path / "metadata_sequences.csv"
    csv.write_text("ID,wears_glasses,EXP-1-head\n17,,x\n43,,x\n128,x,m\n240,,x\n")
    out = tmp_path / "nersemble.txt"
    r = subprocess.run([str(EXE), "manifest", "--metadata", str(csv), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [e.subject for e in read_manifest(out)] == ["017", "240"]
    csv.write_text("ID\n17\n../x\n")
    r = subprocess.run([str(EXE), "manifest", "--metadata", str(csv), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "metadata_sequences.csv:3: participant id '../x'" in r.stderr
    assert [e.subject for e in read_manifest(out)] == ["017", "240"]  # the previous manifest is untouched


@pytest.mark.e2e
def test_a_subject_that_produced_nothing_fails_the_build(synth_capture, tmp_path):
    """select keeping no timestamp is a failed subject (exit 1) on the Dask path, never "1 ok"."""
    pipeline = _pipeline(tmp_path, synth_capture["out"] / "capture")
    pipeline.write_text(pipeline.read_text().replace("num_expression = 2\nnum_pose = 1", "num_expression = 0\nnum_pose = 0"))
    manifest = tmp_path / "m.txt"
    manifest.write_text("900\n")
    cmd = _build_cmd(manifest, pipeline, synth_capture["out"] / "capture", tmp_path) + ["--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    (outcome,) = json.loads(r.stdout.strip().splitlines()[-1])["subjects"]
    assert not outcome["ok"] and outcome["failed_stage"] == "select"
    assert "select kept no timestamp" in outcome["reason"]
    assert not (tmp_path / "store" / "subjects" / "900").exists()


@pytest.mark.e2e
def test_an_empty_reconstruction_drops_the_timestamp_with_its_reason(synth_capture, tmp_path):
    pipeline = _pipeline(tmp_path, synth_capture["out"] / "capture")
    pipeline.write_text(pipeline.read_text().replace("[reconstruct]\n", "[reconstruct]\nhead_box_half_size_m = 0.000001\n"))
    r = subprocess.run([str(EXE), "reconstruct", "--pipeline", str(pipeline), "--work", str(tmp_path / "w"),
                        "--timestamps", "EXP-1-head:0", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["timestamps_kept"] == 0
    (reason,) = result["dropped"].values()
    assert "no point left after clean-up" in reason and "triangulated" in reason
