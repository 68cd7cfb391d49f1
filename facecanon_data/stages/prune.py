"""The work folder after a subject is committed: ``build --keep-work none | light | all``.

``light`` (the default) keeps what resuming and re-running a stage need and drops what the store now
holds or the capture can give again, per timestamp:

- ``reconstruct``: the views' PNGs (``images/``; :func:`~.reconstruct.view_images` decodes them again
  from the capture when a stage is re-run) and COLMAP's workspace (``colmap/``: database, sparse model,
  dense intermediates); the foreground masks are packed into one ``masks.npz`` (bit-packed, compressed;
  ``render`` reads either form); points, observers, cameras, depth and the marker stay.
- ``render``: ``maps.npz`` (its maps are in the store); ``quality.json`` stays. ``render`` declares its maps
  as outputs that must still be present (``still_present``), so a later ``write`` that needs them (the
  store lost the subject, or a new store) re-renders first.

``none`` removes the subject's work folder (a re-run starts over); ``all`` keeps everything.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEEP_WORK = ("none", "light", "all")
RECONSTRUCT_KEEP = {"_DONE.json", "cameras.json", "depth.npz", "observers.npz", "points.ply", "views.json", "masks.npz"}


@dataclass
class PruneResult:
    policy: str
    timestamps: int
    bytes_before: int
    bytes_after: int

    @property
    def mb_per_timestamp(self) -> float:
        return self.bytes_after / max(self.timestamps, 1) / 1e6


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def pack_masks(folder: Path) -> None:
    """A timestamp's ``masks/`` PNGs -> one ``masks.npz`` (per serial the bit-packed mask and its shape,
    what :func:`~.reconstruct.read_view_masks` reads); then the PNGs go."""
    from ..artifacts import atomic_write
    from .reconstruct import read_view_masks

    masks = read_view_masks(folder)
    if masks is None:
        return  # unreadable: leave the folder as it is
    arrays = {}
    for serial, m in masks.items():
        arrays[f"bits_{serial}"], arrays[f"shape_{serial}"] = np.packbits(m), np.array(m.shape)
    atomic_write(folder / "masks.npz", lambda path: np.savez_compressed(path, **arrays))
    shutil.rmtree(folder / "masks")


def prune_work(work, subject: str, policy: str) -> PruneResult:
    """Apply ``policy`` to ``{work}/{subject}`` (see module docstring); call only after the subject's
    ``write`` committed it."""
    if policy not in KEEP_WORK:
        raise ValueError(f"keep-work must be one of {', '.join(KEEP_WORK)}, got {policy!r}")
    root = Path(work) / subject
    before = folder_bytes(root) if root.is_dir() else 0
    stamps = [p.parent for p in (root / "reconstruct").glob("*/*/_DONE.json")]
    if policy == "none":
        shutil.rmtree(root, ignore_errors=True)
    elif policy == "light":
        for folder in stamps:
            if (folder / "masks").is_dir():
                pack_masks(folder)
            for p in folder.iterdir():
                if p.name not in RECONSTRUCT_KEEP:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        for maps in (root / "render").glob("*/*/maps.npz"):
            maps.unlink()
    after = folder_bytes(root) if root.is_dir() else 0
    return PruneResult(policy, len(stamps), before, after)
