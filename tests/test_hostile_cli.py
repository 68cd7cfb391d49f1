"""The command line under bad input and a bad machine: one line naming the file, exit 2, nothing
half-written (the store-level cases are in test_store_integrity.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes import fake_subject
from facecanon_data.store import build_index, write_subject

EXE = Path(sys.executable).parent / "facecanon-data"
ROOT = Path(__file__).parent.parent


def _run(*args, cwd=None):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def _error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "store"
    write_subject(path, fake_subject("900", t=2, views=3))
    build_index(path)
    return path


def test_build_with_a_file_as_root_fails_before_rendering_anything(tmp_path):
    root = tmp_path / "capture.txt"
    root.write_text("not a folder")
    r = _run("build", "--subjects", ROOT / "manifests" / "synthetic.txt", "--root", root,
             "--out", tmp_path / "store", "--work", tmp_path / "work", cwd=tmp_path)
    assert "capture.txt: not a folder" in _error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture.txt"]  # nothing rendered beside it


def test_commands_on_a_damaged_store_name_the_file(store):
    (store / "index.parquet").write_bytes((store / "index.parquet").read_bytes()[:100])  # truncated
    pipeline = store.parent / "train.toml"
    pipeline.write_text((ROOT / "pipelines" / "train_tiny.toml").read_text())
    assert "index.parquet: unreadable" in _error_line(_run("train", "--config", pipeline, "--store", store,
                                                            "--out", store.parent / "t"))
    meta = store / "subjects" / "900" / "zarr.json"
    meta.write_text(meta.read_text()[:-40])  # a damaged subject's metadata
    assert "subjects/900/zarr.json: malformed group metadata" in _error_line(_run("index", store))
    assert "subjects/900/zarr.json: malformed group metadata" in _error_line(_run("report", store))
    r = _run("validate", store, "--json")
    assert r.returncode == 1 and any("malformed group metadata" in p for p in json.loads(r.stdout.splitlines()[-1])["problems"])


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_full_disk_or_read_only_store_is_one_line_and_leaves_the_old_index(store, code):
    before = (store / "index.parquet").read_bytes()
    script = ("import errno, sys, pyarrow.parquet as pq\n"
              "real = pq.write_table\n"
              "def failing(table, where, **kw):\n"
              "    real(table, where, **kw)  # part of the file is written, then the disk says no\n"
              f"    raise OSError(errno.{code}, __import__('os').strerror(errno.{code}), str(where))\n"
              "pq.write_table = failing\n"
              f"sys.argv = ['facecanon-data', 'index', {str(store)!r}]\n"
              "from facecanon_data.cli import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    line = _error_line(r)
    assert ".parquet: " in line and ("No space left" in line or "Read-only" in line), line
    assert (store / "index.parquet").read_bytes() == before
    assert sorted(p.name for p in store.iterdir()) == [".staging", "index.parquet", "subjects", "zarr.json"]
    assert list((store / ".staging").iterdir()) == []


def test_a_write_that_runs_out_of_disk_leaves_the_committed_subject_and_nothing_else(store, monkeypatch):
    import errno
    import os

    from facecanon_data import store as store_mod

    def full(group_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(group_dir))

    monkeypatch.setattr(store_mod, "_chunk_manifest", full)
    with pytest.raises(OSError, match="No space left"):
        write_subject(store, fake_subject("900", t=3, views=3, seed=4))
    assert list((store / ".staging").iterdir()) == []
    monkeypatch.undo()
    assert store_mod.validate_store(store) == []
    assert len(store_mod.subject_attrs(store, "900")["timestamps"]) == 2  # the old version, whole


def test_a_second_run_of_one_subject_waits_for_the_first(tmp_path):
    """What concurrent `build --subject 900` runs share: the subject's work lock. The second waits (and
    says so) instead of running while the first one's clean-up deletes what it reads."""
    from facecanon_data.artifacts import subject_lock

    order, waited = [], []
    with subject_lock(tmp_path, "900"):
        def second():
            with subject_lock(tmp_path, "900", on_wait=waited.append):
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        order.append("first done")
    t.join(10)
    assert order == ["first done", "second"] and waited == [tmp_path / ".locks" / "900.lock"]
    with subject_lock(tmp_path, "901"):  # other subjects do not wait
        with subject_lock(tmp_path, "902", on_wait=waited.append):
            pass
    assert len(waited) == 1


@pytest.mark.e2e
def test_concurrent_builds_of_one_subject_all_succeed(synth_capture, tmp_path):
    from fakes import small_pipeline

    cap = synth_capture["out"] / "capture"
    pipeline = small_pipeline(tmp_path / "p.toml", cap, top="threads = 1", num_expression=1)
    manifest = tmp_path / "m.txt"
    manifest.write_text("900 EXP-1-head\n")
    args = [str(EXE), "build", "--subjects", str(manifest), "--pipeline", str(pipeline), "--root", str(cap),
            "--out", str(tmp_path / "store"), "--work", str(tmp_path / "work"), "--subject", "900", "--json"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in results]
    assert sum("being built by another process" in err for _, err in results) >= 1
    assert _run("validate", tmp_path / "store").returncode == 0
