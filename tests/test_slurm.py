"""The cluster paths on a real SLURM scheduler: a single-node SLURM started by scripts/local-slurm.sh.

Skipped, with the reason, where that scheduler cannot be started (it needs root, and apt to install
slurm-wlm and munge when they are missing). Its daemons live in a network namespace with loopback only;
every client (sbatch, squeue, scancel, `build --cluster slurm` with its Dask scheduler) runs there through
``local-slurm.sh run``. Accounting is off, so the tests confirm that jobs ran from their output files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facecanon_data.paths import PROJECT_ROOT

pytestmark = pytest.mark.cluster

EXE = Path(sys.executable).parent / "facecanon-data"
SCRIPT = PROJECT_ROOT / "scripts" / "local-slurm.sh"


@pytest.fixture(scope="module")
def slurm_env():
    """Environment of a running local SLURM (its own folder and ports: never a user's instance)."""
    folder = Path(f"/tmp/facecanon-slurm-test-{os.getuid()}")  # short: munge's socket path has a length limit
    env = {**os.environ, "FACECANON_SLURM_DIR": str(folder), "FACECANON_SLURM_PORT": "16827",
           "FACECANON_SLURM_NETNS": "facecanon-slurm-test"}
    r = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"no local SLURM scheduler: {(r.stderr or r.stdout).strip()[-400:]}")
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


def _two_subjects(synth_capture, tmp_path) -> Path:
    cap = tmp_path / "capture"
    cap.mkdir()
    shutil.copytree(synth_capture["out"] / "capture" / "900", cap / "900")
    shutil.copytree(cap / "900", cap / "901")
    (tmp_path / "m.txt").write_text("900\n901\n")
    return cap


def _slurm_pipeline(tmp_path, cap, cpu_jobs: int = 2) -> Path:
    from fakes import small_pipeline

    memory_gb = 4
    return small_pipeline(tmp_path / "p.toml", cap, top='name = "slurm-test"\nthreads = 1', extra=f"""
[slurm]
queue = "local"
walltime = "00:30:00"
cores = 1
memory = "{memory_gb}GB"
processes = 1
cpu_jobs = {cpu_jobs}
wait_for_workers = {cpu_jobs}
wait_timeout_s = 600
gpu_jobs = 0
log_directory = "{tmp_path / 'slurm-logs'}"
interface = "lo"
""")


def _in_slurm(*cmd: str) -> list[str]:
    """A client command, run in the local SLURM's network namespace."""
    return ["bash", str(SCRIPT), "run", *cmd]


def _build(tmp_path, cap, pipeline, env) -> subprocess.Popen:
    args = ["build", "--subjects", str(tmp_path / "m.txt"), "--pipeline", str(pipeline), "--root", str(cap),
            "--out", str(tmp_path / "store"), "--work", str(tmp_path / "work"), "--cluster", "slurm", "--json"]
    return subprocess.Popen(_in_slurm(str(EXE), *args), cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _validate(store: Path) -> dict:
    v = subprocess.run([str(EXE), "validate", str(store), "--json"], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    return json.loads(v.stdout.strip().splitlines()[-1])


def _squeue(env) -> list[tuple[str, str]]:
    """(job id, name) of the jobs SLURM has queued or running."""
    r = subprocess.run(_in_slurm("squeue", "-h", "-o", "%i %j"), env=env, capture_output=True, text=True, check=True)
    return [tuple(line.split()) for line in r.stdout.splitlines() if line.strip()]


def test_build_on_slurm_with_jobqueue_workers_ends_in_a_valid_store(synth_capture, tmp_path, slurm_env):
    """`build --cluster slurm`: dask-jobqueue submits the [slurm] table's CPU jobs with sbatch, the
    workers they start run both subjects, and the store validates; the job scripts are logged as
    submitted and every job's output file shows its worker."""
    cap = _two_subjects(synth_capture, tmp_path)
    proc = _build(tmp_path, cap, _slurm_pipeline(tmp_path, cap), slurm_env)
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert [s["subject"] for s in result["subjects"] if s["ok"]] == ["900", "901"]
    assert _validate(tmp_path / "store")["subjects"] == ["900", "901"]
    assert "SLURM cpu job script (submitted):" in err and "#SBATCH -p local" in err and "#SBATCH --mem=4G" in err
    logs = sorted((tmp_path / "slurm-logs").glob("*.err"))
    assert len(logs) >= 2 and all("Start worker at" in p.read_text() for p in logs[:2]), logs


def test_a_cancelled_worker_job_fails_or_retries_its_subject_and_a_rerun_completes(synth_capture, tmp_path,
                                                                                     slurm_env):
    """`scancel` of a worker job while subjects are mid-chain: the build either retries the lost tasks
    on the other worker or reports the subject failed; the store never holds a half-written subject,
    and a second build completes both."""
    cap = _two_subjects(synth_capture, tmp_path)
    pipeline = _slurm_pipeline(tmp_path, cap)
    proc = _build(tmp_path, cap, pipeline, slurm_env)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # wait until a subject is mid-reconstruct
        if list((tmp_path / "work").glob("*/reconstruct/*/*/_DONE.json")):
            break
        time.sleep(0.5)
    jobs = _squeue(slurm_env)
    assert proc.poll() is None and jobs, "the build ended before a worker job could be cancelled"
    subprocess.run(_in_slurm("scancel", jobs[0][0]), env=slurm_env, check=True)
    out, err = proc.communicate(timeout=1200)
    result = json.loads(out.strip().splitlines()[-1])
    done = [s["subject"] for s in result["subjects"] if s["ok"]]
    failed = {s["subject"]: s["reason"] for s in result["subjects"] if not s["ok"]}
    assert proc.returncode == (1 if failed else 0) and sorted([*done, *failed]) == ["900", "901"]
    print(f"cancelled job {jobs[0][0]} ({jobs[0][1]}); completed: {done}; failed: {failed}")  # shown with -rP
    if (tmp_path / "store" / "zarr.json").exists():
        assert _validate(tmp_path / "store")["subjects"] == sorted(done)  # nothing half-written
    rerun = _build(tmp_path, cap, pipeline, slurm_env)
    out, err = rerun.communicate(timeout=1200)
    assert rerun.returncode == 0, err[-3000:]
    assert _validate(tmp_path / "store")["subjects"] == ["900", "901"]


def test_sbatch_array_writes_one_subject_per_task_into_one_store(synth_capture, tmp_path, slurm_env):
    """pipelines/slurm_array.sbatch as users submit it, two array tasks running at once on the two
    cores, both committing into one shared store; `index` and `validate` then see both subjects."""
    cap = _two_subjects(synth_capture, tmp_path)
    pipeline = _slurm_pipeline(tmp_path, cap)
    logs = tmp_path / "array-logs"
    logs.mkdir()
    env = {**slurm_env, "WORK": str(tmp_path / "work")}
    r = subprocess.run(_in_slurm("sbatch", "--parsable", "--array=1-2", "--cpus-per-task=1", "--mem=4G", "--gres=none",
                        f"--chdir={PROJECT_ROOT}", f"--output={logs}/%x-%A_%a.out",
                        str(PROJECT_ROOT / "pipelines" / "slurm_array.sbatch"), str(tmp_path / "m.txt"),
                        str(tmp_path / "store"), str(pipeline)), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    deadline = time.time() + 1200
    started_together = False
    while time.time() < deadline:
        running = [j for j, _ in _squeue(slurm_env) if j.startswith(f"{job}_")]
        started_together |= len(running) == 2
        if not running:
            break
        time.sleep(1)
    outputs = sorted(logs.glob(f"*-{job}_*.out"))
    assert [p.name.rsplit("_", 1)[1] for p in outputs] == ["1.out", "2.out"], outputs
    for task, subject in zip(outputs, ("900", "901")):  # each task's output file: its subject built
        text = task.read_text()
        # a batch log is no terminal: the table is one tab-separated line per subject, never cut
        assert "build: 1 ok, 0 failed" in text and f"\n{subject}\tok\t" in text, text[-2000:]
    assert started_together
    subprocess.run([str(EXE), "index", str(tmp_path / "store")], check=True, capture_output=True)
    assert _validate(tmp_path / "store")["subjects"] == ["900", "901"]
    import pyarrow.parquet as pq

    index = pq.read_table(tmp_path / "store" / "index.parquet").to_pydict()
    assert sorted(set(index["subject"])) == ["900", "901"]
