"""Locations the project resolves relative paths against."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def expand(path: str | Path) -> Path:
    """Expand ``{project}`` (the repository root) and ``~``; other relative paths stay relative to the CWD."""
    return Path(os.path.expanduser(str(path).replace("{project}", str(PROJECT_ROOT))))


def default_pipeline() -> Path:
    return PROJECT_ROOT / "pipelines" / "synthetic.toml"
