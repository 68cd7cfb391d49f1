"""``facecanon-data build``: the chain of every subject, scheduled by Dask (or in-process for batch jobs).

Per subject the stages of :data:`~facecanon_data.stages.chain.CHAIN` run in order, each as one task
(a fan-out stage as one task per unit that is not current, then one that finishes it; a stage that
declares resources, track's ``GPU``, asks for them when the cluster has them). Subjects run
concurrently. This module only decides what runs where and when: whether a stage runs at all is the
runner's decision (:mod:`.runner`), what it computes the stage's. No stage name appears here.

Fault isolation: a failing subject is recorded with its stage and reason, and the others go on.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import PipelineConfig
from ..stages.chain import CHAIN, STAGES
from ..stages.contract import StageContext
from . import runner

if TYPE_CHECKING:
    from ..progress import BuildProgress

log = logging.getLogger(__name__)


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
    """One subject's build: ``stages`` maps each stage that completed to "ran" or "reused"."""

    subject: str
    ok: bool = True
    failed_stage: str = ""
    reason: str = ""
    timestamps_selected: int = 0
    timestamps_kept: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    units: dict[str, dict[str, int]] = field(default_factory=dict)  # fan-out stage -> {"ran": n, "reused": n}
    keep_work: str = ""  # the work-folder policy applied after the commit ("" = not applied: failed)
    work_mb_per_timestamp: float | None = None  # what it left, per reconstructed timestamp

    def record(self, run: dict) -> None:
        """Take one finished stage's report (see :func:`_report`)."""
        self.stages[run["stage"]] = run["status"]
        if run["units"] is not None:
            self.units[run["stage"]] = run["units"]
        self.seconds[run["stage"]] = round(self.seconds.get(run["stage"], 0.0) + run["seconds"], 3)
        for name, value in run["outcome"].items():
            setattr(self, name, value)

    def fail(self, stage: str, exc: BaseException) -> None:
        self.ok, self.failed_stage, self.reason = False, stage, f"{type(exc).__name__}: {exc}"

    def prune(self, work: str, keep_work: str) -> None:
        """After the whole chain: apply the work-folder policy (never to a failed subject, whose work
        folder is what a resume and a diagnosis need)."""
        from ..stages.prune import prune_work

        if self.ok and len(self.stages) == len(CHAIN):
            result = prune_work(work, self.subject, keep_work)
            self.keep_work, self.work_mb_per_timestamp = keep_work, round(result.mb_per_timestamp, 3)


def _outcome_fields(figures: dict) -> dict:
    """What a stage's figures say about the subject's timestamps (for the build table)."""
    out = {}
    if "selection" in figures:
        out["timestamps_selected"] = len(figures["selection"])
    if "kept" in figures and "dropped" in figures:
        out["timestamps_kept"], out["dropped"] = len(figures["kept"]), dict(figures["dropped"])
    return out


def _report(run: runner.StageRun) -> dict:
    units = {"ran": run.units_ran, "reused": run.units_reused} if STAGES[run.stage].fans_out else None
    return {"stage": run.stage, "status": run.status, "seconds": run.seconds, "units": units,
            "outcome": _outcome_fields(run.figures)}


def _context(spec: "SourceSpec", subject: str, cfg: PipelineConfig, work: str, store: str) -> StageContext:
    return StageContext(open_source=spec.open, subject=subject, cfg=cfg, work=Path(work), store=Path(store))


# ---------------------------------------------------------------------------------------------
# tasks: plain functions of picklable arguments, each returning a small picklable dict


def task_stage(spec, subject: str, cfg: PipelineConfig, work: str, store: str, name: str, force: bool) -> dict:
    """A plain stage, whole; a fan-out stage's plan: reused, or the units left to compute."""
    stage = STAGES[name]
    ctx = _context(spec, subject, cfg, work, store)
    if not stage.fans_out:
        return _report(runner.run_stage(stage, ctx, force))
    t0 = time.perf_counter()
    plan = runner.plan_units(stage, ctx, force)
    if plan.reused is not None:
        return _report(runner.StageRun(name, runner.REUSED, plan.reused["figures"], time.perf_counter() - t0))
    return {"stage": name, "units": plan.units, "todo": plan.todo, "done": plan.done,
            "seconds": time.perf_counter() - t0}


def task_unit(spec, subject: str, cfg: PipelineConfig, work: str, store: str, name: str, unit) -> dict:
    t0 = time.perf_counter()
    ctx = _context(spec, subject, cfg, work, store)
    [(_, result)] = list(runner.run_units(STAGES[name], ctx, [tuple(unit)]))
    return {"unit": tuple(unit), "result": result, "seconds": time.perf_counter() - t0}


def task_finish(spec, subject: str, cfg: PipelineConfig, work: str, store: str, name: str, plan: dict,
                results: list[dict]) -> dict:
    t0 = time.perf_counter()
    ctx = _context(spec, subject, cfg, work, store)
    done = dict(plan["done"])
    done.update({r["unit"]: r["result"] for r in results})
    figures = runner.finish_fan_out(STAGES[name], ctx, plan["units"], done)
    seconds = plan["seconds"] + sum(r["seconds"] for r in results) + time.perf_counter() - t0
    return _report(runner.StageRun(name, runner.RAN, figures, seconds, len(plan["todo"]),
                                   len(plan["units"]) - len(plan["todo"])))


# ---------------------------------------------------------------------------------------------


def run_subject_inline(spec: "SourceSpec", subject: str, cfg: PipelineConfig, work: str, store: str,
                       force=(), keep_work: str = "all") -> SubjectOutcome:
    """The whole chain of one subject in this process (batch jobs: one subject per job), then the
    work-folder policy (:mod:`~facecanon_data.stages.prune`)."""
    from ..artifacts import subject_lock

    out = SubjectOutcome(subject)
    ctx = _context(spec, subject, cfg, work, store)
    wait = lambda path: log.info("subject %s is being built by another process; waiting for it (%s)", subject, path)
    with subject_lock(work, subject, on_wait=wait):
        for stage in CHAIN:
            try:
                out.record(_report(runner.run_stage(stage, ctx, stage.name in force)))
            except Exception as exc:  # noqa: BLE001 - fault isolation: record and go on
                out.fail(stage.name, exc)
                log.debug("subject %s failed in %s:\n%s", subject, stage.name, traceback.format_exc())
                break
        out.prune(work, keep_work)
    return out


def run_build_dask(client, spec: "SourceSpec", subjects: list[str], cfg: PipelineConfig, work: str, store: str,
                   force=(), gpu: bool = False, progress: "BuildProgress | None" = None,
                   keep_work: str = "all") -> list[SubjectOutcome]:
    """Schedule all subjects on a Dask client: each subject walks the chain, a fan-out stage's units
    run as separate tasks once its plan is known; a subject's work folder is pruned (``keep_work``) as
    soon as its last stage completes, so a large build's disk holds few subjects' intermediates."""
    from distributed import as_completed

    outcomes = {s: SubjectOutcome(s) for s in subjects}
    meta: dict = {}
    plans: dict[tuple[str, str], dict] = {}
    unit_results: dict[tuple[str, str], list] = {}

    def submit(fn, subject: str, name: str, *args):
        resources = STAGES[name].resources if gpu and fn is not task_finish else None
        fut = client.submit(fn, spec, subject, cfg, work, store, name, *args, pure=False, resources=resources or None,
                            key=f"{name}-{subject}-{time.time_ns()}")
        meta[fut.key] = (subject, name)
        return fut

    def start(subject: str, index: int):
        name = CHAIN[index].name
        return submit(task_stage, subject, name, name in force)

    if progress:
        progress.start(subjects, {s.name: s.fans_out for s in CHAIN})
    ac = as_completed([start(s, 0) for s in subjects], with_results=False)
    for fut in ac:
        subject, name = meta[fut.key]
        o = outcomes[subject]
        if not o.ok:
            continue
        if fut.status == "error":
            o.fail(name, fut.exception())
            if progress:
                progress.failed(subject, name, o.reason)
            continue
        r = fut.result()
        if "todo" in r:  # a fan-out stage's plan: its units first
            plans[subject, name], unit_results[subject, name] = r, []
            if progress:
                progress.units(subject, name, len(r["units"]))
                for _ in r["done"]:
                    progress.done(subject, name)
            for unit in r["todo"]:
                ac.add(submit(task_unit, subject, name, unit))
            if not r["todo"]:
                ac.add(submit(task_finish, subject, name, r, []))
            continue
        if "unit" in r:
            unit_results[subject, name].append(r)
            if progress:
                progress.done(subject, name)
            if len(unit_results[subject, name]) == len(plans[subject, name]["todo"]):
                ac.add(submit(task_finish, subject, name, plans[subject, name], unit_results[subject, name]))
            continue
        o.record(r)
        if progress and not STAGES[name].fans_out:
            progress.done(subject, name)
        index = [s.name for s in CHAIN].index(name)
        if index + 1 < len(CHAIN):
            ac.add(start(subject, index + 1))
        else:
            o.prune(work, keep_work)  # file deletions on the shared work folder, in this process
    for o in outcomes.values():  # success means every stage completed, never "nothing left to schedule"
        if o.ok and len(o.stages) != len(CHAIN):
            o.ok, o.failed_stage, o.reason = False, CHAIN[-1].name, "the chain stopped before its last stage"
    return [outcomes[s] for s in subjects]
