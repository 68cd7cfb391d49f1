"""Small in-memory subjects for store, loader and trainer tests (no pipeline run needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from facecanon_data.store import SubjectData
from facecanon_data.synthetic.rig import nersemble_like_rig


def fake_subject(pid: str, t: int = 3, views: int = 6, h: int = 60, w: int = 40, seed: int = 0,
                 frames: list[int] | None = None) -> SubjectData:
    """A small but consistent subject: real rig cameras scaled to (h, w), random labels; timestamps at
    ``frames`` of EXP-1-head (default 0, 10, 20, ...)."""
    frames = frames if frames is not None else [10 * i for i in range(t)]
    t = len(frames)
    rng = np.random.default_rng(seed)
    cams = [c.scaled(832 / w) for c in nersemble_like_rig(832, 1216, 2900.0)][:views]
    k = np.stack([[c.K for c in cams]] * t)
    w2c = np.stack([[c.world_2_cam for c in cams]] * t)
    depth = rng.uniform(0.9, 1.1, (t, views, h, w)).astype(np.float32)
    mask = rng.random((t, views, h, w)) > 0.5
    depth[~mask] = 0
    return SubjectData(
        subject=pid, serials=[c.serial for c in cams],
        timestamps=[{"sequence": "EXP-1-head", "frame": f, "reason": "expression", "cd_l1_mm": 0.8,
                     "landmark_px": 3.0, "views": {c.serial: {"valid_fraction": 0.5} for c in cams}} for f in frames],
        rgb=rng.integers(0, 256, (t, views, h, w, 3), dtype=np.uint8), depth=depth,
        canonical=rng.normal(0, 0.05, (t, views, h, w, 3)).astype(np.float16), mask=mask,
        region=np.where(mask, rng.integers(1, 6, mask.shape), 0).astype(np.uint8),
        confidence=np.where(mask, rng.integers(1, 256, mask.shape), 0).astype(np.uint8), K=k, world_2_cam=w2c,
        track={"shape": np.zeros(10, np.float32)}, points_xyz=[rng.normal(size=(5 + i, 3)) for i in range(t)],
        points_canonical=[rng.normal(size=(5 + i, 3)) for i in range(t)], provenance={"source": "test"})


def small_pipeline(path: Path, capture_root, top: str = "", capture: str = "", extra: str = "",
                   num_expression: int = 2, reconstruct: str = 'dense = "none"') -> Path:
    """A pipeline TOML for fast CLI tests: the synthetic head, 2 + 1 timestamps, short tracking, sparse
    points (the torch MVS has tests of its own). ``top`` goes before the first table, ``capture`` into
    ``[capture]``, ``reconstruct`` into ``[reconstruct]``, ``extra`` after everything."""
    path.write_text(f"""{top}
[capture]
root = "{capture_root}"
downscale = 2
{capture}
[reconstruct]
{reconstruct}
[flame]
kind = "synthetic"
[select]
num_expression = {num_expression}
num_pose = 1
[track]
iterations = [40, 40, 60, 60]
{extra}""")
    return path


def build_pipeline(tmp_path: Path, cap, threads: int = 1, name: str = "p.toml", num_expression: int = 2) -> Path:
    """:func:`small_pipeline` named "test" with ``threads`` threads per stage, written to tmp_path / name."""
    return small_pipeline(tmp_path / name, cap, top=f'name = "test"\nthreads = {threads}',
                          num_expression=num_expression)


def build_cmd(manifest, pipeline, cap, out) -> list[str]:
    """`facecanon-data build` of a manifest into out / store, out / work, one local worker."""
    import sys

    exe = Path(sys.executable).parent / "facecanon-data"
    return [str(exe), "build", "--subjects", str(manifest), "--pipeline", str(pipeline), "--root", str(cap),
            "--out", str(out / "store"), "--work", str(out / "work"), "--workers", "1"]
