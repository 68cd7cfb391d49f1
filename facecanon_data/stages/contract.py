"""What a stage is: the contract every stage of the chain fills in, and the context it runs in.

A stage is data: its ``name``, the upstream stages it ``reads``, the config ``sections`` its outputs
depend on, and one ``run`` that writes its files under ``{work}/{subject}/{name}/`` and returns its
figures (a JSON-able dict). A stage never writes or checks its completion marker and never decides
whether to run: :mod:`facecanon_data.orchestration.runner` does, for every stage alike, from this
declaration. A stage may fan out over independent units (``reconstruct``: one unit per timestamp);
it then declares ``units`` / ``run_units`` / ``finish`` instead of ``run``, and the runner resumes
it unit by unit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..sources.base import CaptureSource

Figures = dict[str, Any]
Unit = tuple[str, int]  # (sequence, frame): one timestamp


@dataclass
class StageContext:
    """Everything one stage run of one subject reads.

    ``open_source`` opens the capture (sources are opened where the stage runs, never shipped);
    ``inputs`` holds the marker records of the upstream stages (``inputs["reconstruct"]["figures"]``),
    filled in by the runner; ``options`` holds per-command options (``timestamps`` for reconstruct,
    ``device`` for track); ``key`` is the marker key the runner will write on success.
    """

    open_source: Callable[[], "CaptureSource"]
    subject: str
    cfg: "PipelineConfig"
    work: Path
    store: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None
    inputs: dict[str, dict] = field(default_factory=dict)
    key: str = ""

    _source: Any = field(default=None, repr=False)

    @property
    def source(self) -> "CaptureSource":
        if self._source is None:
            self._source = self.open_source()
        return self._source

    def upstream_figures(self, stage: str) -> Figures:
        return self.inputs[stage]["figures"]


@dataclass(frozen=True)
class StageOption:
    """A command-line option of one stage's subcommand (``--timestamps`` of reconstruct, ...)."""

    name: str  # key in ``StageContext.options``
    flag: str
    help: str


@dataclass(frozen=True)
class Stage:
    """One stage of the chain. Exactly one of ``run`` or the fan-out trio is set.

    Args:
        name: folder and subcommand name.
        reads: upstream stages whose outputs it reads (their marker digests enter its key).
        sections: config sections its outputs depend on.
        run: ``run(ctx) -> figures``; writes the stage's files.
        check: ``check(ctx)``: fails fast on bad input, before the previous outputs are touched (a
            plain stage's before its inputs are read; a fan-out stage's after, as it checks its units).
        units: ``units(ctx) -> [unit]`` for a fan-out stage (from its inputs or options).
        run_units: ``run_units(ctx, units) -> iterator of (unit, result)``: computes the given units
            (in order, overlapping their input decoding with the work); ``result`` is JSON-able.
        finish: ``finish(ctx, results) -> figures`` from every unit's result, in unit order.
        unit_sections: config sections a unit's outputs depend on (a unit survives changes
            elsewhere, e.g. a timestamp still selected after ``select`` changed).
        replaced_by_option: option name -> upstream stage it replaces when given
            (``reconstruct --timestamps`` instead of select's picks).
        key_extra: ``key_extra(ctx) -> str``: more that identifies the outputs (write: the store).
        still_present: ``still_present(ctx, record) -> bool``: outputs outside the work folder are
            still those of ``record`` (write: the store holds this very commit).
        resources: Dask resources its task asks for (track: ``{"GPU": 1}`` when GPUs exist).
        needs_store: the stage writes into ``ctx.store`` (its subcommand takes ``--out``).
        describe: ``describe(subject, figures) -> str``: the human summary of a run.
        options: its subcommand's extra options.
    """

    name: str
    reads: tuple[str, ...]
    sections: tuple[str, ...]
    help: str
    describe: Callable[[str, Figures], str]
    run: Callable[[StageContext], Figures] | None = None
    check: Callable[[StageContext], None] | None = None
    units: Callable[[StageContext], list[Unit]] | None = None
    run_units: Callable[[StageContext, list[Unit]], Iterator[tuple[Unit, dict]]] | None = None
    finish: Callable[[StageContext, list[dict]], Figures] | None = None
    unit_sections: tuple[str, ...] = ()
    replaced_by_option: dict[str, str] = field(default_factory=dict)
    key_extra: Callable[[StageContext], str] | None = None
    still_present: Callable[[StageContext, dict], bool] | None = None
    resources: dict[str, int] = field(default_factory=dict)
    needs_store: bool = False
    options: tuple[StageOption, ...] = ()

    def __post_init__(self):
        fan_out = (self.units, self.run_units, self.finish)
        plain = self.run is not None and all(f is None for f in fan_out)
        if not plain and not (self.run is None and all(f is not None for f in fan_out)):
            raise TypeError(f"stage {self.name}: give either run or all of units, run_units and finish")

    @property
    def fans_out(self) -> bool:
        return self.run is None


def check_chain(chain: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """A chain declared in dependency order with unique names (checked once, at import)."""
    seen: set[str] = set()
    for stage in chain:
        if stage.name in seen:
            raise TypeError(f"stage {stage.name} is declared twice")
        missing = [r for r in stage.reads if r not in seen]
        if missing:
            raise TypeError(f"stage {stage.name} reads {missing}, declared after it (or not at all)")
        seen.add(stage.name)
    return chain
