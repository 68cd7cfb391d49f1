"""What ``report`` shows of a subject's labels: thumbnails of its best, median and worst timestamps and a
per-region error plot, written as small image files beside the report (a page of hundreds of subjects
stays light: the browser fetches them lazily).

A thumbnail strip has one row per view and five tiles: the stored RGB; the fitted mesh over it (the
tracked vertices projected with the view's camera; an edge is drawn where both its vertices are in front,
within :data:`MESH_DEPTH_TOL_M` of the mesh's own depth at their pixel, so hidden parts stay hidden); depth
(turbo, near = red, scaled per tile); the canonical map coloured by canonical position on one fixed scale
for every subject (:data:`CANONICAL_RANGE_M`), so colours compare across subjects; the region map
(:data:`REGION_COLOURS`). Unlabelled pixels are dark grey; sparse labels (under 5 % of the pixels) are
grown to one thumbnail pixel each.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .regions import REGION_LABELS
from .store import open_subject

TILE_WIDTH = 112  # px per tile of a strip
VIEWS_SHOWN = 3  # views per strip: spread over the subject's cameras
CANONICAL_RANGE_M = 0.12  # canonical x, y, z in [-0.12, 0.12] m map to colour 0..255, for every subject
MESH_DEPTH_TOL_M = 0.01
UNLABELLED = (40, 40, 40)
REGION_COLOURS = {"none": (40, 40, 40), "face": (230, 180, 140), "hair": (120, 70, 30), "ears": (200, 120, 200),
                  "neck": (110, 160, 220), "body": (150, 150, 150)}  # RGB per regions.REGION_LABELS
TILES = ("RGB", "fitted mesh", "depth", "canonical", "region")
RANKED_BY = ("gt_canonical_error_mm", "cd_l1_mm")  # the first figure every timestamp has ranks them


def pick_timestamps(stamps: list[dict]) -> tuple[str | None, dict[str, int]]:
    """The figure that ranks a subject's timestamps (ground-truth canonical error where the capture has
    one, else the tracking error CD-L1) and {"best", "median", "worst"}: timestamp indexes (lower is
    better; the same index may appear twice on short subjects). (None, {}) when no figure ranks them."""
    for key in RANKED_BY:
        values = [t.get(key) for t in stamps]
        if stamps and all(v is not None and np.isfinite(float(v)) for v in values):
            order = np.argsort(np.asarray(values, float), kind="stable")
            return key, {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}
    return None, {}


def _colour_depth(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import cv2

    out = np.full(depth.shape + (3,), UNLABELLED, np.uint8)
    if mask.any():
        lo, hi = np.percentile(depth[mask], [2, 98])
        level = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
        turbo = cv2.applyColorMap((255 * (1 - level)).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
        out[mask] = turbo[mask]
    return out


def _colour_canonical(canonical: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.clip((canonical.astype(np.float32) + CANONICAL_RANGE_M) / (2 * CANONICAL_RANGE_M), 0, 1)
    out = np.full(mask.shape + (3,), UNLABELLED, np.uint8)
    out[mask] = (255 * rgb[mask]).astype(np.uint8)
    return out


def _colour_region(region: np.ndarray) -> np.ndarray:
    palette = np.array([REGION_COLOURS[name] for name in REGION_LABELS], np.uint8)
    return palette[np.minimum(region, len(palette) - 1)]


def _mesh_overlay(rgb: np.ndarray, K: np.ndarray, world_2_cam: np.ndarray, vertices: np.ndarray,
                  faces: np.ndarray) -> np.ndarray:
    """The tracked mesh's visible edges (module docstring) drawn over ``rgb`` (H, W, 3) uint8."""
    import cv2

    from .cameras import Camera
    from .meshes import cast_camera_rays, raycasting_scene

    h, w = rgb.shape[:2]
    camera = Camera("view", np.asarray(K, np.float64), np.asarray(world_2_cam, np.float64), w, h)
    surface = cast_camera_rays(raycasting_scene(vertices, faces), camera)[0]  # the mesh's own depth per pixel
    uv, z = camera.project(vertices)
    px = np.rint(uv).astype(np.int64)
    inside = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h) & (z > 0)
    at = np.where(inside[:, None], px, 0)
    front = surface[at[:, 1], at[:, 0]]
    # not behind the mesh itself (a silhouette vertex's ray may miss it: nothing is in front of it either)
    visible = inside & ((front == 0) | (z - front < MESH_DEPTH_TOL_M))
    edges = np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1), axis=0)
    edges = edges[visible[edges[:, 0]] & visible[edges[:, 1]]]
    out = (0.6 * rgb).astype(np.uint8)
    lines = np.round(uv[edges] * 4).astype(np.int32)  # 2 fractional bits: sub-pixel edges
    cv2.polylines(out, list(lines), False, (80, 255, 120), 1, cv2.LINE_AA, shift=2)
    return out


def _grow(tile: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Labelled pixels of ``tile`` grown by ``size`` px (sparse points stay visible in a thumbnail)."""
    import cv2

    if size <= 1:
        return tile
    kernel = np.ones((size, size), np.uint8)
    grown = cv2.dilate(mask.astype(np.uint8), kernel) > 0
    spread = cv2.dilate(np.where(mask[..., None], tile, 0).astype(np.uint8), kernel)
    return np.where(grown[..., None], spread, np.array(UNLABELLED, np.uint8)).astype(np.uint8)


def view_tiles(rgb: np.ndarray, depth: np.ndarray, canonical: np.ndarray, mask: np.ndarray, region: np.ndarray,
               K: np.ndarray, world_2_cam: np.ndarray, vertices: np.ndarray | None, faces: np.ndarray | None,
               tile_width: int = TILE_WIDTH) -> np.ndarray:
    """One view's row of :data:`TILES`, each ``tile_width`` wide: (h, 5 * tile_width, 3) uint8 RGB.
    rgb (H, W, 3) uint8; depth (H, W) m; canonical (H, W, 3) m; mask (H, W) bool; region (H, W) codes;
    K, world_2_cam of the stored images; vertices (Vtx, 3) world m and faces (F, 3), or None (no mesh)."""
    import cv2

    mesh = rgb if vertices is None or faces is None else _mesh_overlay(rgb, K, world_2_cam, vertices, faces)
    grow = rgb.shape[1] // tile_width if mask.mean() < 0.05 else 1  # sparse labels: one point, one thumbnail pixel
    tiles = [rgb, mesh, _grow(_colour_depth(depth, mask), mask, grow), _grow(_colour_canonical(canonical, mask), mask, grow),
             _colour_region(region)]
    h = max(1, round(rgb.shape[0] * tile_width / rgb.shape[1]))
    return np.concatenate([cv2.resize(t, (tile_width, h), interpolation=cv2.INTER_AREA) for t in tiles], 1)


def timestamp_strip(group, t: int, views: int = VIEWS_SHOWN, tile_width: int = TILE_WIDTH) -> np.ndarray:
    """Timestamp ``t`` of an open subject group: :func:`view_tiles` of ``views`` views spread over its
    cameras, one row each, (rows * h, 5 * tile_width, 3) uint8 RGB."""
    n_views = group["depth"].shape[1]
    picks = np.unique(np.linspace(0, n_views - 1, min(views, n_views)).round().astype(int))
    track = group["track"] if "track" in group else {}
    vertices = np.asarray(track["tracked_vertices"][t]) if "tracked_vertices" in track else None
    faces = np.asarray(track["faces"][:]) if "faces" in track else None
    rows = []
    for v in picks:
        arrays = {k: np.asarray(group[k][t, v]) for k in ("rgb", "depth", "canonical", "mask", "region", "K",
                                                          "world_2_cam")}
        rows.append(view_tiles(arrays["rgb"], arrays["depth"], arrays["canonical"], arrays["mask"],
                               arrays["region"], arrays["K"], arrays["world_2_cam"], vertices, faces, tile_width))
    return np.concatenate(rows, 0)


def region_error_png(by_region: dict, path: Path) -> None:
    """Bar chart of the ground-truth canonical error per region (median and p90, mm; render's
    ``gt_canonical_error_mm_by_region``) written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(by_region, key=lambda n: -by_region[n]["pixels"])
    fig, ax = plt.subplots(figsize=(3.6, 2.2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [by_region[n]["median"] for n in names], 0.4, label="median")
    ax.bar(x + 0.2, [by_region[n]["p90"] for n in names], 0.4, label="p90")
    ax.set_xticks(x, names, fontsize=7, rotation=30)
    ax.set_ylabel("canonical error (mm)", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.set_title("label error by region (against ground truth)", fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_subject_views(store: str | Path, subject: str, folder: Path) -> dict:
    """A subject's report images in ``folder``: ``{subject}_{best,median,worst}.jpg`` strips and, with
    ground truth, ``{subject}_regions.png``. Returns {"ranked_by", "strips": {kind: (file, timestamp
    index, sequence/frame, figure)}, "regions": file or None}, file names relative to ``folder``."""
    import cv2

    from .artifacts import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    group = open_subject(store, subject)
    attrs = group.attrs.asdict()
    stamps = attrs.get("timestamps", [])
    key, picks = pick_timestamps(stamps)
    if not picks and stamps:
        picks = {"first": 0}
    strips = {}
    for kind, t in picks.items():
        name = f"{subject}_{kind}.jpg"
        image = np.ascontiguousarray(timestamp_strip(group, t)[..., ::-1])  # OpenCV writes BGR
        atomic_write(folder / name, lambda p, image=image: _imwrite(cv2, p, image))
        stamp = stamps[t]
        strips[kind] = (name, t, f"{stamp.get('sequence')}/{stamp.get('frame')}",
                        None if key is None else round(float(stamp[key]), 3))
    by_region = (attrs.get("quality") or {}).get("gt_canonical_error_mm_by_region")
    regions = None
    if by_region:
        regions = f"{subject}_regions.png"
        atomic_write(folder / regions, lambda p: region_error_png(by_region, p))
    return {"ranked_by": key, "strips": strips, "regions": regions}


def _imwrite(cv2, path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 85]):
        raise OSError(f"{path}: could not write the image")
