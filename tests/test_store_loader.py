"""Store (atomic subjects, index, validate) and loader (modes, splits, determinism, intrinsics)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fakes import fake_subject
from facecanon_data.store import build_index, subjects, validate_store, write_subject
from facecanon_data.training import FaceCanonDataset, ShardedSampler, collate_samples
from facecanon_data.training.dataset import BadSampleError, IndexFilter
from facecanon_data.cameras import scale_intrinsics


def _write_one(args):
    store, pid, seed = args
    write_subject(store, fake_subject(pid, seed=seed))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    for i, pid in enumerate(("900", "901")):
        write_subject(path, fake_subject(pid, t=4, views=6, seed=i))
    build_index(path)
    return path


def test_written_store_validates_and_index_matches(store):
    assert validate_store(store) == []
    assert subjects(store) == ["900", "901"]
    import pyarrow.parquet as pq

    idx = pq.read_table(store / "index.parquet").to_pydict()
    assert len(idx["subject"]) == 2 * 4 * 6 and set(idx["reason"]) == {"expression"}


def test_validate_lists_problems_and_exits_non_zero(store, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    import pyarrow.parquet as pq

    t = pq.read_table(bad / "index.parquet")
    pq.write_table(t.slice(0, t.num_rows - 3), bad / "index.parquet")
    problems = validate_store(bad)
    assert any("samples missing from the index" in p for p in problems)
    exe = os.path.join(os.path.dirname(sys.executable), "facecanon-data")
    r = subprocess.run([exe, "validate", str(bad), "--json"], capture_output=True, text=True)
    assert r.returncode == 1 and json.loads(r.stdout.strip().splitlines()[-1])["valid"] is False


def test_rewrite_replaces_a_subject_whole(store, tmp_path):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    write_subject(copy, fake_subject("900", t=2, views=6, seed=9))
    build_index(copy)
    import zarr

    assert zarr.open_group(str(copy / "subjects" / "900"), mode="r")["depth"].shape[0] == 2
    assert validate_store(copy) == [] and not list((copy / ".staging").iterdir())


@pytest.mark.e2e
def test_sigkill_mid_subject_leaves_a_valid_store_without_it(store, tmp_path):
    import shutil

    target = tmp_path / "k"
    shutil.copytree(store, target)
    code = ("import sys; sys.path.insert(0, %r); from fakes import fake_subject; "
            "from facecanon_data.store import write_subject; "
            "write_subject(%r, fake_subject('905', t=12, views=16, h=600, w=400))") % (os.path.dirname(__file__), str(target))
    proc = subprocess.Popen([sys.executable, "-c", code])
    staging = target / ".staging"
    deadline = time.time() + 60
    while time.time() < deadline and not (staging.is_dir() and any(staging.glob("905-*/rgb"))):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(staging.glob("905-*")), "the writer was not caught mid-subject"
    assert "905" not in subjects(target)
    assert validate_store(target) == []


def test_four_concurrent_writers(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_write_one, [(str(tmp_path), f"91{i}", i) for i in range(4)])
    build_index(tmp_path)
    assert subjects(tmp_path) == ["910", "911", "912", "913"]
    assert validate_store(tmp_path) == []


def test_sampling_modes(store):
    views = FaceCanonDataset(store, mode="views", images_per_sample=3, resolution=(30, 20))
    s = views[0]
    assert s["image"].shape == (3, 3, 30, 20) and len(set(s["subject"])) == 1 and len(set(s["frame"].tolist())) == 1
    assert len(set(s["serial"])) == 3 and s["ray_direction"].shape == (3, 3, 30, 20)
    torch.testing.assert_close(s["ray_direction"].norm(dim=1), torch.ones(3, 30, 20))
    time_ds = FaceCanonDataset(store, mode="time", images_per_sample=(2, 4), resolution=(30, 20))
    for i in range(len(time_ds)):
        t = time_ds[i]
        assert len(set(t["serial"])) == 1 and len(set(t["frame"].tolist())) == len(t["frame"]) >= 2


def test_rank_and_worker_splits_cover_every_sample_once(store):
    ds = FaceCanonDataset(store, mode="views", images_per_sample=2, resolution=(16, 16))
    seen = []
    for rank in range(2):
        sampler = ShardedSampler(len(ds), rank=rank, world_size=2, seed=1)
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, num_workers=2, collate_fn=collate_samples,
                                             multiprocessing_context="fork" if rank == 0 else "spawn")
        seen += [b[0]["sample_index"] for b in loader]
    assert sorted(seen) == list(range(len(ds)))


def test_determinism_and_epochs(store):
    a = FaceCanonDataset(store, mode="views", images_per_sample=(2, 4), resolution=(16, 16), color_jitter=0.3, seed=5)
    b = FaceCanonDataset(store, mode="views", images_per_sample=(2, 4), resolution=(16, 16), color_jitter=0.3, seed=5)
    assert a.samples == b.samples
    torch.testing.assert_close(a[1]["image"], b[1]["image"])
    b.set_epoch(1)
    assert a.samples != b.samples


def test_intrinsics_consistent_after_resizing(store):
    ds = FaceCanonDataset(store, mode="views", images_per_sample=2, resolution=(45, 50))
    s = ds[0]
    raw = ds.read_raw(ds.samples[0])
    point = np.array([0.02, -0.01, 0.05])
    for j in range(2):
        w2c = raw["world_2_cam"][j].astype(np.float64)
        cam = w2c[:3, :3] @ point + w2c[:3, 3]
        k0, k1 = raw["K"][j].astype(np.float64), s["K"][j].numpy().astype(np.float64)
        uv0, uv1 = (k0 @ cam)[:2] / cam[2], (k1 @ cam)[:2] / cam[2]
        h0, w0 = raw["rgb"][j].shape[:2]
        np.testing.assert_allclose((uv0 + 0.5) / [w0, h0], (uv1 + 0.5) / [50, 45], atol=1e-6)
    np.testing.assert_allclose(scale_intrinsics(np.eye(3), 2, 2)[0, 2], 0.5)


def test_report_table_and_html(store, tmp_path, monkeypatch):
    import cv2

    from facecanon_data.report import build_report, write_html

    report = build_report(store)
    assert [r["subject"] for r in report["subjects"]] == ["900", "901"]
    assert report["subjects"][0]["cd_l1_mm"] == pytest.approx(0.8) and report["subjects"][0]["reasons"]["expression"] == 4
    page = write_html(store, report, tmp_path / "r.html").read_text()
    assert '<table class="sortable">' in page and "data:image/png;base64," in page and page.count("<tr>") == 3
    assert "<th>CD-L1 (mm)</th>" in page and "<th>cd_l1_mm</th>" not in page  # human names with units
    assert "max-width:100%" in page  # plots scale down to the window
    for s in ("900", "901"):  # per subject a section with its best / median / worst timestamps, as files
        assert f'id="s-{s}"' in page and f'href="r.html#s-{s}"' in page
        for kind in ("best", "median", "worst"):
            assert f'src="r_files/{s}_{kind}.jpg"' in page
            image = cv2.imread(str(tmp_path / "r_files" / f"{s}_{kind}.jpg"))
            assert image.shape[1] == 5 * 112 and image.shape[0] >= 3 * 100  # 5 tiles, 3 views
    # many subjects: pages of SUBJECTS_PER_PAGE, the summary on the first links into the others
    import facecanon_data.report as report_module

    monkeypatch.setattr(report_module, "SUBJECTS_PER_PAGE", 1)
    (tmp_path / "r-7.html").write_text("a page of a larger store before")
    first = write_html(store, report, tmp_path / "r.html").read_text()
    second = (tmp_path / "r-2.html").read_text()
    assert first.count("<section") == 1 and second.count("<section") == 1 and 'href="r-2.html#s-90' in first
    assert not (tmp_path / "r-7.html").exists()


def test_report_thumbnails_rank_timestamps_and_draw_the_visible_mesh():
    from facecanon_data.report_views import _mesh_overlay, pick_timestamps

    stamps = [{"cd_l1_mm": v, "gt_canonical_error_mm": g} for v, g in ((1.0, 3.0), (0.5, 1.0), (2.0, 2.0))]
    assert pick_timestamps(stamps) == ("gt_canonical_error_mm", {"best": 1, "median": 2, "worst": 0})
    stamps[0]["gt_canonical_error_mm"] = None  # not every timestamp has ground truth: rank by CD-L1
    assert pick_timestamps(stamps) == ("cd_l1_mm", {"best": 1, "median": 0, "worst": 2})
    assert pick_timestamps([{}]) == (None, {})
    # a square facing the camera at 1 m
    k = np.array([[100.0, 0, 49.5], [0, 100.0, 49.5], [0, 0, 1]])
    vertices = np.array([[-0.2, -0.2, 1.0], [0.2, -0.2, 1.0], [-0.2, 0.2, 1.0], [0.2, 0.2, 1.0]])
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    rgb = np.full((100, 100, 3), 100, np.uint8)
    seen = _mesh_overlay(rgb, k, np.eye(4), vertices, faces)
    assert (seen[..., 1] > 150).sum() > 100  # its edges
    # ... and behind a nearer square (the same mesh), its edges are hidden
    cover = np.array([[-0.12, -0.12, 0.5], [0.12, -0.12, 0.5], [-0.12, 0.12, 0.5], [0.12, 0.12, 0.5]])  # +-24 px
    both = _mesh_overlay(rgb, k, np.eye(4), np.concatenate([cover, vertices]), np.concatenate([faces, faces + 4]))
    top_edge = (slice(28, 32), slice(35, 45))  # the far square's top edge (row 29.5), left of the diagonals
    assert (seen[top_edge][..., 1] > 150).any() and not (both[top_edge][..., 1] > 150).any()
    assert (both[..., 1] > 150).sum() > 100  # the cover's own edges


# ---------------------------------------------------------------------------------------------
# integrity: every lost or altered chunk is found by validate and refused by the loader


def _copy(store, tmp_path, name):
    import shutil

    out = tmp_path / name
    shutil.copytree(store, out)
    return out


def _drop_chunk(array_dir, coords):
    """Remove one chunk the way a lost write would: zarr rewrites the shard without it."""
    import zarr

    arr = zarr.open_array(str(array_dir), mode="r+", config={"write_empty_chunks": False})
    if arr.shards is None:  # one chunk per file: delete the file
        (array_dir / "c").joinpath(*["0"] * arr.ndim).unlink()
        return
    index = tuple(slice(c, c + 1) for c in coords)
    arr[index] = np.zeros(arr[index].shape, arr.dtype)  # all fill value -> the chunk is dropped


@pytest.mark.parametrize("name", ["rgb", "depth", "canonical", "mask", "region", "K", "world_2_cam"])
def test_a_missing_chunk_of_each_array_is_found_and_never_read_as_zeros(store, tmp_path, name):
    from facecanon_data.chunk_reader import ChunkError

    bad = _copy(store, tmp_path, name)
    _drop_chunk(bad / "subjects" / "901" / name, (2, 3))
    problems = validate_store(bad)
    assert any(f"array {name}" in p and "missing" in p for p in problems), problems
    assert validate_store(bad, quick=True) != []  # the quick mode sees the changed file size
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=6, resolution=(30, 20),
                          filter=IndexFilter(subjects=["901"]), with_region=True)
    row = next(i for i, s in enumerate(ds.samples) if 2 in {int(ds.rows["t"][j]) for j in s})
    chunk = r"\(2, 3, " if name in ("rgb", "depth", "canonical", "mask", "region") else r"\(0, 0, "  # cameras: one chunk
    with pytest.raises(BadSampleError, match=rf"subject 901, array {name}: chunk {chunk}.* missing"):
        ds[row]


def test_flipped_bytes_in_a_shard_and_a_deleted_shard_are_found(store, tmp_path):
    from facecanon_data.chunk_reader import ChunkError

    bad = _copy(store, tmp_path, "flip")
    shard = bad / "subjects" / "900" / "depth" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    shard.write_bytes(bytes(data))
    problems = validate_store(bad)
    assert any("depth" in p and "altered" in p for p in problems), problems
    ds = FaceCanonDataset(bad, mode="views", images_per_sample=6, resolution=(30, 20),
                          filter=IndexFilter(subjects=["900"]))
    with pytest.raises(BadSampleError, match="subject 900, array depth"):
        for i in range(len(ds)):
            ds[i]
    gone = _copy(store, tmp_path, "gone")
    (gone / "subjects" / "900" / "rgb" / "c" / "0" / "0" / "0" / "0" / "0").unlink()
    problems = validate_store(gone)
    assert any("rgb" in p and "missing" in p for p in problems), problems
    assert any("rgb" in p for p in validate_store(gone, quick=True))


@pytest.mark.parametrize("dtype", ["int32", "float64"])
def test_a_changed_dtype_is_a_finding_not_a_crash(store, tmp_path, dtype):
    bad = _copy(store, tmp_path, dtype)
    meta = bad / "subjects" / "900" / "depth" / "zarr.json"
    m = json.loads(meta.read_text())
    m["data_type"] = dtype
    meta.write_text(json.dumps(m))
    problems = validate_store(bad)
    assert any(f"depth: (4, 6, 60, 40) {dtype}, the schema says (4, 6, 60, 40) float32" in p for p in problems), problems
    assert any("depth/zarr.json: " in p for p in problems)  # and the manifest sees the edit


def test_concurrent_writers_of_one_subject_last_wins_whole(tmp_path):
    """Writers of the same subject held at a barrier, then committing at once: none fails, the store
    holds exactly one of their subjects, whole."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        pool.map(_write_same_subject, [(str(tmp_path), seed, barrier) for seed in range(4)])
    build_index(tmp_path)
    assert subjects(tmp_path) == ["920"] and validate_store(tmp_path) == []
    import zarr

    depth = zarr.open_group(str(tmp_path / "subjects" / "920"), mode="r")["depth"][...]
    assert any(np.array_equal(depth, fake_subject("920", seed=s).depth) for s in range(4))
    assert not list((tmp_path / ".staging").iterdir())


def _write_same_subject(args):
    import facecanon_data.store as store_module

    store, seed, barrier = args
    rename = os.rename

    def held_rename(src, dst):  # every writer reaches its commit before any of them commits
        if str(dst).endswith("subjects/920") and not held_rename.waited:
            held_rename.waited = True
            barrier.wait(timeout=60)
        return rename(src, dst)

    held_rename.waited = False
    store_module.os.rename = held_rename
    try:
        write_subject(store, fake_subject("920", seed=seed))
    finally:
        store_module.os.rename = rename


def test_side_arrays_are_checked_against_the_schema(store, tmp_path):
    bad = _copy(store, tmp_path, "side")
    meta = bad / "subjects" / "901" / "points" / "xyz" / "zarr.json"
    m = json.loads(meta.read_text())
    m["data_type"] = "float64"
    meta.write_text(json.dumps(m))
    problems = validate_store(bad)
    assert any("points/xyz: (" in p and "float64 does not fit the schema ((P, 3) float32)" in p for p in problems), problems


class _SyntheticStack:
    """A timestamp stack that makes each timestamp's array on demand (nothing held between reads)."""

    def __init__(self, shape, dtype, seed: int):
        self.shape, self.dtype, self.seed = shape, np.dtype(dtype), seed

    def __getitem__(self, t):
        rng = np.random.default_rng([self.seed, t])
        return (rng.random(self.shape[1:]) * 200).astype(self.dtype)


def _streamed_subject(pid: str, t: int):
    base = fake_subject(pid, t=1, views=4, h=120, w=80)
    v, h, w = base.depth.shape[1:]
    stacks = {name: _SyntheticStack((t, v, h, w) + extra, dtype, i) for i, (name, extra, dtype) in enumerate(
        (("rgb", (3,), np.uint8), ("depth", (), np.float32), ("canonical", (3,), np.float16), ("mask", (), bool),
         ("region", (), np.uint8), ("confidence", (), np.uint8)))}
    base.__dict__.update(stacks, timestamps=base.timestamps * t, K=np.repeat(base.K, t, 0),
                         world_2_cam=np.repeat(base.world_2_cam, t, 0), points_xyz=base.points_xyz * t,
                         points_canonical=base.points_canonical * t)
    return base


def test_write_streams_one_timestamp_at_a_time(tmp_path):
    """Peak traced memory of `write_subject` does not grow with the number of timestamps."""
    import tracemalloc

    peaks = {}
    for t in (2, 12):
        data = _streamed_subject("900", t)
        tracemalloc.start()
        write_subject(tmp_path / f"s{t}", data)
        peaks[t] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        build_index(tmp_path / f"s{t}")
        assert validate_store(tmp_path / f"s{t}") == []
    one_timestamp = 4 * 120 * 80 * (3 + 4 + 6 + 1 + 1 + 1)  # bytes of one timestamp's images
    assert peaks[12] < 1.3 * peaks[2] + one_timestamp, peaks  # 6x the timestamps, about the same peak
    assert peaks[12] < 12 * one_timestamp / 2, peaks  # far below holding the subject's images


def _scatter_reference(depth, canonical, mask, height, width, confidence):
    """The definition of label resampling, written the direct way: every valid pixel scattered to the
    target pixel holding its centre, the nearest depth winning, ties to the first in raster order."""
    out_d, out_m = np.zeros((height, width), np.float32), np.zeros((height, width), bool)
    out_q = np.zeros((height, width), np.float32)
    out_c = np.zeros((height, width, 3), np.float32)
    ys, xs = np.nonzero(mask)
    ty = np.minimum(((ys + 0.5) * height / mask.shape[0]).astype(np.int64), height - 1)
    tx = np.minimum(((xs + 0.5) * width / mask.shape[1]).astype(np.int64), width - 1)
    order = np.argsort(depth[ys, xs], kind="stable")
    _, first = np.unique((ty * width + tx)[order], return_index=True)
    pick = order[first]
    out_d[ty[pick], tx[pick]] = depth[ys[pick], xs[pick]]
    out_c[ty[pick], tx[pick]] = canonical[ys[pick], xs[pick]]
    out_m[ty[pick], tx[pick]] = True
    out_q[ty[pick], tx[pick]] = confidence[ys[pick], xs[pick]] * np.float32(1 / 255)
    return out_d, out_c, out_m, out_q


@pytest.mark.parametrize("stored, target", [((550, 802), (518, 518)), ((550, 802), (294, 392)),
                                            ((550, 802), (504, 378)), ((60, 40), (126, 84)),
                                            ((83, 61), (83, 61)), ((10, 7), (3, 2))])
def test_label_resampling_equals_the_scatter_definition_bit_for_bit(stored, target):
    from facecanon_data.training.dataset import resample_labels

    rng = np.random.default_rng(stored[0] * target[1])
    depth = rng.uniform(0.9, 1.1, stored).astype(np.float32)
    depth[rng.random(stored) < 0.3] = 1.0  # many equal depths: the tie rule decides
    mask = rng.random(stored) > 0.4
    canonical = rng.normal(0, 0.05, stored + (3,)).astype(np.float16)
    confidence = np.where(mask, rng.integers(1, 256, stored), 0).astype(np.uint8)
    out_confidence = np.full(target, -1, np.float32)
    got = resample_labels(depth, canonical, mask, *target, confidence=confidence, out_confidence=out_confidence)
    want = _scatter_reference(depth, canonical, mask, *target, confidence)
    for name, a, b in zip(("depth", "canonical", "mask", "confidence"), got + (out_confidence,), want):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert got[2].sum() > 0.5 * min(mask.sum(), target[0] * target[1])  # labels kept, not dropped


def test_bench_loader_reports_its_ratio_images_per_core_and_cores_per_gpu(store):
    from facecanon_data.bench import PAPER_TRAIN_IMAGES_PER_S, bench_loader

    b = bench_loader(store, samples=4, images_per_sample=2, resolution=(64, 48))
    assert b["samples"] == 4 and b["raw_samples_per_s"] > 0
    for w in (0, 2):
        assert 0 < b[f"ratio_{w}w"] < 10 and b[f"loader_{w}w_samples_per_s"] > 0
        assert b[f"images_per_s_per_core_{w}w"] == pytest.approx(b[f"loader_{w}w_samples_per_s"] * 2 / max(w, 1),
                                                                  rel=0.01, abs=0.06)
    slowest = min(b["images_per_s_per_core_0w"], b["images_per_s_per_core_2w"])
    assert b["cores_per_gpu_large"] == pytest.approx(PAPER_TRAIN_IMAGES_PER_S / slowest, rel=0.05, abs=0.011)
    assert "no GPU step time measured" in b["gpu_train_images_per_s_source"]
    profile = b["profile_ms_per_sample"]  # where load's time goes: its steps never exceed the whole
    assert set(profile) == {"read", "image", "labels", "rays", "load"} and min(profile.values()) >= 0
    assert profile["read"] + profile["labels"] <= 1.5 * profile["load"] + 1


def test_cached_rays_and_in_place_jitter_give_the_uncached_out_of_place_sample(store):
    from facecanon_data.training.dataset import ray_maps

    ds = FaceCanonDataset(store, mode="views", images_per_sample=3, resolution=(28, 21), color_jitter=0.3, seed=2)
    first, again = ds[0], ds[0]  # the second load is served from the ray cache
    raw = ds.read_raw(ds.samples[0])
    for j in range(3):
        h0, w0 = raw["rgb"][j].shape[:2]
        centre, d = ray_maps(scale_intrinsics(raw["K"][j], 21 / w0, 28 / h0), raw["world_2_cam"][j], 28, 21)
        assert np.array_equal(first["ray_direction"][j].numpy(), d)
        assert np.array_equal(first["ray_origin"][j, :, 0, 0].numpy(), centre)
    for k in ("image", "ray_direction", "depth", "canonical", "mask"):
        assert torch.equal(first[k], again[k]), k
    first["ray_direction"].zero_()  # a consumer writing into its sample never reaches the cache
    assert torch.equal(ds[0]["ray_direction"], again["ray_direction"])
    # the jitter's reference: the out-of-place formula on the unjittered images
    plain = FaceCanonDataset(store, mode="views", images_per_sample=3, resolution=(28, 21), seed=2)[0]["image"]
    rng = np.random.default_rng([2, 0, 0, 7])
    b, c, s = (1 + rng.uniform(-0.3, 0.3, size=3)).tolist()
    x = plain * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = x.mean(dim=1, keepdim=True)
    assert torch.equal(first["image"], ((x - gray) * s + gray).clamp(0, 1))
