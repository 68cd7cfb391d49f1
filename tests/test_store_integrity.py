"""The store under a hostile or unlucky user: interrupted commits, tampered files and metadata, foreign
writers whose checksums match their bad data. Every case ends in a named finding, never in wrong data."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from fakes import fake_subject
from facecanon_data import store as store_mod
from facecanon_data.store import (StoreError, build_index, metadata_digest, subject_attrs, subjects,
                                  validate_store, write_subject)
from facecanon_data.training import FaceCanonDataset
from facecanon_data.training.dataset import BadSampleError, IndexFilter

TESTS = os.path.dirname(__file__)


def _subject(pid: str, seed: int = 0, t: int = 3):
    data = fake_subject(pid, t=t, views=4, seed=seed)
    rng = np.random.default_rng(seed + 100)  # incompressible: the two arrays encode to the same size
    data.track = {"jaw": rng.random((t, 3)).astype(np.float32), "neck": rng.random((t, 3)).astype(np.float32)}
    return data


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity")
    write_subject(path, _subject("900"))
    build_index(path)
    return path


def _copy(src, tmp_path, name="s"):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _reseal(subject_dir):
    """What a foreign writer does: recompute the whole integrity manifest for what the folder now holds
    (so every checksum matches its content, bad or not)."""
    meta = subject_dir / "zarr.json"
    doc = json.loads(meta.read_text())
    integrity = {"files": store_mod._file_manifest(subject_dir),
                 "chunks": store_mod._chunk_manifest(subject_dir)}
    doc["attributes"]["integrity"] = integrity
    doc["attributes"]["integrity"]["digest"] = metadata_digest(doc["attributes"])
    meta.write_text(json.dumps(doc))


def _rewrite_array(subject_dir, name, values):
    import zarr

    arr = zarr.open_array(str(subject_dir / name), mode="r+")
    arr[...] = values


# -- commit: no window that loses a subject --------------------------------------------------------


def _kill_in_commit(target, pid: str, seed: int, exchange: bool) -> subprocess.CompletedProcess:
    """A writer of ``pid`` SIGKILLed inside the commit: between the two renames of the journaled commit
    (``exchange=False``), or right after the atomic exchange, before its clean-up (``exchange=True``)."""
    point = ("store_mod._exchange = (lambda orig: lambda a, b: orig(a, b) and os.kill(os.getpid(), 9))"
             "(store_mod._exchange)" if exchange else
             "store_mod._exchange = lambda a, b: False; store_mod._COMMIT_HOOK = lambda: os.kill(os.getpid(), 9)")
    code = (f"import os, sys; sys.path.insert(0, {TESTS!r}); from test_store_integrity import _subject; "
            f"from facecanon_data import store as store_mod; {point}; "
            f"store_mod.write_subject({str(target)!r}, _subject({pid!r}, seed={seed}, t=2))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_sigkill_between_the_two_renames_is_finished_on_the_next_open(small_store, tmp_path):
    target = _copy(small_store, tmp_path)
    proc = _kill_in_commit(target, "900", seed=5, exchange=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the window this protocol closes: the old subject moved aside, the new one not yet renamed in
    assert not (target / "subjects" / "900").exists()
    assert any(p.suffix == ".commit" for p in (target / ".staging").iterdir())
    assert subjects(target) == ["900"]  # the next open finishes the commit
    assert subject_attrs(target, "900")["timestamps"].__len__() == 2  # the new version (t=2), whole
    assert list((target / ".staging").iterdir()) == []
    build_index(target)
    assert validate_store(target) == []


def test_sigkill_after_the_atomic_exchange_leaves_the_new_subject_and_no_orphan(small_store, tmp_path):
    target = _copy(small_store, tmp_path)
    proc = _kill_in_commit(target, "900", seed=6, exchange=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (target / "subjects" / "900" / "zarr.json").is_file()  # never absent
    assert any((target / ".staging").iterdir())  # the old subject, swapped out, not yet removed
    assert subjects(target) == ["900"] and len(subject_attrs(target, "900")["timestamps"]) == 2
    assert list((target / ".staging").iterdir()) == []


def test_orphans_of_killed_writers_are_removed_and_live_writers_kept(small_store, tmp_path):
    import fcntl

    target = _copy(small_store, tmp_path)
    staging = target / ".staging"
    (staging / "901-0123456789ab").mkdir(parents=True)  # a killed writer's half-written group
    (staging / "901-0123456789ab" / "junk").write_bytes(b"x" * 1000)
    (staging / "900-old-deadbeef").mkdir()  # left by an earlier version's commit
    live = staging / "902-aaaaaaaaaaaa"
    live.mkdir()
    fd = os.open(staging / "902-aaaaaaaaaaaa.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that is alive
    try:
        write_subject(target, _subject("903", seed=3))  # any open recovers
        assert sorted(p.name for p in staging.iterdir()) == ["902-aaaaaaaaaaaa", "902-aaaaaaaaaaaa.lock"]
    finally:
        os.close(fd)
    subjects(target)
    assert list(staging.iterdir()) == []


def test_write_refuses_a_subject_folder_that_is_a_symlink(small_store, tmp_path):
    target = _copy(small_store, tmp_path)
    elsewhere = _copy(small_store / "subjects" / "900", tmp_path, "elsewhere")
    shutil.rmtree(target / "subjects" / "900")
    (target / "subjects" / "900").symlink_to(elsewhere)
    with pytest.raises(StoreError, match=r"subjects/900: is a symbolic link"):
        write_subject(target, _subject("900", seed=1))
    assert (elsewhere / "zarr.json").is_file()  # what the link points at is untouched


# -- validate: checksums of every file, chunks tied to their position, metadata protected ----------


def test_same_size_swaps_are_found(small_store, tmp_path):
    bad = _copy(small_store, tmp_path)
    sub = bad / "subjects" / "900"
    jaw, neck = sub / "track" / "jaw" / "c" / "0" / "0", sub / "track" / "neck" / "c" / "0" / "0"
    assert jaw.stat().st_size == neck.stat().st_size  # the case sizes cannot see
    a, b = jaw.read_bytes(), neck.read_bytes()
    jaw.write_bytes(b)
    neck.write_bytes(a)
    problems = validate_store(bad)
    assert any("track/jaw" in p and "altered" in p for p in problems), problems
    assert any("array track/neck: chunk (0, 0)" in p and "not the chunk written at that position" in p
               for p in problems), problems


def test_chunks_swapped_inside_a_shard_are_found_by_validate_and_the_loader(small_store, tmp_path):
    from facecanon_data.chunk_reader import crc32c

    bad = _copy(small_store, tmp_path)
    shard = bad / "subjects" / "900" / "depth" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    n = 4  # views per shard: the index holds (offset, nbytes) per chunk, then its crc32c
    index = np.frombuffer(bytes(data[-(n * 16 + 4):-4]), "<u8").reshape(n, 2).copy()
    index[[0, 1]] = index[[1, 0]]  # view 0 now reads view 1's chunk and vice versa; each verifies alone
    raw = index.tobytes()
    data[-(n * 16 + 4):] = raw + crc32c(raw).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    assert any("array depth: chunk (0, 0, 0, 0)" in p and "position" in p for p in validate_store(bad))
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20))
    with pytest.raises(BadSampleError, match=r"subject 900, array depth: chunk \(0, [01], 0, 0\).*position"):
        for i in range(len(ds)):
            ds[i]


def test_edited_subject_metadata_is_found_by_validate_index_and_the_loader(small_store, tmp_path):
    bad = _copy(small_store, tmp_path)
    meta = bad / "subjects" / "900" / "zarr.json"
    doc = json.loads(meta.read_text())
    serials = doc["attributes"]["serials"]
    serials[0], serials[1] = serials[1], serials[0]  # views would be labelled with the wrong camera
    meta.write_text(json.dumps(doc))
    assert any("attributes were altered" in p for p in validate_store(bad))
    with pytest.raises(StoreError, match=r"subjects/900/zarr.json: the subject's attributes were altered"):
        build_index(bad)
    with pytest.raises(BadSampleError, match="attributes were altered"):
        FaceCanonDataset(bad, mode="views", images_per_sample=2, resolution=(30, 20))[0]


def test_a_required_array_deleted_with_its_manifest_entries_is_found(small_store, tmp_path):
    bad = _copy(small_store, tmp_path)
    sub = bad / "subjects" / "900"
    shutil.rmtree(sub / "region")
    doc = json.loads((sub / "zarr.json").read_text())
    files = doc["attributes"]["integrity"]["files"]
    for rel in [r for r in files if r.startswith("region/")]:
        del files[rel]
    doc["attributes"]["integrity"]["chunks"].pop("region")
    (sub / "zarr.json").write_text(json.dumps(doc))
    assert any("attributes were altered" in p for p in validate_store(bad))
    _reseal(sub)  # even with a consistent manifest: the schema requires it
    assert any("required array(s) region" in p for p in validate_store(bad))


def test_a_shard_replaced_by_a_folder_is_a_finding_not_a_crash(small_store, tmp_path):
    bad = _copy(small_store, tmp_path)
    shard = bad / "subjects" / "900" / "rgb" / "c" / "0" / "0" / "0" / "0" / "0"
    shard.unlink()
    shard.mkdir()
    problems = validate_store(bad)
    assert any("rgb" in p and "is a folder" in p for p in problems), problems
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20))
    with pytest.raises(BadSampleError, match=r"subject 900, array rgb: shard .* is a folder"):
        ds[0]


# -- the loader trusts nothing: foreign writers whose checksums match bad data ---------------------


def test_a_dtype_edited_in_the_array_metadata_never_reads_as_data(small_store, tmp_path):
    bad = _copy(small_store, tmp_path)
    meta = bad / "subjects" / "900" / "depth" / "zarr.json"
    m = json.loads(meta.read_text())
    m["data_type"] = "int32"
    meta.write_text(json.dumps(m))
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20))
    with pytest.raises(BadSampleError, match=r"subject 900, array depth: .*depth/zarr.json was altered"):
        ds[0]
    _reseal(bad / "subjects" / "900")  # checksums made to match: the schema still refuses it
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20))
    with pytest.raises(BadSampleError, match=r"array depth: \(3, 4, 60, 40\) int32, the schema says"):
        ds[0]


@pytest.mark.parametrize("name", ["depth", "canonical", "K", "world_2_cam"])
def test_nan_with_matching_checksums_never_feeds_the_model(small_store, tmp_path, name):
    bad = _copy(small_store, tmp_path)
    sub = bad / "subjects" / "900"
    import zarr

    values = zarr.open_array(str(sub / name), mode="r")[...]
    values[1, 2] = np.nan  # timestamp 1, view 2
    _rewrite_array(sub, name, values)
    _reseal(sub)
    assert any(name in p and "NaN" in p for p in validate_store(bad))
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20))
    bad_row = next(i for i in range(len(ds.rows["t"])) if ds.rows["t"][i] == 1 and ds.rows["v"][i] == 2)
    with pytest.raises(BadSampleError, match=rf"subject 900, array {name}, timestamp 1, view 2 \(index row "
                                             rf"{bad_row}\): contains NaN or inf"):
        for i in range(len(ds)):
            ds[i]
    skip = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20), on_bad_view="skip")
    samples = [skip[i] for i in range(len(skip))]
    assert skip.skipped == 1 and sum(len(s.get("skipped", [])) for s in samples) == 1
    for s in samples:
        for key in ("depth", "canonical", "K", "world_2_cam", "ray_direction"):
            assert torch_finite(s[key])


def torch_finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t.float()).all())


def test_an_int8_rgb_is_refused_naming_the_array(small_store, tmp_path):
    import zarr

    bad = _copy(small_store, tmp_path)
    sub = bad / "subjects" / "900"
    values = zarr.open_array(str(sub / "rgb"), mode="r")[...]
    shutil.rmtree(sub / "rgb")
    g = zarr.open_group(str(sub), mode="r+")
    store_mod._create_image_array(g, "rgb", values.shape, "int8")[...] = values.view(np.int8)
    _reseal(sub)
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=4, resolution=(30, 20))
    with pytest.raises(BadSampleError, match=r"array rgb: \(3, 4, 60, 40, 3\) int8, the schema says .* uint8"):
        ds[0]
