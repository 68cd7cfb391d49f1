"""The one runner: decides whether a stage runs, runs it, and marks it finished.

A stage's marker key is the hash of (its name, its config sections, the digests of the upstream
markers it consumed, and its ``key_extra``). A marker digest changes whenever that stage reruns, so
any upstream change, and any ``--force S``, reruns S and exactly the stages that depend on it; a
stage whose key matches its marker is reused. Markers are written last (a crash leaves the stage
incomplete, and it is redone); a rerun first removes the previous outputs of a plain stage, so
outputs of timestamps that are no longer selected are never read.

Fan-out stages (reconstruct) resume per unit: a unit's marker key is its ``unit_sections`` hash
only, so a timestamp still selected after ``select`` changed is reused, and a new one computed.

No Dask here: :mod:`.build` calls these functions inside its tasks, the stage subcommands and the
batch mode call them in-process.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import StageDir, atomic_write, read_marker
from ..errors import InputFileNotFound
from ..stages.contract import Figures, Stage, StageContext, Unit

RAN, REUSED = "ran", "reused"


@dataclass
class StageRun:
    """What happened to one stage of one subject."""

    stage: str
    status: str  # "ran" | "reused"
    figures: Figures
    seconds: float
    units_ran: int = 0
    units_reused: int = 0


# Part of every marker key: bump it when what a stage writes or reports changes shape, so that work
# folders written by an older version are redone rather than misread.
MARKER_FORMAT = 2


def _hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def gather_inputs(stage: Stage, ctx: StageContext) -> dict[str, str]:
    """Fill ``ctx.inputs`` with the upstream markers and return their digests (upstream -> digest).
    An upstream replaced by a given option (``--timestamps``) enters as the option's value instead."""
    digests = {}
    replaced = {up: opt for opt, up in stage.replaced_by_option.items() if ctx.options.get(opt) is not None}
    for up in stage.reads:
        if up in replaced:
            digests[up] = "option:" + _hash({replaced[up]: ctx.options[replaced[up]]})
            continue
        marker = StageDir(ctx.work, ctx.subject, up)
        record = marker.done()
        if record is None:
            raise InputFileNotFound(f"{marker.path}: stage {up} has not completed for subject {ctx.subject} "
                                    f"(stage {stage.name} reads it)")
        ctx.inputs[up] = record
        digests[up] = marker.digest()
    return digests


def stage_key(stage: Stage, ctx: StageContext, digests: dict[str, str]) -> str:
    return _hash({"stage": stage.name, "config": ctx.cfg.section_hash(*stage.sections), "upstream": digests,
                  "extra": stage.key_extra(ctx) if stage.key_extra else "", "format": MARKER_FORMAT})


def reusable(stage: Stage, ctx: StageContext) -> dict | None:
    """The stage's marker record if its outputs are current for ``ctx`` (call after ``prepare``)."""
    record = StageDir(ctx.work, ctx.subject, stage.name).done(ctx.key)
    if record is not None and stage.still_present is not None and not stage.still_present(ctx, record):
        return None
    return record


def prepare(stage: Stage, ctx: StageContext) -> dict[str, str]:
    """Read the upstream markers into ``ctx`` and set ``ctx.key``; returns the upstream digests."""
    digests = gather_inputs(stage, ctx)
    ctx.key = stage_key(stage, ctx, digests)
    return digests


def run_stage(stage: Stage, ctx: StageContext, force: bool = False) -> StageRun:
    """Run one stage of one subject in this process, unless its outputs are current."""
    t0 = time.perf_counter()
    if stage.fans_out:
        plan = plan_units(stage, ctx, force)
        if plan.reused is not None:
            return StageRun(stage.name, REUSED, plan.reused["figures"], time.perf_counter() - t0)
        plan.done.update(run_units(stage, ctx, plan.todo))
        figures = finish_units(stage, ctx, plan.units, plan.done, plan.digests)
        return StageRun(stage.name, RAN, figures, time.perf_counter() - t0, len(plan.todo),
                        len(plan.units) - len(plan.todo))
    if stage.check:
        stage.check(ctx)  # a bad setting fails first, with the previous outputs untouched
    digests = prepare(stage, ctx)
    record = None if force else reusable(stage, ctx)
    if record is not None:
        return StageRun(stage.name, REUSED, record["figures"], time.perf_counter() - t0)
    out = StageDir(ctx.work, ctx.subject, stage.name)
    out.begin(clear=True)
    figures = stage.run(ctx)
    out.finish(ctx.key, figures, digests)
    return StageRun(stage.name, RAN, figures, time.perf_counter() - t0)


# -- fan-out stages ----------------------------------------------------------------------------


def unit_dir(stage: Stage, ctx: StageContext, unit: Unit) -> Path:
    sequence, frame = unit
    return Path(ctx.work) / ctx.subject / stage.name / sequence / f"{frame:06d}"


def _unit_key(stage: Stage, ctx: StageContext) -> str:
    return _hash({"config": ctx.cfg.section_hash(*stage.unit_sections), "format": MARKER_FORMAT})


@dataclass
class UnitPlan:
    """A fan-out stage's plan: ``reused`` (its marker record) when the whole stage is current, else
    its ``units``, those ``todo``, and the results of those ``done`` (current unit markers)."""

    reused: dict | None
    digests: dict[str, str] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    todo: list[Unit] = field(default_factory=list)
    done: dict = field(default_factory=dict)


def plan_units(stage: Stage, ctx: StageContext, force: bool = False) -> UnitPlan:
    """Prepare a fan-out stage (inputs, key), then: reused whole, or which units to compute."""
    digests = prepare(stage, ctx)
    record = None if force else reusable(stage, ctx)
    if record is not None:
        return UnitPlan(record, digests)
    if stage.check:
        stage.check(ctx)  # bad input fails here (its units come from the inputs), outputs untouched
    units = stage.units(ctx)
    todo, done = split_units(stage, ctx, units, force)
    return UnitPlan(None, digests, units, todo, done)


def finish_fan_out(stage: Stage, ctx: StageContext, units: list[Unit], results: dict) -> Figures:
    """Finish a fan-out stage whose units ran elsewhere (the Dask path): prepare, then finish."""
    digests = prepare(stage, ctx)
    return finish_units(stage, ctx, units, results, digests)


def split_units(stage: Stage, ctx: StageContext, units: list[Unit], force: bool) -> tuple[list[Unit], dict]:
    """(units to compute, {unit: result} of the units whose outputs are current)."""
    key = _unit_key(stage, ctx)
    todo, done = [], {}
    for unit in units:
        record = None if force else read_marker(unit_dir(stage, ctx, unit) / "_DONE.json", key)
        if record is None:
            todo.append(unit)
        else:
            done[unit] = record["result"]
    return todo, done


def run_units(stage: Stage, ctx: StageContext, units: list[Unit]):
    """Compute ``units``, marking each finished as its result arrives: yields (unit, result)."""
    key = _unit_key(stage, ctx)
    for unit, result in stage.run_units(ctx, units):
        record = {"key": key, "result": result}
        atomic_write(unit_dir(stage, ctx, unit) / "_DONE.json",
                     lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        yield unit, result


def finish_units(stage: Stage, ctx: StageContext, units: list[Unit], results: dict, digests: dict[str, str]) -> Figures:
    """The stage's figures and marker, from every unit's result (in the order of ``units``)."""
    out = StageDir(ctx.work, ctx.subject, stage.name)
    out.begin()
    figures = stage.finish(ctx, [results[u] for u in units])
    out.finish(ctx.key, figures, digests)
    return figures
