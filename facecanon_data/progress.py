"""Progress display of ``build``: one rich bar per stage of the chain (fan-out stages count their
units, the others subjects), failures printed as they happen. The orchestration only calls the methods
of :class:`BuildProgress`; this module is the terminal side of it."""
from __future__ import annotations

from typing import Protocol


class BuildProgress(Protocol):
    def start(self, subjects: list[str], stages: dict[str, bool]) -> None: ...
    def units(self, subject: str, stage: str, count: int) -> None: ...
    def done(self, subject: str, stage: str) -> None: ...
    def failed(self, subject: str, stage: str, reason: str) -> None: ...


class RichBuildProgress:
    """A :class:`BuildProgress` drawing rich progress bars on stderr (plain log lines when not a terminal)."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.bars: dict[str, int] = {}
        self.fans_out: dict[str, bool] = {}
        self.failures = 0

    def __enter__(self) -> "RichBuildProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, subjects: list[str], stages: dict[str, bool]) -> None:
        """``stages``: stage name -> whether it fans out (its bar then counts units, added by ``units``)."""
        for stage, fans_out in stages.items():
            if stage not in self.bars:
                self.bars[stage] = self.progress.add_task(stage, total=0)
                self.fans_out[stage] = fans_out
            if not fans_out:
                self._grow(stage, len(subjects))

    def _grow(self, stage: str, count: int) -> None:
        bar = self.bars[stage]
        self.progress.update(bar, total=max(0, self.progress.tasks[bar].total + count))

    def units(self, subject: str, stage: str, count: int) -> None:
        self._grow(stage, count)

    def done(self, subject: str, stage: str) -> None:
        if stage in self.bars:
            self.progress.advance(self.bars[stage])

    def failed(self, subject: str, stage: str, reason: str) -> None:
        self.failures += 1
        self.progress.console.print(f"[red]subject {subject} failed in {stage}[/red]: {reason}")
        names = list(self.bars)
        for later in names[names.index(stage) + 1 if stage in names else 0:]:
            if not self.fans_out[later]:  # the subject's remaining stages will not run
                self._grow(later, -1)
