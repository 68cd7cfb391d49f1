"""Stage outputs on disk: atomic files, provenance, and completion markers written last.

A stage writes its files into ``{work}/{subject}/{stage}/`` and, only after all of them exist, a
``_DONE.json`` marker with the figures, the configuration hash and the code version. A folder without
a valid marker is incomplete and is redone; a marker with another config hash is stale.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from .paths import PROJECT_ROOT

MARKER = "_DONE.json"


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit (and ``-dirty``) when run from a checkout."""
    from . import __version__

    try:
        rev = subprocess.run(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0 and rev.stdout.strip():
            return f"{__version__}+{rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class StageDir:
    """The output folder of one stage for one subject."""

    def __init__(self, work: str | Path, subject: str, stage: str):
        self.path = Path(work) / subject / stage
        self.stage = stage

    def file(self, name: str) -> Path:
        return self.path / name

    def begin(self) -> None:
        """Start (or restart) the stage: the old marker goes first, so a crash leaves it incomplete."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).unlink(missing_ok=True)

    def finish(self, config_hash: str, figures: dict[str, Any]) -> dict[str, Any]:
        record = {"stage": self.stage, "config_hash": config_hash, "code_version": code_version(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "figures": figures}
        atomic_write(self.path / MARKER, lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        return record

    def done(self, config_hash: str | None = None) -> dict[str, Any] | None:
        """The marker if the stage completed (with this config hash, when given), else None."""
        try:
            record = json.loads((self.path / MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if config_hash is not None and record.get("config_hash") != config_hash:
            return None
        return record
