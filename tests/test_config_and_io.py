"""Pipeline configs, colour calibration, video IO, determinism of the synthetic generator."""
from __future__ import annotations

import numpy as np
import pytest

from facecanon_data.config import ConfigError, PipelineConfig, load_pipeline
from facecanon_data.paths import PROJECT_ROOT
from facecanon_data.sources.color import apply_color_correction
from facecanon_data.sources.video import CaptureFileError, VideoReader, VideoWriter


def test_shipped_pipelines_load_and_hash_differs():
    synth = load_pipeline(PROJECT_ROOT / "pipelines" / "synthetic.toml")
    ners = load_pipeline(PROJECT_ROOT / "pipelines" / "nersemble.toml")
    assert synth.capture.downscale == 2 and ners.capture.downscale == 4
    assert synth.hash() != ners.hash() and len(synth.hash()) == 16
    assert PipelineConfig().hash() == PipelineConfig().hash()


@pytest.mark.parametrize("text, message", [
    ("[capture]\ndownscal = 2\n", r"bad.toml.capture: unknown key 'downscal'"),
    ("[capture]\ndownscale = 'two'\n", r"bad.toml.capture.downscale: expected int"),
    ("[nonsense]\nx = 1\n", r"bad.toml: unknown key 'nonsense'"),
    ("[capture\n", r"bad.toml: not valid TOML"),
    ("[flame]\nkind = 'smplx'\n", r"flame.kind must be"),
    ("threads = -2\n", r"threads must lie in 0..1024"),
    ("threads = 1000000000\n", r"threads must lie in 0..1024 \(0 = the default\), got 1000000000"),
    ("[select]\ndownscale = -1\n", r"select.downscale must lie in 0..64"),
    ("[select]\ndownscale = 1000000000\n", r"select.downscale must lie in 0..64"),
    ("[reconstruct]\ndownscale = -4\n", r"reconstruct.downscale must lie in 0..64"),
    ("[select]\nqueue_frames = 0\n", r"select.queue_frames must be >= 1"),
    ("[slurm]\ncpu_jobs = 2\nprocesses = 1\ngpu_jobs = 0\nwait_for_workers = 3\n", r"slurm.wait_for_workers must lie in 0..2"),
    ("[capture]\ndownscale = -4\n", r"capture.downscale must lie in 1..64"),
    ("[capture]\ndownscale = 1000000000\n", r"capture.downscale must lie in 1..64, got 1000000000"),
    ("[select]\nexpression_dim = 1000000000\n", r"select.expression_dim must lie in 1..1434"),
    ("[track]\nlearning_rate = nan\n", r"track.learning_rate must be a finite number, got nan"),
    ("[track]\nlearning_rate = -0.1\n", r"track.learning_rate must be > 0"),
    ("[reconstruct.foreground]\nlow_floor = inf\n", r"reconstruct.foreground.low_floor must be a finite number"),
    ("[render]\ncanonical_from = 'mesh'\n", r"render.canonical_from must be 'points' or 'tracked_surface_near'"),
    ("[render]\nconfidence_observers = 0\n", r"confidence_observers and confidence_cross_view_cameras at least 1"),
])
def test_config_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


def test_identity_and_scaling_colour_correction():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    identity = np.hstack([np.eye(3), np.zeros((3, 1))])
    assert np.abs(apply_color_correction(img, identity).astype(int) - img).max() <= 1
    # Halving linear red: the sRGB value of red drops by the transfer function, others stay.
    halve = np.diag([0.5, 1.0, 1.0])
    out = apply_color_correction(np.full((1, 1, 3), 200, np.uint8), halve)[0, 0]
    assert out[1] == 200 and out[2] == 200 and 140 < out[0] < 150  # 200 -> lin 0.578 -> 0.289 -> 146


@pytest.mark.parametrize("terms", [3, 4, 5, 7, 8, 10, 11, 14])
def test_fast_colour_correction_matches_the_float_definition(terms):
    from facecanon_data.sources.color import ColorTable, apply_color_correction_reference
    from facecanon_data.synthetic.real_size import example_ccm

    rng = np.random.default_rng(terms)
    img = rng.integers(0, 256, size=(61, 47, 3), dtype=np.uint8)
    ccm = example_ccm(terms, seed=terms)
    fast, reference = apply_color_correction(img, ccm), apply_color_correction_reference(img, ccm)
    assert np.abs(fast.astype(int) - reference).max() <= 1 and (fast != reference).mean() < 0.02
    if terms in (4, 11):  # the exact table gives the arithmetic path's pixels
        assert np.array_equal(ColorTable(ccm)(img), fast)


def test_video_round_trip_and_sequential_reads(tmp_path):
    path = tmp_path / "cam_1.mp4"
    w = VideoWriter(path, 64, 48, fps=25)
    frames = []
    for i in range(12):
        f = np.zeros((48, 64, 3), np.uint8)
        f[:, :, 0] = 20 * i
        f[10:20, 5 * i % 60: 5 * i % 60 + 4] = 255
        frames.append(f)
        w.write(f)
    assert not path.exists()  # nothing visible until closed
    w.close()
    assert not list(tmp_path.glob("*.partial.mp4"))
    with VideoReader(path) as r:
        assert (r.num_frames, r.width, r.height) == (12, 64, 48)
        got = dict(r.frames([2, 7, 11]))
    for i, f in got.items():
        assert np.abs(f[:, :, 0].astype(int) - frames[i][:, :, 0]).mean() < 4
    with VideoReader(path) as r:  # backwards access seeks
        np.testing.assert_array_equal(r.read(7), got[7])
        assert np.abs(r.read(3).astype(int) - frames[3]).mean() < 4
    with pytest.raises(CaptureFileError, match="cam_2.mp4: video file not found"):
        VideoReader(tmp_path / "cam_2.mp4")
    (tmp_path / "cam_3.mp4").write_bytes(b"not a video")
    with pytest.raises(CaptureFileError, match="cam_3.mp4: cannot open video"):
        VideoReader(tmp_path / "cam_3.mp4")


def test_generator_is_deterministic(head_assets):
    from facecanon_data.synthetic.performance import random_identity, random_performance

    m = head_assets.model
    a = random_identity(np.random.default_rng(5), m.v_template, m.num_shape)
    b = random_identity(np.random.default_rng(5), m.v_template, m.num_shape)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    pa = random_performance(np.random.default_rng(5), 40, m.num_expression, head_sequence=True)
    pb = random_performance(np.random.default_rng(5), 40, m.num_expression, head_sequence=True)
    for k, v in pa.as_dict().items():
        np.testing.assert_array_equal(v, pb.as_dict()[k])
    yaw = np.degrees(np.abs(pa.global_rot[:, 1] + pa.neck[:, 1])).max()
    assert 25 < yaw <= 40.0 + 1e-3  # head sequences turn the head up to the configured 40 degrees
    # Mostly near-neutral: in most frames no expression coefficient exceeds 0.5.
    assert (np.abs(pa.expression).max(1) < 0.5).mean() > 0.3


def test_thread_cap_reaches_pools_open3d_and_prefetch(monkeypatch):
    import threading

    from facecanon_data import threads
    from facecanon_data.prefetch import prefetch

    monkeypatch.delenv(threads.ENV, raising=False)
    assert threads.thread_cap() == 0 and threads.open3d_threads() == 0 and threads.pool_size(64) >= 1
    monkeypatch.setenv(threads.ENV, "1")
    assert threads.pool_size(16) == 1 and threads.open3d_threads() == 1
    producers = []

    def items():
        for i in range(3):
            producers.append(threading.current_thread())
            yield i

    assert list(prefetch(items())) == [0, 1, 2]
    assert all(t is threading.current_thread() for t in producers)  # inline: no second thread
    monkeypatch.setenv(threads.ENV, "2")
    producers.clear()
    assert list(prefetch(items())) == [0, 1, 2] and producers[0] is not threading.current_thread()


# ---------------------------------------------------------------------------------------------
# small bad inputs: each a clean error naming the file, nothing touched


def _exe():
    import sys
    from pathlib import Path

    return str(Path(sys.executable).parent / "facecanon-data")


def test_a_non_utf8_or_oversized_manifest_is_refused_naming_the_file(tmp_path):
    import subprocess

    from facecanon_data.manifest import ManifestError, read_manifest

    latin = tmp_path / "latin.txt"
    latin.write_bytes("900 # Kalibrierung f\xfcr Probanden\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin.txt: not UTF-8 text"):
        read_manifest(latin)
    r = subprocess.run([_exe(), "build", "--subjects", str(latin), "--out", str(tmp_path / "store")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "latin.txt: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    long = tmp_path / "long.txt"
    long.write_text("900 " + "A" * 10_000_000 + "\n")
    with pytest.raises(ManifestError, match=r"long.txt:1: line of 10000004 characters") as exc:
        read_manifest(long)
    assert len(str(exc.value)) < 300
    seq = tmp_path / "seq.txt"
    seq.write_text("900 " + "B" * 3000 + "\n")
    with pytest.raises(ManifestError, match=r"seq.txt:1: invalid sequence name\(s\) 'BBBB.*\(3000 characters\)") as exc:
        read_manifest(seq)
    assert len(str(exc.value)) < 300
    assert not (tmp_path / "store").exists()


def test_reconstruct_with_a_mistyped_timestamp_keeps_the_finished_stage(synth_capture, tmp_path):
    import json
    import subprocess

    marker = tmp_path / "w" / "900" / "reconstruct" / "_DONE.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"config_hash": "x"}))
    root = str(synth_capture["out"] / "capture")
    for spec, message in (("EXP-1-haed:0", "has no sequence 'EXP-1-haed'"), ("EXP-1-head:99", "frame 99 out of range")):
        r = subprocess.run([_exe(), "reconstruct", "--root", root, "--work", str(tmp_path / "w"), "--timestamps", spec],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-1500:]
        assert marker.is_file()  # the finished stage is untouched


def _track_with_flame_files(synth_capture, tmp_path, flame_lines: str):
    """`track` with a pipeline of kind "flame" whose [flame] section ends with ``flame_lines``."""
    import subprocess

    pipeline = tmp_path / "flame.toml"
    pipeline.write_text(f"[capture]\ndownscale = 2\n[flame]\nkind = 'flame'\n{flame_lines}")
    r = subprocess.run([_exe(), "track", "--root", str(synth_capture["out"] / "capture"), "--work", str(tmp_path / "w"),
                        "--pipeline", str(pipeline)], capture_output=True, text=True, timeout=120)
    return pipeline, r


def test_track_with_flame_and_no_embedding_names_the_setting(synth_capture, tmp_path):
    _, r = _track_with_flame_files(synth_capture, tmp_path,
                                   f"model = '{PROJECT_ROOT / 'flame_assets' / 'synthetic' / 'synthetic_head.pkl'}'\n")
    assert r.returncode == 2, r.stderr[-1500:]
    assert "flame.toml: flame.embedding is not set" in r.stderr and "Traceback" not in r.stderr


def test_a_mask_name_the_file_lacks_is_an_error_listing_its_names(synth_capture, tmp_path):
    """A FLAME-layout masks pickle with FLAME's real keys minus the right eyeball: the default
    offset_free_masks (left_eyeball, right_eyeball) fails in `track` before any work, naming the file
    and listing the names it has; the union name "eyeballs" resolves against the full file."""
    import pickle

    from facecanon_data.flame.assets import MASK_NAMES, AssetError, load_assets
    from facecanon_data.flame.synthetic_head import model_files

    synthetic = model_files(PROJECT_ROOT / "flame_assets" / "synthetic")
    with open(synthetic.masks, "rb") as fh:
        masks = pickle.load(fh)  # the project's own file (plain dict of int arrays)
    assert sorted(masks) == sorted(MASK_NAMES)
    del masks["right_eyeball"]
    partial_masks = tmp_path / "FLAME_masks.pkl"
    partial_masks.write_bytes(pickle.dumps({k: np.asarray(v) for k, v in masks.items()}, protocol=2))
    pipeline, r = _track_with_flame_files(
        synth_capture, tmp_path, f"model = '{synthetic.model}'\nmasks = '{partial_masks}'\n"
                                 f"embedding = '{synthetic.embedding}'\n")
    assert r.returncode == 2, r.stderr[-1500:]
    assert "FLAME_masks.pkl: no mask 'right_eyeball'; it has: boundary, eye_region, face" in " ".join(r.stderr.split())
    assert not (tmp_path / "w" / "900" / "track").exists()
    cfg = load_pipeline(pipeline)
    assets = load_assets(cfg.flame)
    with pytest.raises(AssetError, match="no mask 'eyeballs' \\(the union of left_eyeball and right_eyeball\\)"):
        assets.mask("eyeballs")
    assert len(assets.mask("ears")) == len(masks["left_ear"]) + len(masks["right_ear"])
