"""Stage ``select``: MediaPipe on the frontal camera, then farthest-point selection of timestamps.

Per subject, over all its performance sequences together: expression and pose features per processed
frame (:mod:`facecanon_data.features`), then ``num_expression`` picks by farthest-point sampling on the
expression features and ``num_pose`` more on the pose features. The pose picks start from the
expression picks as the already-selected set, so they are disjoint from them and fill the gaps the
expression picks leave in pose space. Frames without a detected face are never selected.

Decoding runs in a thread ahead of the detector (OpenCV releases the GIL while decoding), so the stage
runs near MediaPipe's own speed.

Outputs in ``{work}/{subject}/select/``: ``features.parquet`` (sequence, frame, detected, score,
expr_*, pose_*), ``selection.parquet`` (sequence, frame, reason, rank), ``coverage.png``, ``_DONE.json``.

With ``select.timestamps = "first:N"`` (test subjects) nothing is detected or sampled: the selection is
the first N frames of every sequence, consecutive, with reason ``"first"`` and the frame as rank; only
``selection.parquet`` is written. The rest of the chain makes their labels exactly like training labels.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..artifacts import StageDir, atomic_write
from ..config import PipelineConfig, first_frames
from ..features import FrameObservation, make_backend
from ..prefetch import prefetch
from ..sampling import farthest_point_sampling
from ..sources.base import CaptureSource
from ..threads import apply_thread_cap
from ..errors import InputFileNotFound, InputValueError

log = logging.getLogger(__name__)
STAGE = "select"


@dataclass
class SelectResult:
    subject: str
    backend: str
    frames_processed: int
    frontal_detect_rate: float | None  # None in "first:N" mode (no detector runs)
    selected_expression: int
    selected_pose: int
    seconds: float
    frames_per_second: float
    gt_coverage_gain: float | None = None  # expression picks vs as many uniform-in-time picks (p95)
    gt_coverage_gain_mean: float | None = None  # the same with the mean distance
    gt_coverage_gain_all: float | None = None  # all picks (expression + pose) vs as many uniform (p95)
    gt_coverage_gain_all_mean: float | None = None
    skipped_sequences: dict[str, str] = field(default_factory=dict)  # sequence -> why none of it is used
    mode: str = "select"  # select.timestamps
    selected_first: int = 0  # "first:N" mode: consecutive frames kept over all sequences
    selection: list[tuple[str, int, str, int]] = field(default_factory=list)  # (sequence, frame, reason, rank)
    color_correction: bool = False  # frames colour-corrected with the subject's color_calibration.json

    def figures(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "selection"}
        return d


def configured_sequences(source: CaptureSource, subject: str, cfg: PipelineConfig) -> list[str]:
    """The subject's sequences after ``select.include_sequences`` / ``exclude_sequences``."""
    seqs = source.sequences(subject)
    sel = cfg.select
    if sel.include_sequences:
        missing = sorted(set(sel.include_sequences) - set(seqs))
        if missing:
            raise InputValueError(f"select.include_sequences names sequences subject {subject} lacks: {missing}")
        seqs = [s for s in seqs if s in sel.include_sequences]
    return [s for s in seqs if s not in sel.exclude_sequences]


def skipped_sequences(source: CaptureSource, subject: str, cfg: PipelineConfig) -> dict[str, str]:
    """Configured sequences that cannot be used, with the reason: a calibrated camera has no video there
    (every timestamp needs all views), so its timestamps are never selected."""
    out = {}
    for seq in configured_sequences(source, subject, cfg):
        missing = source.missing_cameras(subject, seq)
        if missing:
            files = ", ".join(f"cam_{serial}.mp4" for serial in missing)
            out[seq] = f"no video for camera(s) {', '.join(missing)} ({files} missing)"
    return out


def sequences_to_process(source: CaptureSource, subject: str, cfg: PipelineConfig) -> list[str]:
    skipped = skipped_sequences(source, subject, cfg)
    return [s for s in configured_sequences(source, subject, cfg) if s not in skipped]


def frame_plan(source: CaptureSource, subject: str, cfg: PipelineConfig) -> list[tuple[str, list[int]]]:
    """(sequence, frame indices) to process, in time order."""
    stride = cfg.select.frame_stride
    return [(seq, list(range(0, source.num_frames(subject, seq), stride)))
            for seq in sequences_to_process(source, subject, cfg)]


def decoded_frames(source: CaptureSource, subject: str, plan, serial: str, downscale: int,
                   depth: int = 16) -> Iterator[tuple[str, int, np.ndarray]]:
    """(sequence, frame, image) in plan order, decoded by a background thread ``depth`` frames ahead."""
    def frames():
        for seq, idx in plan:
            for i, img in source.frames(subject, seq, serial, idx, downscale=downscale):
                yield seq, i, img

    return prefetch(frames(), depth, name="select-decode")


def run_select(source: CaptureSource, subject: str, cfg: PipelineConfig, work,
               progress: Callable[[int, int], None] | None = None) -> SelectResult:
    """Run the stage for one subject and write its outputs (see module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sel = cfg.select
    if first_frames(sel.timestamps) is not None:
        return run_first_frames(source, subject, cfg, work)
    apply_thread_cap(cfg.threads)
    out = StageDir(work, subject, STAGE)
    backend = make_backend(sel, cfg.source_file)  # before any work: a missing .task fails fast
    skipped = skipped_sequences(source, subject, cfg)
    for seq, why in skipped.items():
        log.warning("subject %s: sequence %s skipped: %s", subject, seq, why)
    plan = frame_plan(source, subject, cfg)
    total = sum(len(f) for _, f in plan)
    if total == 0:
        raise InputValueError(f"subject {subject}: no frames to process (sequences: {[s for s, _ in plan]}; "
                              f"skipped: {skipped or 'none'})")
    out.path.mkdir(parents=True, exist_ok=True)
    downscale = sel.downscale or cfg.capture.downscale
    t0 = time.perf_counter()
    keys: list[tuple[str, int]] = []
    obs: list[FrameObservation] = []
    current = None
    try:
        for seq, i, img in decoded_frames(source, subject, plan, cfg.capture.frontal_serial, downscale,
                                          sel.queue_frames):
            if seq != current:
                backend.start_sequence()
                current = seq
            obs.append(backend.observe(img))
            keys.append((seq, i))
            if progress:
                progress(len(obs), total)
    finally:
        backend.close()
    seconds = time.perf_counter() - t0
    expr, pose, score = backend.features(obs, sel.expression_dim)
    detected = np.array([o.landmarks is not None for o in obs])
    if not detected.any():
        raise InputValueError(f"subject {subject}: MediaPipe found no face in any frontal-camera frame "
                         f"(camera {cfg.capture.frontal_serial})")
    pick_e = farthest_point_sampling(expr, sel.num_expression, eligible=detected)
    pick_p = farthest_point_sampling(pose, sel.num_pose, eligible=detected, already=pick_e)
    selection = [(keys[i][0], keys[i][1], "expression", r) for r, i in enumerate(pick_e)]
    selection += [(keys[i][0], keys[i][1], "pose", r) for r, i in enumerate(pick_p)]

    # -- outputs ---------------------------------------------------------------------------------
    cols = {"sequence": [k[0] for k in keys], "frame": np.array([k[1] for k in keys], np.int32),
            "detected": detected, "score": score.astype(np.float32)}
    cols.update({f"expr_{j}": expr[:, j].astype(np.float32) for j in range(expr.shape[1])})
    cols.update({f"pose_{j}": pose[:, j].astype(np.float32) for j in range(pose.shape[1])})
    meta = {b"backend": backend.name.encode(), b"config_hash": cfg.section_hash("capture", "select").encode()}
    table = pa.table(cols).replace_schema_metadata(meta)
    atomic_write(out.file("features.parquet"), lambda p: pq.write_table(table, p))
    sel_table = pa.table({"sequence": [s[0] for s in selection], "frame": np.array([s[1] for s in selection], np.int32),
                          "reason": [s[2] for s in selection], "rank": np.array([s[3] for s in selection], np.int32)})
    atomic_write(out.file("selection.parquet"), lambda p: pq.write_table(sel_table.replace_schema_metadata(meta), p))
    atomic_write(out.file("coverage.png"), lambda p: plot_coverage(expr, pose, detected, pick_e, pick_p, p,
                                                                    title=f"subject {subject} ({backend.name})"))
    result = SelectResult(subject=subject, backend=backend.name, frames_processed=len(obs),
                          frontal_detect_rate=float(detected.mean()), selected_expression=len(pick_e),
                          selected_pose=len(pick_p), seconds=round(seconds, 2),
                          frames_per_second=round(len(obs) / max(seconds, 1e-9), 2), skipped_sequences=skipped,
                          selection=selection, color_correction=source.color_correction_applied(subject))
    gt = source.ground_truth(subject)
    if gt is not None:
        gt_space = ground_truth_expression_space(gt, keys)
        result.gt_coverage_gain, result.gt_coverage_gain_mean = coverage_gain(gt_space, pick_e)
        result.gt_coverage_gain_all, result.gt_coverage_gain_all_mean = coverage_gain(
            gt_space, np.concatenate([pick_e, pick_p]))
    return result


def run_first_frames(source: CaptureSource, subject: str, cfg: PipelineConfig, work) -> SelectResult:
    """``select.timestamps = "first:N"``: the first N frames of each usable sequence (fewer where a
    sequence is shorter), in time order; writes ``selection.parquet`` (see module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = first_frames(cfg.select.timestamps)
    skipped = skipped_sequences(source, subject, cfg)
    for seq, why in skipped.items():
        log.warning("subject %s: sequence %s skipped: %s", subject, seq, why)
    selection = [(seq, f, "first", f) for seq in sequences_to_process(source, subject, cfg)
                 for f in range(min(count, source.num_frames(subject, seq)))]
    if not selection:
        raise InputValueError(f"subject {subject}: no frames to keep (sequences: "
                              f"{configured_sequences(source, subject, cfg)}; skipped: {skipped or 'none'})")
    out = StageDir(work, subject, STAGE)
    out.path.mkdir(parents=True, exist_ok=True)
    meta = {b"backend": b"none", b"config_hash": cfg.section_hash("capture", "select").encode()}
    table = pa.table({"sequence": [s[0] for s in selection], "frame": np.array([s[1] for s in selection], np.int32),
                      "reason": [s[2] for s in selection], "rank": np.array([s[3] for s in selection], np.int32)})
    atomic_write(out.file("selection.parquet"), lambda p: pq.write_table(table.replace_schema_metadata(meta), p))
    return SelectResult(subject=subject, backend="none", frames_processed=0, frontal_detect_rate=None,
                        selected_expression=0, selected_pose=0, seconds=0.0, frames_per_second=0.0,
                        skipped_sequences=skipped, mode=cfg.select.timestamps, selected_first=len(selection),
                        selection=selection, color_correction=source.color_correction_applied(subject))


def read_selection(work, subject: str) -> list[tuple[str, int, str, int]]:
    """The selection ``select`` wrote: (sequence, frame, reason, rank) rows."""
    import pyarrow.parquet as pq

    out = StageDir(work, subject, STAGE)
    if not out.file("selection.parquet").is_file():
        raise InputFileNotFound(f"{out.file('selection.parquet')}: stage select has not run for subject {subject}")
    t = pq.read_table(out.file("selection.parquet")).to_pydict()
    return list(zip(t["sequence"], t["frame"], t["reason"], t["rank"]))


# ---------------------------------------------------------------------------------------------
# measurement against ground truth


def _coverage(points: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
    """95th percentile and mean, over all points, of the distance to the nearest chosen point."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(points[chosen]).query(points)
    return float(np.percentile(d, 95)), float(d.mean())


def ground_truth_expression_space(gt, keys: list[tuple[str, int]]) -> np.ndarray:
    """(N, E + 3) ground-truth expression vector per processed frame: FLAME expression coefficients
    with the jaw rotation (radians) appended, since trackers treat jaw opening as expression."""
    return np.asarray([np.concatenate([gt.frame(seq, f)["expression"], gt.frame(seq, f)["jaw"]])
                       for seq, f in keys], np.float64)


def coverage_gain(points: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
    """How much better ``chosen`` covers ``points`` than as many uniform-in-time picks.

    Coverage = distance from every frame to its nearest pick; returns (p95 ratio, mean ratio),
    uniform / ours, so > 1 means our picks cover the space better.
    """
    uniform = np.unique(np.linspace(0, len(points) - 1, len(chosen)).round().astype(int))
    p95_u, mean_u = _coverage(points, uniform)
    p95_o, mean_o = _coverage(points, chosen)
    return round(p95_u / max(p95_o, 1e-12), 3), round(mean_u / max(mean_o, 1e-12), 3)


# ---------------------------------------------------------------------------------------------


def plot_coverage(expr, pose, detected, pick_e, pick_p, path, title: str = "") -> None:
    """Two panels: expression features (first two principal axes) and head pose (yaw, pitch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    e = expr[detected] - expr[detected].mean(0)
    _, _, vt = np.linalg.svd(e, full_matrices=False)
    proj = np.full((len(expr), 2), np.nan)
    proj[detected] = e @ vt[:2].T if vt.shape[0] >= 2 else np.c_[e[:, :1], np.zeros(len(e))]
    yaw_pitch = np.degrees(pose[:, [1, 0]])
    for ax, xy, label in ((axes[0], proj, ("expression PC 1", "expression PC 2")),
                          (axes[1], yaw_pitch, ("yaw (deg)", "pitch (deg)"))):
        ax.scatter(xy[:, 0], xy[:, 1], s=8, c="0.75", label=f"frames ({int(detected.sum())} with a face)")
        ax.scatter(xy[pick_e, 0], xy[pick_e, 1], s=36, c="tab:red", label=f"expression picks ({len(pick_e)})")
        ax.scatter(xy[pick_p, 0], xy[pick_p, 1], s=36, c="tab:blue", marker="s", label=f"pose picks ({len(pick_p)})")
        ax.set_xlabel(label[0])
        ax.set_ylabel(label[1])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"Timestamp selection coverage — {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
