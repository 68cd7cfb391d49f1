"""Stage outputs on disk: atomic files, provenance, and completion markers written last.

A stage writes its files into ``{work}/{subject}/{stage}/`` and, only after all of them exist, a
``_DONE.json`` marker with the figures, its key and the code version. A folder without a valid marker
is incomplete and is redone; a marker with another key is stale. Which key a stage must carry is the
runner's business (:mod:`facecanon_data.orchestration.runner`); this module only stores it.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
import shutil
import subprocess
import time
import uuid
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


@contextmanager
def subject_lock(work: str | Path, subject: str, on_wait: Callable[[Path], None] | None = None):
    """Hold ``{work}/.locks/{subject}.lock`` (flock) while a process runs a subject's chain: a second run
    of the same subject on the same work folder waits (``on_wait`` is told once) and then finds the
    first one's outputs current, instead of one run's clean-up deleting files the other is reading.
    The lock lives outside the subject's folder, which ``--keep-work none`` removes."""
    import fcntl

    path = Path(work) / ".locks" / f"{subject}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class StageDir:
    """The output folder of one stage for one subject."""

    def __init__(self, work: str | Path, subject: str, stage: str):
        self.path = Path(work) / subject / stage
        self.stage = stage

    def file(self, name: str) -> Path:
        return self.path / name

    def begin(self, clear: bool = False) -> None:
        """Start (or restart) the stage: the old marker goes first, so a crash leaves it incomplete.
        ``clear`` also removes everything the previous run wrote (outputs of timestamps no longer
        selected must not survive a rerun)."""
        if clear:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).unlink(missing_ok=True)

    def finish(self, key: str, figures: dict[str, Any], upstream: dict[str, str] | None = None) -> dict[str, Any]:
        """Write the marker, last: ``key`` identifies what produced the outputs, ``upstream`` the digests
        of the upstream markers they were made from."""
        record = {"stage": self.stage, "key": key, "upstream": upstream or {}, "code_version": code_version(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": uuid.uuid4().hex,
                  "figures": figures}
        atomic_write(self.path / MARKER, lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        return record

    def done(self, key: str | None = None) -> dict[str, Any] | None:
        """The marker if the stage completed (with this key, when given), else None."""
        return read_marker(self.path / MARKER, key)

    def digest(self) -> str | None:
        """Content hash of the marker (key, figures, a random run id): it changes whenever the stage
        reruns, so downstream keys that include it follow every rerun."""
        try:
            return hashlib.sha256((self.path / MARKER).read_bytes()).hexdigest()[:16]
        except OSError:
            return None


def read_marker(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """A marker's record if it exists, parses and (when ``key`` is given) carries that key."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or (key is not None and record.get("key") != key):
        return None
    return record
