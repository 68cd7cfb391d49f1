"""Progress display of ``build``: one rich bar per stage (reconstruct and render count timestamps, the
others subjects), failures printed as they happen. The orchestration only calls the methods of
:class:`BuildProgress`; this module is the terminal side of it."""
from __future__ import annotations

from typing import Protocol

STAGE_BARS = ("select", "reconstruct", "track", "render", "write")


class BuildProgress(Protocol):
    def start(self, subjects: list[str]) -> None: ...
    def timestamps(self, subject: str, count: int) -> None: ...
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
        self.failures = 0

    def __enter__(self) -> "RichBuildProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, subjects: list[str]) -> None:
        for stage in STAGE_BARS:
            if stage not in self.bars:
                self.bars[stage] = self.progress.add_task(stage, total=0)
            # the reconstruct total counts timestamps: it grows as select reports each subject's picks
            if stage != "reconstruct":
                self.progress.update(self.bars[stage], total=self.progress.tasks[self.bars[stage]].total + len(subjects))

    def timestamps(self, subject: str, count: int) -> None:
        bar = self.bars["reconstruct"]
        self.progress.update(bar, total=self.progress.tasks[bar].total + count)

    def done(self, subject: str, stage: str) -> None:
        if stage in self.bars:
            self.progress.advance(self.bars[stage])

    def failed(self, subject: str, stage: str, reason: str) -> None:
        self.failures += 1
        stage = "reconstruct" if stage.startswith("reconstruct") else stage
        self.progress.console.print(f"[red]subject {subject} failed in {stage}[/red]: {reason}")
        for later in STAGE_BARS[STAGE_BARS.index(stage) + 1 if stage in STAGE_BARS else 0:]:
            if later != "reconstruct":  # the subject's remaining stages will not run
                bar = self.bars[later]
                self.progress.update(bar, total=max(0, self.progress.tasks[bar].total - 1))
