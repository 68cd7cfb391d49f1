"""``facecanon-data build``: the per-subject chain, scheduled by Dask (or run in-process for batch jobs).

Graph per subject: select -> reconstruct (one task per selected timestamp) -> track (asks for a
``GPU`` resource when the cluster has one) -> canonicalize -> render -> write; then one ``index`` for
the store. Subjects run concurrently. Stages are plain functions (``facecanon_data.stages``); this
module only decides what runs where and when, and never touches geometry.

Resumable: every stage writes a completion marker last, carrying its config hash; a task whose
marker matches is skipped (``force`` redoes named stages). Fault isolation: a failing subject is
recorded with its stage and reason, and the others go on.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import StageDir
from ..config import PipelineConfig

if TYPE_CHECKING:
    from ..progress import BuildProgress

log = logging.getLogger(__name__)
STAGES = ("select", "reconstruct", "track", "canonicalize", "render", "write")


@dataclass(frozen=True)
class SourceSpec:
    """How to open the capture in any process (sources themselves are not shipped between workers)."""

    root: str
    ground_truth: str | None
    color_correction: bool = True

    def open(self):
        from ..sources import NeRSembleSource

        return NeRSembleSource(self.root, self.ground_truth, self.color_correction)


@dataclass
class SubjectOutcome:
    subject: str
    ok: bool = True
    failed_stage: str = ""
    reason: str = ""
    timestamps_selected: int = 0
    timestamps_kept: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# tasks: each returns a small picklable dict; each skips work whose marker matches its config


def _done(work, subject, stage, cfg: PipelineConfig, sections, force) -> bool:
    return stage not in force and StageDir(work, subject, stage).done(cfg.section_hash(*sections)) is not None


def task_select(spec: SourceSpec, subject: str, cfg: PipelineConfig, work: str, force=()) -> dict:
    from ..stages.select import read_selection, run_select

    t0 = time.perf_counter()
    if not _done(work, subject, "select", cfg, ("capture", "select"), force):
        run_select(spec.open(), subject, cfg, work)
    picks = [(s, int(f)) for s, f, _, _ in read_selection(work, subject)]
    if not picks:
        raise RuntimeError(f"{StageDir(work, subject, 'select').path}: select kept no timestamp "
                           "(no frame of the frontal camera with a face?)")
    return {"timestamps": picks, "seconds": time.perf_counter() - t0}


def task_reconstruct_one(spec: SourceSpec, subject: str, cfg: PipelineConfig, work: str, seq: str, frame: int,
                         force=()) -> dict:
    from dataclasses import asdict

    from ..stages.reconstruct import reconstruct_one

    t0 = time.perf_counter()
    res = reconstruct_one(spec.open(), subject, cfg, work, seq, frame, force="reconstruct" in force)
    return {"result": asdict(res), "seconds": time.perf_counter() - t0}


def task_finish_reconstruct(subject: str, cfg: PipelineConfig, work: str, results: list[dict]) -> dict:
    from ..stages.reconstruct import TimestampResult, ViewStats, summarize_reconstruct

    objs = []
    for r in results:
        r = dict(r)
        r["views"] = [ViewStats(**v) for v in r["views"]]
        objs.append(TimestampResult(**r))
    summary = summarize_reconstruct(subject, cfg, work, objs)
    if summary.timestamps_kept == 0:
        raise RuntimeError(f"no timestamp kept ({summary.dropped})")
    return {"kept": summary.timestamps_kept, "dropped": summary.dropped}


def task_track(spec: SourceSpec, subject: str, cfg: PipelineConfig, work: str, force=()) -> dict:
    from ..stages.track import run_track

    t0 = time.perf_counter()
    if not _done(work, subject, "track", cfg, ("capture", "reconstruct", "flame", "track"), force):
        run_track(spec.open(), subject, cfg, work)
    return {"seconds": time.perf_counter() - t0}


def task_canonicalize_render(spec: SourceSpec, subject: str, cfg: PipelineConfig, work: str, force=()) -> dict:
    from ..stages.canonicalize import run_canonicalize
    from ..stages.render import run_render

    t0 = time.perf_counter()
    base = ("capture", "reconstruct", "flame", "track")
    redo = not _done(work, subject, "canonicalize", cfg, base + ("canonicalize",), force)
    if redo:
        run_canonicalize(spec.open(), subject, cfg, work)
    if redo or not _done(work, subject, "render", cfg, base + ("canonicalize", "render"), force):
        run_render(spec.open(), subject, cfg, work)
    return {"seconds": time.perf_counter() - t0}


def task_write(subject: str, cfg: PipelineConfig, work: str, store: str, force=()) -> dict:
    from ..stages.write import run_write

    t0 = time.perf_counter()
    marker = StageDir(work, subject, "write")
    key = cfg.hash() + ":" + str(Path(store).resolve())
    done = marker.done(key) is not None and (Path(store) / "subjects" / subject).is_dir()
    if "write" in force or not done:
        marker.begin()
        info = run_write(subject, cfg, work, store)
        marker.finish(key, info)
    return {"seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_subject_inline(spec: SourceSpec, subject: str, cfg: PipelineConfig, work: str, store: str,
                       force=()) -> SubjectOutcome:
    """The whole chain of one subject in this process (batch jobs: one subject per job)."""
    out = SubjectOutcome(subject)
    stage = "select"
    try:
        r = task_select(spec, subject, cfg, work, force)
        out.timestamps_selected, out.seconds["select"] = len(r["timestamps"]), r["seconds"]
        stage = "reconstruct"
        t0 = time.perf_counter()
        results = [task_reconstruct_one(spec, subject, cfg, work, s, f, force)["result"] for s, f in r["timestamps"]]
        fin = task_finish_reconstruct(subject, cfg, work, results)
        out.timestamps_kept, out.dropped = fin["kept"], fin["dropped"]
        out.seconds["reconstruct"] = time.perf_counter() - t0
        for stage, fn in (("track", task_track), ("render", task_canonicalize_render)):
            out.seconds[stage] = fn(spec, subject, cfg, work, force)["seconds"]
        stage = "write"
        out.seconds["write"] = task_write(subject, cfg, work, store, force)["seconds"]
    except Exception as exc:  # noqa: BLE001 - fault isolation: record and go on
        out.ok, out.failed_stage, out.reason = False, stage, _reason(exc)
        log.debug("subject %s failed in %s:\n%s", subject, stage, traceback.format_exc())
    return out


def run_build_dask(client, spec: SourceSpec, subjects: list[str], cfg: PipelineConfig, work: str, store: str,
                   force=(), gpu: bool = False, progress: "BuildProgress | None" = None) -> list[SubjectOutcome]:
    """Schedule all subjects on a Dask client; reconstruct fans out once select has chosen timestamps."""
    from distributed import as_completed

    outcomes = {s: SubjectOutcome(s) for s in subjects}
    meta: dict = {}
    pending_ts: dict[str, list] = {}
    results_ts: dict[str, list] = {}

    def submit(fn, *args, stage: str, subject: str, resources=None):
        fut = client.submit(fn, *args, pure=False, resources=resources, key=f"{stage}-{subject}-{time.time_ns()}")
        meta[fut.key] = (subject, stage)
        return fut

    if progress:
        progress.start(subjects)
    ac = as_completed([submit(task_select, spec, s, cfg, work, force, stage="select", subject=s) for s in subjects],
                      with_results=False)
    for fut in ac:
        subject, stage = meta[fut.key]
        o = outcomes[subject]
        if not o.ok:
            continue
        if fut.status == "error":
            o.ok, o.failed_stage, o.reason = False, stage, _reason(fut.exception())
            if progress:
                progress.failed(subject, stage, o.reason)
            continue
        r = fut.result()
        if stage == "select":
            o.timestamps_selected, o.seconds["select"] = len(r["timestamps"]), r["seconds"]
            pending_ts[subject] = list(r["timestamps"])
            if progress:
                progress.timestamps(subject, len(r["timestamps"]))
            results_ts[subject] = []
            for seq, frame in r["timestamps"]:
                ac.add(submit(task_reconstruct_one, spec, subject, cfg, work, seq, frame, force,
                              stage="reconstruct", subject=subject))
        elif stage == "reconstruct":
            results_ts[subject].append(r["result"])
            o.seconds["reconstruct"] = o.seconds.get("reconstruct", 0.0) + r["seconds"]
            if len(results_ts[subject]) == len(pending_ts[subject]):
                ac.add(submit(task_finish_reconstruct, subject, cfg, work, results_ts[subject],
                              stage="reconstruct-summary", subject=subject))
        elif stage == "reconstruct-summary":
            o.timestamps_kept, o.dropped = r["kept"], r["dropped"]
            ac.add(submit(task_track, spec, subject, cfg, work, force, stage="track", subject=subject,
                          resources={"GPU": 1} if gpu else None))
        elif stage == "track":
            o.seconds["track"] = r["seconds"]
            ac.add(submit(task_canonicalize_render, spec, subject, cfg, work, force, stage="render", subject=subject))
        elif stage == "render":
            o.seconds["render"] = r["seconds"]
            ac.add(submit(task_write, subject, cfg, work, store, force, stage="write", subject=subject))
        elif stage == "write":
            o.seconds["write"] = r["seconds"]
        if progress:
            progress.done(subject, stage)
    for o in outcomes.values():  # success means written, never "nothing left to schedule"
        if o.ok and "write" not in o.seconds:
            o.ok, o.failed_stage, o.reason = False, "write", "the chain stopped before writing the subject"
    return [outcomes[s] for s in subjects]
