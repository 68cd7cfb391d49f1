"""Stage ``canonicalize``: carry every reconstructed point into FLAME's canonical space.

Each point takes the deformation of its nearest point on the tracked FLAME surface: the exact closest
point (open3d, triangle + barycentrics) on the posed mesh, where the per-vertex deformation
``canonical - posed`` is interpolated barycentrically and added to the point. A point on the surface
thus lands exactly on the canonical surface; a point off it keeps its offset (unrotated, as in the
paper's recipe). Points farther than ``max_distance_mm`` from the surface are flagged ``far`` and
kept or dropped by config; the figures count the kept points per FLAME region (vertex masks).

Outputs in ``{work}/{subject}/canonicalize/{sequence}/{frame:06d}/points.npz``: ``canonical`` (N, 3)
float32 m and ``keep`` (N,) bool, the two arrays ``render`` and ``write`` read (the per-point
distances, triangles and regions are figures here, not outputs: nothing downstream reads them).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import StageDir, atomic_write
from ..config import PipelineConfig
from ..meshes import barycentric_interpolate, closest_points
from ..threads import apply_thread_cap
from .reconstruct import read_points, timestamp_dir

log = logging.getLogger(__name__)
STAGE = "canonicalize"
# Region ids, in priority order when masks overlap (the first listed wins); 0 = no mask. Names are
# FLAME_masks.pkl keys or unions of them (flame.assets.MASK_UNIONS: eyeballs, ears).
REGIONS = ("other", "eyeballs", "lips", "nose", "eye_region", "forehead", "face", "ears", "neck", "scalp")


def vertex_regions(assets) -> tuple[np.ndarray, list[str]]:
    """(V,) uint8 region id per vertex from the model's masks (higher priority overrides), and the
    regions the masks file cannot label (left as "other"; reported, never silently)."""
    from ..flame.assets import AssetError

    out = np.zeros(assets.model.num_vertices, np.uint8)
    unlabelled = []
    for rid in range(len(REGIONS) - 1, 0, -1):  # lowest priority first, so the first listed wins
        try:
            out[assets.mask(REGIONS[rid])] = rid
        except AssetError:
            unlabelled.append(REGIONS[rid])
    return out, sorted(unlabelled)


@dataclass
class Transfer:
    """Result for N points: canonical (N, 3) m, distance_mm (N,), triangle (N,), bary (N, 3)."""

    canonical: np.ndarray
    distance_mm: np.ndarray
    triangle: np.ndarray
    bary: np.ndarray


def transfer_to_canonical(points: np.ndarray, posed: np.ndarray, canonical: np.ndarray,
                          faces: np.ndarray) -> Transfer:
    """Move (N, 3) points by the deformation of their closest point on the posed mesh.

    posed, canonical: (V, 3) vertices of the same mesh in the tracked pose and in canonical space.
    """
    closest, tri, bary = closest_points(posed, faces, points)
    deform = (canonical - posed).astype(np.float32)  # (V, 3) per-vertex deformation
    moved = points.astype(np.float32) + barycentric_interpolate(deform, faces, tri, bary)
    dist = np.linalg.norm(closest - points, axis=1) * 1000.0
    return Transfer(canonical=moved, distance_mm=dist.astype(np.float32), triangle=tri, bary=bary)


@dataclass
class CanonicalizeResult:
    subject: str
    timestamps: int
    points_total: int
    points_far: int
    far_policy: str
    distance_mm_median: float
    seconds: float
    regions: dict[str, int] = field(default_factory=dict)  # kept points per region
    regions_unlabelled: list[str] = field(default_factory=list)  # regions the masks file has no mask for


def canonical_dir(work, subject: str, sequence: str, frame: int) -> Path:
    return Path(work) / subject / STAGE / sequence / f"{frame:06d}"


def run_canonicalize(source, subject: str, cfg: PipelineConfig, work) -> CanonicalizeResult:
    """Canonicalize the points of every tracked timestamp of a subject."""
    from ..flame.assets import load_assets

    ccfg = cfg.canonicalize
    apply_thread_cap(cfg.threads)
    track = StageDir(work, subject, "track")
    assets = load_assets(cfg.flame)
    region_of_vertex, unlabelled = vertex_regions(assets)
    if unlabelled:
        log.warning("%s: no mask for region(s) %s; their points count as 'other'",
                    assets.masks_source or "flame.masks (not set)", ", ".join(unlabelled))
    t0 = time.perf_counter()
    with np.load(track.file("vertices.npz")) as z:
        keys, tracked, canonical, faces = list(z["keys"]), z["tracked"], z["canonical"], z["faces"]
    total = far = 0
    dists, counts = [], np.zeros(len(REGIONS), np.int64)
    for i, key in enumerate(keys):
        seq, frame = str(key).rsplit("/", 1)
        pts = read_points(timestamp_dir(work, subject, seq, int(frame)) / "points.ply")["positions"]
        tr = transfer_to_canonical(pts, tracked[i], canonical, faces)
        nearest_vertex = faces[tr.triangle, np.argmax(tr.bary, 1)]
        region = region_of_vertex[nearest_vertex]
        is_far = tr.distance_mm > ccfg.max_distance_mm
        keep = ~is_far if ccfg.far_points == "drop" else np.ones(len(pts), bool)
        folder = canonical_dir(work, subject, seq, int(frame))
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "points.npz", lambda p: np.savez(p, canonical=tr.canonical, keep=keep))
        total += len(pts)
        far += int(is_far.sum())
        dists.append(tr.distance_mm)
        counts += np.bincount(region[keep], minlength=len(REGIONS))
    result = CanonicalizeResult(
        subject=subject, timestamps=len(keys), points_total=total, points_far=far, far_policy=ccfg.far_points,
        distance_mm_median=round(float(np.median(np.concatenate(dists))), 4) if dists else 0.0,
        seconds=round(time.perf_counter() - t0, 2),
        regions={REGIONS[r]: int(c) for r, c in enumerate(counts) if c}, regions_unlabelled=unlabelled)
    return result
