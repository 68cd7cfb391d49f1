"""Benchmarks: ``facecanon-data bench NAME``. Each measures a target against its baseline in one run."""
from __future__ import annotations

import copy
import tempfile
import time

from .config import PipelineConfig
from .sources.base import CaptureSource
from .errors import InputValueError


def bench_select(source: CaptureSource, subject: str, cfg: PipelineConfig, real_size: bool = False,
                 real_size_frames: int = 150) -> dict:
    """Frames/s of the whole ``select`` stage vs decoding + MediaPipe alone on the same frames.

    The baseline makes the detector, then decodes and resizes each frontal frame and runs the detector
    on it, one after the other, with no colour correction and nothing written; the stage (prefetching decoder, colour correction when
    the capture has a calibration, features and selection written) must run near it: ``ratio`` =
    baseline seconds / stage seconds.

    Args:
        real_size: measure on a copy of the subject's frontal camera upscaled to NeRSemble's 2200 x 3208
            with a colour calibration (:mod:`synthetic.real_size`), read at the real pipeline's downscale 4,
            ``real_size_frames`` frames per sequence (a real sequence has hundreds: the stage's one-time
            costs, such as its coverage plot, weigh as little as they do on a real subject).
    """
    if not real_size:
        return _bench_select(source, subject, cfg)
    import dataclasses

    from .sources.nersemble import NeRSembleSource
    from .synthetic.real_size import REAL_SIZE, write_real_size_frontal_capture

    with tempfile.TemporaryDirectory(prefix="bench-select-capture-") as tmp:
        t0 = time.perf_counter()
        root = write_real_size_frontal_capture(source, subject, cfg.capture.frontal_serial, tmp,
                                               frames_per_sequence=real_size_frames)
        made_s = time.perf_counter() - t0
        cfg = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture, downscale=4),
                                  select=dataclasses.replace(cfg.select, downscale=0))
        result = _bench_select(NeRSembleSource(root, color_correction=True), subject, cfg)
    return {**result, "capture": f"frontal camera upscaled to {REAL_SIZE[0]}x{REAL_SIZE[1]}, colour calibration",
            "downscale": 4, "capture_seconds": round(made_s, 1)}


def _bench_select(source: CaptureSource, subject: str, cfg: PipelineConfig, repeats: int = 2) -> dict:
    """Baseline and stage alternately, ``repeats`` times each; the fastest of each counts (a background
    hiccup on a shared machine only ever slows a run down)."""
    from .features import make_backend
    from .stages.select import frame_plan, run_select

    plan = frame_plan(source, subject, cfg)
    downscale = cfg.select.downscale or cfg.capture.downscale
    serial = cfg.capture.frontal_serial
    plain = _without_color_correction(source)

    def baseline() -> int:
        n = 0
        backend = make_backend(cfg.select, cfg.source_file)  # the stage makes one too: same one-time cost
        for seq, idx in plan:
            backend.start_sequence()
            for _, img in plain.frames(subject, seq, serial, idx, downscale=downscale):
                backend.observe(img)
                n += 1
        backend.close()
        return n

    baseline_s, stage_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = baseline()
        baseline_s.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory(prefix="bench-select-") as work:
            t0 = time.perf_counter()
            result = run_select(source, subject, cfg, work)
            stage_s.append(time.perf_counter() - t0)
    return {"bench": "select", "subject": subject, "frames": n, "backend": result.backend,
            "color_correction": _has_color_calibration(source, subject), "repeats": repeats,
            "stage_frames_per_s": round(n / min(stage_s), 2), "baseline": "decode_and_mediapipe_alone",
            "baseline_frames_per_s": round(n / min(baseline_s), 2), "ratio": round(min(baseline_s) / min(stage_s), 3),
            "target_ratio": 0.8}


def _without_color_correction(source: CaptureSource) -> CaptureSource:
    from .sources.nersemble import NeRSembleSource

    if isinstance(source, NeRSembleSource):
        return NeRSembleSource(source.root, color_correction=False)
    return source


def _has_color_calibration(source: CaptureSource, subject: str) -> bool:
    from .sources.nersemble import NeRSembleSource

    return isinstance(source, NeRSembleSource) and source.color_correction and \
        (source.subject_dir(subject) / "calibration" / "color_calibration.json").is_file()


def bench_color(source: CaptureSource, subject: str, cfg: PipelineConfig) -> dict:
    """Cross-view colour agreement at shared surface points (:mod:`facecanon_data.color_consistency`)
    with the subject's ``color_calibration.json`` applied, against the same frames read uncorrected
    (the baseline). Needs ground truth: the embedded synthetic capture. ``ratio`` = corrected median
    Delta E / uncorrected; two timestamps of the first sequence, every camera against the frontal one."""
    import numpy as np

    from .color_consistency import cross_view_color_difference
    from .sources.nersemble import NeRSembleSource

    if not isinstance(source, NeRSembleSource) or source.ground_truth(subject) is None:
        raise InputValueError(f"subject {subject}: bench color needs a capture with ground truth (`facecanon-data synth`)")
    corrected = NeRSembleSource(source.root, source.ground_truth_root, color_correction=True)
    if not corrected.color_correction_applied(subject):
        raise InputValueError(f"{source.subject_dir(subject) / 'calibration' / 'color_calibration.json'}: missing; "
                              "bench color compares frames with and without it")
    plain = NeRSembleSource(source.root, source.ground_truth_root, color_correction=False)
    sequence = source.sequences(subject)[0]
    frames = sorted({0, source.num_frames(subject, sequence) // 2})
    downscale = cfg.capture.downscale
    out = {"bench": "color", "subject": subject, "sequence": sequence, "frames": frames,
           "reference_camera": cfg.capture.frontal_serial, "baseline": "same frames without colour correction"}
    for name, src in (("uncorrected", plain), ("corrected", corrected)):
        per_frame = [cross_view_color_difference(src, subject, sequence, f, downscale, cfg.capture.frontal_serial)
                     for f in frames]
        out[name] = {k: (round(float(np.mean([r[k] for r in per_frame])), 3) if isinstance(per_frame[0][k], float)
                         else int(sum(r[k] for r in per_frame))) for k in ("points", "pairs", "delta_e_median",
                                                                             "delta_e_p90", "rgb_distance_median",
                                                                             "bias_levels_mean")}
    out["ratio"] = round(out["corrected"]["delta_e_median"] / out["uncorrected"]["delta_e_median"], 3)
    out["bias_ratio"] = round(out["corrected"]["bias_levels_mean"] / out["uncorrected"]["bias_levels_mean"], 3)
    return out


def bench_reconstruct(source: CaptureSource, subject: str, cfg: PipelineConfig, count: int = 8) -> dict:
    """Time inside COLMAP calls vs the whole ``reconstruct`` stage (decode, image writing, clean-up,
    depth maps, outputs), per timestamp, on ``count`` timestamps spread over the sequences (8: a
    subject has 10 in the synthetic pipeline and 50 in the paper; one-time imports amortize as in a run).

    Target: our overhead (1 - COLMAP time / stage time) at most 10 %. Where the views are segmented
    from plates, that time is reported apart (``foreground_s``, ``overhead_without_foreground``).
    """
    import numpy as np

    from .stages.reconstruct import run_reconstruct

    picks = _spread_timestamps(source, subject, count)
    cfg = copy.deepcopy(cfg)
    if cfg.reconstruct.dense != "colmap":  # the dense MVS is work of its own (bench dense), not overhead
        cfg.reconstruct.dense = "none"
    if getattr(source, "ground_truth_root", None) is not None:
        # A real capture has no ground truth: its evaluation (16 ray-cast views per timestamp for the
        # foreground IoU, the point error) is not the stage's work, so the timed run reads without it.
        source = copy.copy(source)
        source.ground_truth_root = None
    with tempfile.TemporaryDirectory(prefix="bench-reconstruct-") as work:
        t0 = time.perf_counter()
        result = run_reconstruct(source, subject, cfg, work, timestamps=picks)
        stage_s = time.perf_counter() - t0
    colmap_s = sum(t.colmap_seconds for t in result.timestamps)
    foreground_s = sum(t.foreground_seconds for t in result.timestamps)
    per_ts = [{"timestamp": t.key, "colmap_s": t.colmap_seconds, "timestamp_total_s": t.total_seconds,
               "foreground_s": t.foreground_seconds} for t in result.timestamps]
    return {"bench": "reconstruct", "subject": subject, "timestamps": len(per_ts), "dense": result.dense,
            "stage_s": round(stage_s, 2), "colmap_s": round(colmap_s, 2),
            "seconds_per_timestamp": round(stage_s / max(1, len(per_ts)), 2),
            "baseline": "time_inside_colmap_calls", "ratio": round(colmap_s / stage_s, 3),
            "overhead": round(1 - colmap_s / stage_s, 3), "target_overhead": 0.10,
            # Segmenting the views from the BACKGROUND plates (captures without mattes) is work of its
            # own, not overhead around COLMAP: its share and the overhead without it, side by side.
            "foreground_source": result.foreground_source, "foreground_s": round(foreground_s, 2),
            "overhead_without_foreground": round(1 - colmap_s / max(stage_s - foreground_s, 1e-9), 3),
            "per_timestamp": per_ts, "kept": result.timestamps_kept,
            "median_points": float(np.median([t.num_points for t in result.timestamps]))}


def _spread_timestamps(source: CaptureSource, subject: str, count: int) -> list[tuple[str, int]]:
    """``count`` (sequence, frame) pairs spread evenly over the subject's sequences and their frames."""
    seqs = source.sequences(subject)
    picks = []
    for k in range(count):
        seq = seqs[k % len(seqs)]
        n = source.num_frames(subject, seq)
        picks.append((seq, int(round((k // len(seqs) + 0.5) * n / max(1, -(-count // len(seqs)))))))
    return picks


PAPER_WORKING_PIXELS = 802 * 550  # NeRSemble's 3208 x 2200 at the paper's downscale 4
PAPER_TIMESTAMPS = 50


def bench_dense(source: CaptureSource, subject: str, cfg: PipelineConfig, count: int = 3) -> dict:
    """Each dense backend available here on ``count`` timestamps of a capture with ground truth: seconds
    per timestamp of the dense step (the sparse COLMAP before it not counted), completeness (the fraction
    of ground-truth head pixels, hair included, whose depth is within 1 / 2 mm) and accuracy (median and
    p90 depth error, mm, over the head pixels that have a depth). ``torch`` always, ``colmap`` (PatchMatch)
    where pycolmap has CUDA and a device exists, on the same timestamps. Target: torch at most 90 s per
    timestamp on a CPU at the synthetic working resolution; projected linearly in pixels to the paper's
    802 x 550 and 50 timestamps per subject."""
    from pathlib import Path

    import numpy as np

    from .devices import colmap_cuda_available, pick_torch_device
    from .stages.reconstruct import ForegroundMasks, reconstruct_timestamp

    gt = source.ground_truth(subject)
    if gt is None:
        raise InputValueError(f"{source.subject_dir(subject)}: bench dense measures against ground truth; this capture "
                              f"has none (run it on a synthetic capture: facecanon-data synth)")
    downscale = cfg.reconstruct.downscale or cfg.capture.downscale
    cameras = source.cameras(subject, downscale=downscale)
    backends = ["torch"] + (["colmap"] if colmap_cuda_available() else [])
    out: dict = {"bench": "dense", "subject": subject, "timestamps": [], "backends": backends,
                 "resolution": [next(iter(cameras.values())).height, next(iter(cameras.values())).width]}
    stats = {b: {"seconds": [], "cpu": [], "hits1": 0, "hits2": 0, "head": 0, "errors": []} for b in backends}
    masks_of = ForegroundMasks(source, subject, cfg.reconstruct, downscale)
    with tempfile.TemporaryDirectory(prefix="bench-dense-") as tmp:
        for seq, frame in _spread_timestamps(source, subject, count):
            images = source.timestamp(subject, seq, frame, downscale=downscale)
            found = masks_of.of(seq, [frame], {frame: images})[frame]
            out["timestamps"].append(f"{seq}/{frame:06d}")
            truth = {s: gt.view_maps(seq, frame, s, downscale) for s in cameras}
            for backend in backends:
                folder = Path(tmp) / backend / seq / f"{frame:06d}"
                res = reconstruct_timestamp(images, cameras, folder, cfg.reconstruct,
                                            masks=None if found is None else found[1], dense=backend, threads=cfg.threads)
                if not res.dense:
                    raise InputValueError(f"bench dense: {backend} made no dense cloud for {seq}/{frame}: {res.reason}")
                st = stats[backend]
                st["seconds"].append(res.dense_seconds)
                st["cpu"].append(res.dense_cpu_seconds)
                with np.load(folder / "depth.npz") as z:
                    depth, serials = z["depth"], [str(x) for x in z["serials"]]
                for v, serial in enumerate(serials):
                    g = truth[serial]
                    head, has = g["mask"], g["mask"] & (depth[v] > 0)
                    err = np.abs(depth[v] - g["depth"])
                    st["head"] += int(head.sum())
                    st["hits1"] += int((has & (err < 0.001)).sum())
                    st["hits2"] += int((has & (err < 0.002)).sum())
                    st["errors"].append(err[has])
    scale = PAPER_WORKING_PIXELS / (out["resolution"][0] * out["resolution"][1])
    for backend, st in stats.items():
        errors = np.concatenate(st["errors"]) * 1000 if st["errors"] else np.zeros(0)
        per_ts = float(np.mean(st["seconds"]))
        out[backend] = {
            "seconds_per_timestamp": round(per_ts, 2),
            # all threads together (torch): with other work on the machine, wall time says less than this
            "cpu_seconds_per_timestamp": round(float(np.mean(st["cpu"])), 2) if backend == "torch" else None,
            "completeness_1mm": round(st["hits1"] / max(st["head"], 1), 4),
            "completeness_2mm": round(st["hits2"] / max(st["head"], 1), 4),
            "error_median_mm": round(float(np.median(errors)), 3) if len(errors) else None,
            "error_p90_mm": round(float(np.percentile(errors, 90)), 3) if len(errors) else None,
            # linear in pixels: the sweep, refinement and fusion are per-pixel work
            "projected_seconds_per_paper_timestamp": round(per_ts * scale, 1),
            "projected_hours_per_paper_subject": round(per_ts * scale * PAPER_TIMESTAMPS / 3600, 2),
        }
    out["target_torch_seconds_per_timestamp"] = 90.0
    out["torch_device"] = pick_torch_device(cfg.reconstruct.mvs.device, "reconstruct.mvs.device")
    return out


FLAME_FULL_BASIS = (300, 100)  # identity and expression coefficients of FLAME 2020/2023
REDUCED_BASIS = (100, 50)  # what the pipeline fitted before it used FLAME's whole basis


def bench_track(cfg: PipelineConfig, timestamps: int = 8, device: str | None = None, subject: str = "SYN") -> dict:
    """Seconds per timestamp and peak memory of ``track`` for ``timestamps`` timestamps x 16 views, at the
    pipeline's basis size and, for the cost of the basis, at another: FLAME's full basis (300 identity /
    100 expression coefficients), or 100 / 50 when the pipeline already fits the full one.

    Observations are generated from the synthetic head (points sampled on its posed surface, exact
    landmark projections) so the benchmark needs no earlier stage; the fit itself is the real one. Each
    basis size is fitted in a fresh process, so each peak memory is its own. The synthetic head fills
    only 14 identity / 16 expression columns (the rest are zero): the full-basis run measures the cost of
    the larger basis, not what it would fit. The baseline is the budget: the whole subject (50
    timestamps in the paper) in 10 minutes.
    """
    import dataclasses
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    configured = (cfg.track.num_shape, cfg.track.num_expression)
    sizes = {"configured": configured, "compared": REDUCED_BASIS if configured == FLAME_FULL_BASIS else FLAME_FULL_BASIS}
    runs = {}
    for name, (ns, ne) in sizes.items():
        run_cfg = dataclasses.replace(cfg, track=dataclasses.replace(cfg.track, num_shape=ns, num_expression=ne))
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            runs[name] = pool.submit(_fit_timed, run_cfg, timestamps, device, subject).result()
    base, other = runs["configured"], runs["compared"]
    per_ts = base["seconds"] / timestamps
    return {"bench": "track", "device": base["device"], "timestamps": timestamps, "views": 16,
            "num_shape": sizes["configured"][0], "num_expression": sizes["configured"][1],
            "seconds": base["seconds"], "seconds_per_timestamp": round(per_ts, 3),
            "peak_memory_mib": base["peak_memory_mib"],
            "baseline": "budget_600s_for_50_timestamps", "projected_50_timestamps_s": round(50 * per_ts, 1),
            "ratio": round(600.0 / max(50 * per_ts, 1e-9), 2), "cd_l1_mm_median": base["cd_l1_mm_median"],
            "compared_basis": f"{sizes['compared'][0]}/{sizes['compared'][1]}",
            "compared_seconds_per_timestamp": round(other["seconds"] / timestamps, 3),
            "compared_peak_memory_mib": other["peak_memory_mib"],
            "time_ratio_vs_compared": round(base["seconds"] / max(other["seconds"], 1e-9), 3)}


def _fit_timed(cfg: PipelineConfig, timestamps: int, device: str | None, subject: str) -> dict:
    """One fit of generated observations in this (fresh) process: seconds, peak memory, CD-L1."""
    import resource

    import torch

    from .stages.track import pick_device, run_track
    from .synthetic.observations import synthetic_observations

    dev = pick_device(device or cfg.track.device)
    obs, _ = synthetic_observations(cfg, num_timestamps=timestamps, seed=0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench-track-") as work:
        t0 = time.perf_counter()
        result = run_track(None, subject, cfg, work, device=dev, observations=obs)
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"device": dev, "seconds": round(seconds, 2), "peak_memory_mib": round(peak, 1),
            "cd_l1_mm_median": result.cd_l1_mm_median}


def bench_transfer(cfg: PipelineConfig, num_points: int = 1_000_000, trimesh_subset: int = 5_000) -> dict:
    """Deformation transfer (closest point + barycentric deformation) on ``num_points`` points within
    5 mm of the head model (FLAME-sized: ~4.7k vertices, ~9.3k triangles), against (a) the bare open3d
    closest-point query on the same points and (b) ``trimesh.proximity.closest_point`` on a subset.
    Also: rendering ms per view (splat + region ray cast) on the same mesh.
    """
    import numpy as np
    import open3d as o3d
    import trimesh

    from .flame.assets import load_assets
    from .stages.canonicalize import transfer_to_canonical
    from .stages.render import render_timestamp
    from .synthetic.rig import nersemble_like_rig

    model = load_assets(cfg.flame).model
    v, f = model.v_template.astype(np.float64), model.faces
    rng = np.random.default_rng(0)
    mesh = trimesh.Trimesh(v, f, process=False)
    pts, _ = trimesh.sample.sample_surface(mesh, num_points, seed=0)
    pts = (pts + rng.normal(0, 0.005 / np.sqrt(3), pts.shape)).astype(np.float32)
    canonical = v + rng.normal(0, 0.001, v.shape)  # any deformation field: the cost does not depend on it

    t0 = time.perf_counter()
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(v.astype(np.float32)), o3d.core.Tensor(f.astype(np.uint32)))
    scene.compute_closest_points(o3d.core.Tensor(pts))
    o3d_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    transfer_to_canonical(pts, v, canonical, f)
    ours_s = time.perf_counter() - t0
    sub = pts[:trimesh_subset]
    t0 = time.perf_counter()
    trimesh.proximity.closest_point(mesh, sub)
    tm_s = time.perf_counter() - t0
    ours_pps, tm_pps = num_points / ours_s, trimesh_subset / tm_s
    # Rendering: one timestamp, 16 views at the working resolution, 20k observed points.
    s = cfg.synth
    cams = {c.serial: c.scaled(cfg.capture.downscale) for c in nersemble_like_rig(s.width, s.height, s.focal, s.camera_distance)}
    serials = sorted(cams)
    few = pts[:20000].astype(np.float64)
    t0 = time.perf_counter()
    render_timestamp(few, few, np.ones((len(few), len(serials)), bool), np.ones(len(few), bool), cams, serials,
                     v, f)
    render_ms = 1000 * (time.perf_counter() - t0) / len(serials)
    return {"bench": "transfer", "points": num_points, "mesh_vertices": len(v), "mesh_triangles": len(f),
            "ours_points_per_s": round(ours_pps), "open3d_points_per_s": round(num_points / o3d_s),
            "ratio_vs_open3d": round(o3d_s / ours_s, 3), "target_ratio_vs_open3d": 0.8,
            "trimesh_points_per_s": round(tm_pps), "trimesh_subset": trimesh_subset,
            "speedup_vs_trimesh": round(ours_pps / tm_pps, 1), "target_speedup_vs_trimesh": 20,
            "render_ms_per_view": round(render_ms, 1)}


# No GPU step time of the large configuration has been measured here (scripts/gpu-check.sh measures one
# on a GPU machine). Until then the GPU's appetite comes from the paper: Tab. 5 runs inference on 40 images
# in 5 s on one GPU (8 images/s); a training step costs about 4 forward passes (forward, backward ~2,
# the checkpointed recompute 1), so about 2 images/s per GPU.
PAPER_TRAIN_IMAGES_PER_S = 2.0
PAPER_TRAIN_IMAGES_PER_S_SOURCE = ("estimate from the paper's Tab. 5 (40 images in 5 s inference) x 1/4 for a "
                                   "bf16 + checkpointed training step; no GPU step time measured here")


def _loader_profile(ds, n: int, resolution) -> dict:
    """Where one process's time per sample goes in ``FaceCanonDataset.load`` (ms): reading and checking
    the chunks, the image resize and scaling, the label resampling, the ray maps (uncached), and the
    whole ``load`` (its remainder: allocating the sample's arrays, the ray cache's copies, tensors)."""
    import cv2
    import numpy as np

    from .cameras import scale_intrinsics
    from .training.dataset import ray_maps, resample_labels

    h, w = resolution
    spent = dict.fromkeys(("read", "image", "labels", "rays", "load"), 0.0)
    for i in range(n):
        t0 = time.perf_counter()
        raw = ds.read_raw(ds.samples[i])
        spent["read"] += time.perf_counter() - t0
        for j in range(len(raw["rows"])):
            rgb = raw["rgb"][j]
            t0 = time.perf_counter()
            np.multiply(cv2.resize(rgb, (w, h)).transpose(2, 0, 1), np.float32(1 / 255), dtype=np.float32)
            t1 = time.perf_counter()
            resample_labels(raw["depth"][j], raw["canonical"][j], raw["mask"][j], h, w)
            t2 = time.perf_counter()
            ray_maps(scale_intrinsics(raw["K"][j], w / rgb.shape[1], h / rgb.shape[0]), raw["world_2_cam"][j], h, w)
            t3 = time.perf_counter()
            spent["image"] += t1 - t0
            spent["labels"] += t2 - t1
            spent["rays"] += t3 - t2
        t0 = time.perf_counter()
        ds.load(ds.samples[i], h, w)
        spent["load"] += time.perf_counter() - t0
    return {k: round(v / n * 1000, 1) for k, v in spent.items()}


def bench_loader(store, samples: int = 24, images_per_sample: int = 4, resolution=(518, 518)) -> dict:
    """Samples/s of the DataLoader (0 and 2 workers, 518x518) vs the raw bound (reading and decoding
    the same chunks in a tight loop) and vs the same samples stored as one ``.npz`` per view."""
    import os
    from pathlib import Path

    import numpy as np
    import torch

    from .training import FaceCanonDataset, collate_samples

    ds = FaceCanonDataset(store, mode="views", images_per_sample=images_per_sample, resolution=resolution, seed=0)
    n = min(samples, len(ds))
    if n == 0:
        raise InputValueError(f"{store}: no samples with {images_per_sample} views per timestamp")
    t0 = time.perf_counter()
    for i in range(n):
        ds.read_raw(ds.samples[i])
    raw_s = time.perf_counter() - t0
    out = {"bench": "loader", "store": str(store), "samples": n, "images_per_sample": images_per_sample,
           "resolution": list(resolution), "raw_samples_per_s": round(n / raw_s, 2)}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=1,
                                             num_workers=workers, collate_fn=collate_samples)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        s = time.perf_counter() - t0
        out[f"loader_{workers}w_samples_per_s"] = round(n / s, 2)
        out[f"ratio_{workers}w"] = round(raw_s / s, 3)
    out["ratio"] = max(out["ratio_0w"], out["ratio_2w"])
    out["target_ratio"] = 0.7
    out["profile_ms_per_sample"] = _loader_profile(ds, n, resolution)
    # Images one CPU core prepares per second (0 workers: the main process alone; 2 workers: two processes,
    # the main one idle), and the cores one GPU needs to be fed during training with the large config.
    per_core = {w: out[f"loader_{w}w_samples_per_s"] * images_per_sample / max(w, 1) for w in (0, 2)}
    out["images_per_s_per_core_0w"] = round(per_core[0], 1)
    out["images_per_s_per_core_2w"] = round(per_core[2], 1)
    out["gpu_train_images_per_s"] = PAPER_TRAIN_IMAGES_PER_S
    out["gpu_train_images_per_s_source"] = PAPER_TRAIN_IMAGES_PER_S_SOURCE
    out["cores_per_gpu_large"] = round(PAPER_TRAIN_IMAGES_PER_S / max(min(per_core.values()), 1e-9), 2)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        files = []
        for i in range(n):
            raw = ds.read_raw(ds.samples[i])
            for j in range(len(ds.samples[i])):
                p = Path(tmp) / f"{i}_{j}.npz"
                np.savez_compressed(p, **{k: v[j] for k, v in raw.items() if k not in ("rows", "skipped")})
                files.append(p)
        t0 = time.perf_counter()
        for p in files:
            with np.load(p) as z:
                {k: z[k] for k in z.files}
        files_s = time.perf_counter() - t0
        out["npz_files_samples_per_s"] = round(n / files_s, 2)
        out["speedup_vs_files"] = round(files_s / raw_s, 2)
        out["npz_bytes_per_view"] = int(np.mean([os.path.getsize(p) for p in files]))
    from .store import subjects

    total = sum(f.stat().st_size for pid in subjects(store) for f in (Path(store) / "subjects" / pid).rglob("*") if f.is_file())
    views = ds.rows["subject"].size
    out["store_bytes_per_view"] = int(total / max(views, 1))
    return out


def bench_build(cfg: PipelineConfig) -> dict:
    """``build`` of 2 small synthetic subjects (1 sequence x 8 frames, 3 + 1 timestamps) with every
    stage's threads capped at 1: 2 local workers vs 1 (``speedup``, target >= 1.6); and the wall time
    with uncapped threads on 2 workers. The capture is rendered once, before any timing."""
    import copy
    from pathlib import Path

    from .manifest import ManifestEntry
    from .orchestration.build import SourceSpec
    from .orchestration.run import build
    from .synthetic.synth import synthesize

    small = copy.deepcopy(cfg)
    small.synth.subjects, small.synth.sequences, small.synth.frames = 2, 1, 8
    small.select.num_expression, small.select.num_pose = 3, 1
    entries = [ManifestEntry("900"), ManifestEntry("901")]
    out = {"bench": "build", "subjects": 2, "timestamps_per_subject": 4}
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        synthesize(small, out=Path(tmp), verify=False)
        spec = SourceSpec(str(Path(tmp) / "capture"), str(Path(tmp) / "ground_truth"))
        for label, threads, workers in (("capped_1_worker", 1, 1), ("capped_2_workers", 1, 2),
                                        ("uncapped_2_workers", 0, 2)):
            run_cfg = copy.deepcopy(small)
            run_cfg.threads = threads
            t0 = time.perf_counter()
            outcomes = build(entries, run_cfg, spec, f"{tmp}/{label}/work", f"{tmp}/{label}/store", workers=workers)
            out[f"{label}_s"] = round(time.perf_counter() - t0, 1)
            out[f"{label}_ok"] = all(o.ok for o in outcomes)
            out[f"{label}_stage_seconds"] = round(sum(sum(o.seconds.values()) for o in outcomes), 1)
    out["speedup"] = round(out["capped_1_worker_s"] / out["capped_2_workers_s"], 2)
    out["target_speedup"] = 1.6
    return out


def bench_train(cfg: PipelineConfig, train_config: str = "{project}/pipelines/train_tiny.toml",
                protocol: str = "{project}/pipelines/eval_synthetic.toml",
                manifest: str = "{project}/manifests/synthetic_trainer.txt") -> dict:
    """The trainer's fixed-budget experiment from nothing: build the synthetic subjects of ``manifest``
    into the pipeline's store when missing, train the tiny config on CPU (the protocol's subjects held
    out), and evaluate the trained model and the same architecture untrained on the held-out subject."""
    from .manifest import read_manifest
    from .orchestration.build import SourceSpec
    from .orchestration.run import build, ensure_synthetic_capture
    from .paths import expand
    from .sources import capture_roots
    from .store import subjects as store_subjects
    from .training.config import load_eval_config, load_train_config
    from .training.evaluate import evaluate_model
    from .training.tables import paper_tables, save_evaluation
    from .training.trainer import model_from_checkpoint, select_device, train

    tcfg, ev = load_train_config(expand(train_config)), load_eval_config(expand(protocol))
    held_out = set(ev.subjects)
    if held_out & set(tcfg.data.subjects) or not held_out <= set(tcfg.data.exclude_subjects):
        raise InputValueError(f"{tcfg.source_file}: the evaluation subjects {sorted(held_out)} must be excluded from training")
    store = expand(cfg.store)
    entries = read_manifest(expand(manifest))
    have = set(store_subjects(store)) if (store / "index.parquet").is_file() else set()
    out: dict = {"bench": "train", "store": str(store), "held_out": sorted(held_out)}
    t0 = time.perf_counter()
    missing = [e for e in entries if e.subject not in have]
    if missing:
        cap, gt = capture_roots(cfg.capture, None)
        synth_gt = ensure_synthetic_capture(cfg, str(cap), [e.subject for e in entries])
        spec = SourceSpec(str(cap), str(gt or synth_gt), cfg.capture.color_correction)
        outcomes = build(entries, cfg, spec, str(expand(cfg.work)), str(store))
        failed = [o.subject for o in outcomes if not o.ok]
        if failed:
            raise InputValueError(f"building the training store failed for subjects {failed}")
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    run_dir = expand(tcfg.out)
    t1 = time.perf_counter()
    summary = train(tcfg, store, run_dir, resume=False)
    out["seconds"] = round(time.perf_counter() - t1, 1)
    out["steps"], out["stopped"] = summary["step"], summary["stopped"]
    device = select_device("auto")
    results = {}
    for label, untrained in (("untrained", True), ("trained", False)):
        model, _ = model_from_checkpoint(run_dir / "last.pt", device, untrained=untrained)
        results[label] = {"protocol": ev.name, **evaluate_model(model, str(store), ev, str(device))}
        save_evaluation(store, results[label], label)
    for label, r in results.items():
        first = str(ev.margins[0])
        out[f"epe_{label}"] = round(r["margins"][first]["epe_px"], 3)  # frontal camera, the first margin
        out[f"under_5px_{label}"] = round(r["margins"][first]["under_5px"], 3)
        out[f"correspondences_{label}"] = r["margins"][first]["correspondences"]
        out[f"absrel_mono_{label}"] = round(r["depth"]["monocular"]["absrel"], 5)
        out[f"absrel_multi_view_{label}"] = round(r["depth"]["multi_view"]["absrel"], 5)
    out["epe_margin"] = ev.margins[0]
    out["epe_ratio_untrained_over_trained"] = round(out["epe_untrained"] / out["epe_trained"], 2)
    out["target_epe_ratio"] = 2.0
    out["evaluation"] = results
    out["tables"] = paper_tables(results)
    out["checkpoint"] = str(run_dir / "last.pt")
    return out


SUBJECTS_IN_DATASET = 414  # NeRSemble v2 (the paper's dataset)
REAL_FRAMES_PER_SUBJECT = 9500  # ~22 sequences at 73 fps
REAL_FRAME_STRIDE = 2  # pipelines/nersemble.toml's select.frame_stride: select reads every 2nd frame


# Runs argv[2:] as its child and writes the child's peak RSS (KiB, os.wait4) to argv[1]; exits with its status.
_PEAK_RSS_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def bench_subject(cfg: PipelineConfig, subject: str = "900") -> dict:
    """One synthetic subject through the whole chain at the pipeline's sizes (``pipelines/bench_subject.toml``:
    NeRSemble's 2200 x 3208 videos, 802 x 550 working resolution, 40 + 10 timestamps, 16 views), each
    stage its own child process: seconds and peak RSS per stage (``os.wait4``'s ``ru_maxrss`` of that
    process, taken by a small launcher process so this one's size does not leak into it), bytes in the store and in the work folder before and after the ``light`` policy, and the
    projection to the dataset's 414 subjects (CPU-hours on this machine, TB). The capture is rendered
    once into ``synth.out`` and reused; the work folder and store are made fresh. ``select`` reads every
    second frontal frame of a real subject (~9500 frames), so its projection is its fixed cost (process
    start, plot) plus that many frames at its measured frames per second."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from .paths import expand
    from .stages.chain import CHAIN
    from .stages.prune import folder_bytes, prune_work
    from .synthetic.synth import synthesize

    cache, work, store = expand(cfg.synth.out), expand(cfg.work), expand(cfg.store)
    capture = cache / "capture"
    out: dict = {"bench": "subject", "subject": subject, "video": [cfg.synth.width, cfg.synth.height],
                 "downscale": cfg.reconstruct.downscale or cfg.capture.downscale}
    t0 = time.perf_counter()
    if not (capture / subject).is_dir():
        synthesize(cfg, out=cache, verify=False, subject_ids=[subject])
    out["capture_seconds"] = round(time.perf_counter() - t0, 1)
    for folder in (work, store):
        shutil.rmtree(folder, ignore_errors=True)
    exe = Path(sys.executable).parent / "facecanon-data"
    seconds, peak, figures = {}, {}, {}
    for stage in CHAIN:
        cmd = [str(exe), stage.name, "--pipeline", str(cfg.source_file), "--root", str(capture), "--subject", subject,
               "--work", str(work), "--json"] + (["--out", str(store)] if stage.needs_store else [])
        log_path = work.parent / f"bench-subject-{stage.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        rss_path = work.parent / f"bench-subject-{stage.name}.maxrss"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:  # the ground truth beside --root is found by the stage itself
            # Through a small launcher: Linux carries a process's peak RSS across fork and exec, so a stage
            # forked from this process (large after rendering the capture) would report at least its size.
            child = subprocess.Popen([sys.executable, "-c", _PEAK_RSS_LAUNCHER, str(rss_path), *cmd],
                                     stdout=log, stderr=subprocess.STDOUT)
            status = child.wait()
        seconds[stage.name] = round(time.perf_counter() - t0, 1)
        if status != 0:
            raise InputValueError(f"bench subject: stage {stage.name} failed (exit {status}); its output: {log_path}")
        peak[stage.name] = round(int(rss_path.read_text()) * 1024 / 1e9, 3)  # ru_maxrss is in KiB on Linux
        lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
        figures[stage.name] = json.loads(lines[-1]) if lines else {}
    timestamps = int(figures["write"].get("timestamps", 0))
    views = timestamps * int(figures["write"].get("views", 0))
    store_bytes = folder_bytes(store / "subjects" / subject)
    pruned = prune_work(work, subject, "light")
    out.update(seconds=seconds, peak_rss_gb=peak, peak_rss_gb_chain=max(peak.values()), timestamps=timestamps,
               views=views, store_mb=round(store_bytes / 1e6, 1), store_mb_per_view=round(store_bytes / max(views, 1) / 1e6, 3),
               work_mb_per_timestamp_all=round(pruned.bytes_before / max(pruned.timestamps, 1) / 1e6, 2),
               work_mb_per_timestamp=round(pruned.mb_per_timestamp, 3))
    sel = figures["select"]
    select_real = seconds["select"]
    if sel.get("frames_per_second"):
        select_real += -float(sel["seconds"]) + REAL_FRAMES_PER_SUBJECT / REAL_FRAME_STRIDE / float(sel["frames_per_second"])
    per_subject = sum(v for k, v in seconds.items() if k != "select") + select_real
    cores = os.cpu_count() or 1
    out["projection"] = {
        "subjects": SUBJECTS_IN_DATASET, "cores": cores,
        "select_seconds_per_real_subject": round(select_real, 1),
        "hours_on_this_machine": round(per_subject * SUBJECTS_IN_DATASET / 3600, 1),
        "cpu_hours": round(per_subject * cores * SUBJECTS_IN_DATASET / 3600, 1),  # core-hours, all cores busy
        "gpu_hours": None,  # no CUDA figures measured on this machine (track and dense MVS would move there)
        "store_tb": round(store_bytes * SUBJECTS_IN_DATASET / 1e12, 3),
        "work_tb_light": round(pruned.bytes_after * SUBJECTS_IN_DATASET / 1e12, 4),
    }
    out["target_peak_rss_gb"] = {"write": 2.0, "chain": 8.0}
    out["target_work_mb_per_timestamp"] = 2.0
    return out


# name -> (function, what it needs: "capture" (source, subject, cfg), "store" (store path) or "config" (cfg))
BENCHES = {
    "select": (bench_select, "capture"),
    "color": (bench_color, "capture"),
    "dense": (bench_dense, "capture"),
    "reconstruct": (bench_reconstruct, "capture"),
    "track": (bench_track, "config"),  # generates its observations from the head model: no capture needed
    "transfer": (bench_transfer, "config"),
    "loader": (bench_loader, "store"),
    "build": (bench_build, "config"),
    "train": (bench_train, "config"),
    "subject": (bench_subject, "config"),
}
