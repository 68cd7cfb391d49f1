"""Stage ``canonicalize``: carry every reconstructed point into FLAME's canonical space.

Each point takes the deformation of its nearest point on the tracked FLAME surface: the exact closest
point (open3d, triangle + barycentrics) on the posed mesh, where the per-vertex deformation
``canonical - posed`` is interpolated barycentrically and added to the point. A point on the surface
thus lands exactly on the canonical surface; a point off it keeps its offset (unrotated, as in the
paper's recipe). Points farther than ``max_distance_mm`` from the surface are flagged ``far`` and
kept or dropped by config. Head versus torso: a point whose nearest surface point is in
``body_masks`` (the neck, where clothing meets the head model) and farther than
``body_max_distance_mm`` is body (collar, shoulders) and never labelled (``keep`` false). The figures
count the kept points per FLAME region (vertex masks) and the points dropped as body.

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
from ..config import TRANSFER_MODES, PipelineConfig
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
    """Result for N points: canonical (N, 3) m under the requested mode, distance_mm (N,) to the posed
    surface, triangle (N,), bary (N, 3), and ``by_mode``: the canonical points under every mode in
    :data:`TRANSFER_MODES` (one closest-point query serves all; the measurement compares them)."""

    canonical: np.ndarray
    distance_mm: np.ndarray
    triangle: np.ndarray
    bary: np.ndarray
    by_mode: dict[str, np.ndarray] = field(default_factory=dict)


def triangle_frames(vertices: np.ndarray, faces: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(N, 3, 3) orthonormal frames of ``triangles`` (columns: first edge, in-plane normal to it, face
    normal) on mesh ``vertices`` (V, 3)."""
    v = vertices[faces[triangles]].astype(np.float64)  # (N, 3 corners, 3)
    e1 = v[:, 1] - v[:, 0]
    n = np.cross(e1, v[:, 2] - v[:, 0])
    e1 /= np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return np.stack([e1, np.cross(n, e1), n], axis=2)


def transfer_to_canonical(points: np.ndarray, posed: np.ndarray, canonical: np.ndarray,
                          faces: np.ndarray, mode: str = "translate") -> Transfer:
    """Move (N, 3) points into canonical space through their closest point on the posed mesh.

    The closest surface point goes to its canonical position (barycentric in the triangle); the point's
    offset from it (zero on the surface) is carried as is (``translate``) or rotated with the triangle
    from its posed to its canonical orientation (``local_frame``), so that a point off the surface (hair,
    a mismatch of the fit) follows the head's rotation.
    posed, canonical: (V, 3) vertices of the same mesh in the tracked pose and in canonical space.
    """
    if mode not in TRANSFER_MODES:
        raise ValueError(f"transfer mode {mode!r} (expected one of {', '.join(TRANSFER_MODES)})")
    closest, tri, bary = closest_points(posed, faces, points)
    on_canonical = barycentric_interpolate(canonical.astype(np.float32), faces, tri, bary)
    offset = points.astype(np.float64) - closest
    rotation = triangle_frames(canonical, faces, tri) @ triangle_frames(posed, faces, tri).transpose(0, 2, 1)
    by_mode = {"translate": (on_canonical + offset).astype(np.float32),
               "local_frame": (on_canonical + np.einsum("nij,nj->ni", rotation, offset)).astype(np.float32)}
    dist = np.linalg.norm(offset, axis=1) * 1000.0
    return Transfer(canonical=by_mode[mode], distance_mm=dist.astype(np.float32), triangle=tri, bary=bary,
                    by_mode=by_mode)


@dataclass
class CanonicalizeResult:
    subject: str
    timestamps: int
    points_total: int
    points_far: int
    far_policy: str
    distance_mm_median: float
    seconds: float
    points_body: int = 0  # dropped as torso / clothing (canonicalize.body_masks)
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
    total = far = body = 0
    body_vertices = np.unique(np.concatenate([assets.mask(name) for name in ccfg.body_masks])) \
        if ccfg.body_masks else np.zeros(0, np.int64)
    dists, counts = [], np.zeros(len(REGIONS), np.int64)
    for i, key in enumerate(keys):
        seq, frame = str(key).rsplit("/", 1)
        pts = read_points(timestamp_dir(work, subject, seq, int(frame)) / "points.ply")["positions"]
        tr = transfer_to_canonical(pts, tracked[i], canonical, faces, ccfg.transfer)
        nearest_vertex = faces[tr.triangle, np.argmax(tr.bary, 1)]
        region = region_of_vertex[nearest_vertex]
        is_far = tr.distance_mm > ccfg.max_distance_mm
        is_body = np.isin(nearest_vertex, body_vertices) & (tr.distance_mm > ccfg.body_max_distance_mm)
        keep = (~is_far if ccfg.far_points == "drop" else np.ones(len(pts), bool)) & ~is_body
        folder = canonical_dir(work, subject, seq, int(frame))
        folder.mkdir(parents=True, exist_ok=True)
        # canonical: the configured transfer; the others and the distances let render measure them all
        atomic_write(folder / "points.npz", lambda p: np.savez(
            p, canonical=tr.canonical, keep=keep, distance_mm=tr.distance_mm,
            **{f"canonical_{m}": c for m, c in tr.by_mode.items()}))
        total += len(pts)
        far += int(is_far.sum())
        body += int(is_body.sum())
        dists.append(tr.distance_mm)
        counts += np.bincount(region[keep], minlength=len(REGIONS))
    result = CanonicalizeResult(
        subject=subject, timestamps=len(keys), points_total=total, points_far=far, far_policy=ccfg.far_points,
        points_body=body,
        distance_mm_median=round(float(np.median(np.concatenate(dists))), 4) if dists else 0.0,
        seconds=round(time.perf_counter() - t0, 2),
        regions={REGIONS[r]: int(c) for r, c in enumerate(counts) if c}, regions_unlabelled=unlabelled)
    return result
