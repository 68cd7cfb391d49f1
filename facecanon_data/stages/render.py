"""Stage ``render``: per-view depth, canonical and validity maps, with label-quality figures.

Per timestamp and view: the canonicalized points that the view observed (``reconstruct``'s observer
table) are splatted with a z-buffer in torch (``scatter_reduce(..., "amin")`` on CPU or GPU); the depth
of the nearest point and its canonical coordinate fill the pixel. On a dense reconstruction (COLMAP's
PatchMatch or the torch MVS) the depth is the backend's filtered depth map and the canonical map is kept
where the splatted point agrees with it. With ``render.canonical_from = "tracked_surface_near"`` (the default)
a labelled pixel whose point lies within ``canonical_from_near_mm`` of the tracked mesh takes instead the
mesh's canonical point where the pixel's ray meets it (no reconstruction noise; the measurement behind it
is ``label_epe["error_sources"]``). The tracked FLAME mesh is ray-cast per view for its foreground (the ``valid_fraction`` base)
and, with ``reconstruct``'s foreground masks, for the per-pixel region map (:mod:`facecanon_data.regions`:
face, hair, ears, neck, body; face + hair is the evaluation region, the stand-in for Facer masks).

Storage: depth float32 metres (0 = no data); canonical maps in ``render.canonical_dtype`` (default
float16: |x| < 0.25 m in FLAME space, so the spacing is at most 2^-13 m and the rounding error at most
0.06 mm; the measured maximum is reported per run as ``canonical_storage_error_mm``); mask bool.

Label quality per timestamp: ``valid_fraction`` (valid pixels / foreground pixels of the tracked mesh),
``cross_view_canonical_mm`` (median distance between canonical coordinates of pixels of two views that
see the same surface point: depth-consistent reprojection into the other view's 3x3 neighbourhood,
pairs of *different* reconstructed points only, since a point shared by both views agrees trivially),
and with ground truth ``gt_canonical_error_mm`` (median, p90), ``gt_depth_absrel`` (median),
``gt_head_valid_fraction`` (valid pixels / the ground truth's head pixels, hair included) and
``gt_canonical_error_mm_by_transfer``: the median error of each ``canonicalize.transfer`` mode over pixels
whose point lies within ``NEAR_MM`` of the tracked surface and beyond (same pixels, same z-buffer), and
``region_iou_face_hair`` (median and min over views): the region map's face + hair against the ground
truth's face, eyes, mouth and hair pixels.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import StageDir, atomic_write
from ..cameras import Camera, read_cameras_json
from ..config import PipelineConfig
from ..confidence import (ConfidenceScales, cross_view_disagreement_mm, label_confidence, nearest_cameras,
                          from_levels, reprojected_labels, to_levels)
from ..errors import InputFileNotFound
from ..foreground import mask_iou
from ..label_motion import LabelMotion, ViewLabels, ViewTruth
from ..regions import eval_region, vertex_labels
from ..meshes import barycentric_interpolate, cast_camera_rays, closest_points, raycasting_scene
from ..threads import apply_thread_cap
from .canonicalize import REGIONS as MODEL_REGIONS
from .canonicalize import TRANSFER_MODES, canonical_dir
from .reconstruct import read_points, read_view_masks, timestamp_dir, view_images

STAGE = "render"
NEAR_MM = 2.0  # a point within this distance of the tracked surface is "near" in the transfer figures


def splat(points_cam, values, K, height: int, width: int, radius: int = 0):
    """Z-buffered point splatting.

    Args:
        points_cam: (N, 3) torch float, camera coordinates (z forward, metres).
        values: (N, C) torch values carried by the points.
        K: (3, 3) intrinsics; radius: each point covers (2r+1)^2 pixels.
    Returns:
        depth (H, W) (0 = empty), value map (H, W, C), point index (H, W) int64 (-1 = empty).
        Among points on one pixel the nearest wins; equal depths go to the lowest index.
    """
    import torch

    dev = points_cam.device
    z = points_cam[:, 2]
    front = z > 1e-6
    idx_all = torch.nonzero(front).squeeze(1)
    p = points_cam[front]
    u = torch.floor(K[0, 0] * p[:, 0] / p[:, 2] + K[0, 2] + 0.5).long()
    v = torch.floor(K[1, 1] * p[:, 1] / p[:, 2] + K[1, 2] + 0.5).long()
    offs = torch.arange(-radius, radius + 1, device=dev)
    du, dv = torch.meshgrid(offs, offs, indexing="ij")
    uu = (u[:, None] + du.reshape(1, -1)).reshape(-1)
    vv = (v[:, None] + dv.reshape(1, -1)).reshape(-1)
    zz = p[:, 2].repeat_interleave(du.numel())
    ii = idx_all.repeat_interleave(du.numel())
    inside = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
    pix, zz, ii = vv[inside] * width + uu[inside], zz[inside], ii[inside]
    zbuf = torch.full((height * width,), float("inf"), dtype=zz.dtype, device=dev)
    zbuf = zbuf.scatter_reduce(0, pix, zz, reduce="amin")
    winner = zz == zbuf[pix]
    big = torch.iinfo(torch.int64).max
    ibuf = torch.full((height * width,), big, dtype=torch.int64, device=dev)
    ibuf = ibuf.scatter_reduce(0, pix[winner], ii[winner], reduce="amin")
    index = torch.where(ibuf == big, torch.full_like(ibuf, -1), ibuf)
    has = index >= 0
    depth = torch.where(has, zbuf, torch.zeros_like(zbuf))
    vmap = torch.zeros((height * width, values.shape[1]), dtype=values.dtype, device=dev)
    vmap[has] = values[index[has]]
    return depth.view(height, width), vmap.view(height, width, -1), index.view(height, width)


@dataclass
class ViewMaps:
    """Maps of all views of one timestamp, serial order: depth (V, H, W) float32 m, canonical
    (V, H, W, 3), mask (V, H, W) bool, index (V, H, W) int64 point ids."""

    serials: list[str]
    depth: np.ndarray
    canonical: np.ndarray
    mask: np.ndarray
    index: np.ndarray
    foreground: np.ndarray  # (V, H, W) bool: the tracked mesh covers the pixel
    region: np.ndarray  # (V, H, W) uint8 codes of regions.REGION_LABELS (the evaluation's face + hair)
    triangle: np.ndarray  # (V, H, W) int64 the tracked mesh's triangle each pixel's ray meets first (-1: none)
    bary: np.ndarray  # (V, H, W, 3) float32 barycentric coordinates of that hit


def render_timestamp(points: np.ndarray, canonical: np.ndarray, observed: np.ndarray, keep: np.ndarray,
                     cameras: dict[str, Camera], serials: list[str], tracked: np.ndarray, faces: np.ndarray,
                     radius: int = 0, device: str = "cpu",
                     dense_depth: np.ndarray | None = None, dense_tol_m: float = 0.005,
                     vertex_label: np.ndarray | None = None,
                     segmentation: dict[str, np.ndarray] | None = None) -> ViewMaps:
    """Render one timestamp's maps (see module docstring). points/canonical: (N, 3); observed (N, V);
    tracked (Vtx, 3) world metres; vertex_label (Vtx,) region codes (:func:`regions.vertex_labels`; None:
    no region map, all zeros); segmentation: serial -> (H, W) bool foreground of the view, or None."""
    import torch

    from ..regions import region_map

    first = cameras[serials[0]]
    n_v, h, w = len(serials), first.height, first.width
    depth = np.zeros((n_v, h, w), np.float32)
    canon = np.zeros((n_v, h, w, 3), np.float32)
    index = np.full((n_v, h, w), -1, np.int64)
    fg = np.zeros((n_v, h, w), bool)
    hit_triangle = np.full((n_v, h, w), -1, np.int64)
    hit_bary = np.zeros((n_v, h, w, 3), np.float32)
    region = np.zeros((n_v, h, w), np.uint8)
    scene = raycasting_scene(tracked, faces)
    pts_t = torch.as_tensor(points, dtype=torch.float32, device=device)
    can_t = torch.as_tensor(canonical, dtype=torch.float32, device=device)
    for v, s in enumerate(serials):
        cam = cameras[s]
        sel = torch.as_tensor(np.where(observed[:, v] & keep)[0], device=device)
        r = torch.as_tensor(cam.world_2_cam[:3, :3], dtype=torch.float32, device=device)
        t = torch.as_tensor(cam.world_2_cam[:3, 3], dtype=torch.float32, device=device)
        k = torch.as_tensor(cam.K, dtype=torch.float32, device=device)
        d, c, i = splat(pts_t[sel] @ r.T + t, can_t[sel], k, h, w, radius)
        i = torch.where(i >= 0, sel[i.clamp_min(0)], i)  # back to global point ids
        d, c, i = d.cpu().numpy(), c.cpu().numpy(), i.cpu().numpy()
        if dense_depth is not None:  # the dense backend's depth; canonical where the splat agrees with it
            agree = (i >= 0) & (np.abs(dense_depth[v] - d) < dense_tol_m) & (dense_depth[v] > 0)
            d = dense_depth[v]
            i = np.where(agree, i, -1)
            c = np.where(agree[..., None], c, 0)
        depth[v], canon[v], index[v] = d, c, i
        _, triangle, hit_bary[v] = cast_camera_rays(scene, cam)
        hit_triangle[v] = triangle
        fg[v] = triangle >= 0
        if vertex_label is not None:
            px, z = cam.project(tracked)
            region[v] = region_map(triangle, faces, vertex_label, px, z > 1e-6,
                                   None if segmentation is None else segmentation.get(s))
    mask = (index >= 0) & (depth > 0)
    return ViewMaps(serials, depth, canon, mask, index, fg, region, hit_triangle, hit_bary)


def cross_view_canonical_mm(maps: ViewMaps, cameras: dict[str, Camera], tol_m: float,
                            pixels_per_view: int = 0, seed: int = 0) -> tuple[float, int]:
    """Median canonical disagreement (mm) over depth-consistent pixel pairs of different points
    (:func:`confidence.reprojected_labels`).

    Each view's valid pixels are reprojected into every other view: O(V^2) passes. ``pixels_per_view``
    > 0 bounds the cost by a seeded sample of each view's valid pixels (all of them when fewer)."""
    dists = []
    for a in range(len(maps.serials)):
        ys, xs = np.nonzero(maps.mask[a])
        if not len(ys):
            continue
        if 0 < pixels_per_view < len(ys):
            pick = np.sort(np.random.default_rng([seed, a]).choice(len(ys), pixels_per_view, replace=False))
            ys, xs = ys[pick], xs[pick]
        for b in range(len(maps.serials)):
            if b == a:
                continue
            found, label = reprojected_labels(maps, cameras, a, b, ys, xs, tol_m)
            dists.append(np.linalg.norm(label[found] - maps.canonical[a][ys[found], xs[found]], axis=1) * 1000)
    d = np.concatenate(dists) if dists else np.zeros(0)
    return (round(float(np.median(d)), 4) if len(d) else float("nan")), int(len(d))


@dataclass
class RenderResult:
    subject: str
    timestamps: int
    views: int
    valid_fraction: float  # median over timestamps
    cross_view_canonical_mm: float
    cross_view_pairs: int
    canonical_dtype: str
    canonical_storage_error_mm: float
    ms_per_view: float
    dense: bool
    gt_canonical_error_mm: float | None = None  # median over valid pixels of all timestamps
    gt_canonical_error_mm_p90: float | None = None
    # per transfer mode (canonicalize.transfer), near (<= NEAR_MM from the tracked surface) and far points
    gt_canonical_error_mm_by_transfer: dict | None = None
    gt_depth_absrel: float | None = None  # median
    # per ground-truth region of the pixel (GT_REGIONS): median error, p90 and pixel count
    gt_canonical_error_mm_by_region: dict | None = None
    gt_canonical_error_mm_face_hair: float | None = None  # median over FACE_HAIR_REGIONS (the paper's region)
    gt_not_head_fraction: float | None = None  # valid pixels the ground truth says are torso or studio
    gt_head_valid_fraction: float | None = None  # the ground truth's head pixels (hair included) that are valid
    region_iou_face_hair: float | None = None  # the stored face + hair region vs the ground truth's (median view)
    region_iou_face_hair_min: float | None = None
    # the correspondences the labels define against the true motion (label_motion; docs/pipeline.md)
    confidence_mean: float | None = None  # median over timestamps of the labelled pixels' mean confidence
    labels_from_tracked_surface: float | None = None  # canonical_from = "tracked_surface_near": their fraction
    label_epe: dict | None = None
    label_epe_px_504_m2: float | None = None  # frontal camera, margin 2, all head, at a 504 px longest side
    label_epe_floor_px_504_m2: float | None = None
    label_epe_px_504_m8: float | None = None
    label_epe_floor_px_504_m8: float | None = None
    label_epe_confident_half_px_504_m2: float | None = None  # the half of the pixels with the highest confidence
    label_epe_confident_half_px_504_m8: float | None = None
    per_timestamp: list[dict] = field(default_factory=list)

    def figures(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "per_timestamp"}


def render_dir(work, subject: str, sequence: str, frame: int) -> Path:
    return Path(work) / subject / STAGE / sequence / f"{frame:06d}"


def maps_present(work, subject: str) -> bool:
    """Every tracked timestamp still has its ``maps.npz`` (a light build removes them after ``write``)."""
    track = StageDir(work, subject, "track")
    if not track.file("vertices.npz").is_file():
        return False
    with np.load(track.file("vertices.npz")) as z:
        keys = [str(k) for k in z["keys"]]
    return all((render_dir(work, subject, k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])) / "maps.npz").is_file()
               for k in keys)


def run_render(source, subject: str, cfg: PipelineConfig, work, device: str = "cpu") -> RenderResult:
    """Render every canonicalized timestamp of a subject and measure label quality."""
    rc = cfg.render
    apply_thread_cap(cfg.threads)
    track = StageDir(work, subject, "track")
    with np.load(track.file("vertices.npz")) as z:
        keys, tracked, faces = [str(k) for k in z["keys"]], z["tracked"], z["faces"]
        canonical_mesh = z["canonical"].astype(np.float32)  # (Vtx, 3) the subject's canonical vertices
    out = StageDir(work, subject, STAGE)
    out.path.mkdir(parents=True, exist_ok=True)
    gt = source.ground_truth(subject) if source is not None else None
    per_ts, gt_can, gt_rel, store_err, by_transfer_gt = [], [], [], 0.0, []
    by_region, not_head = [], [0, 0]  # (region id per pixel, error) per view; [not head, all] valid pixels
    head_cover = [0, 0]  # [valid, all] pixels of the ground truth's head (hair included)
    model_region = model_vertex_regions(cfg)
    regions = vertex_region_names(model_region) if gt is not None else None
    vertex_label = vertex_labels(model_region, MODEL_REGIONS)
    region_iou = []  # per view: the region map's face + hair against the ground truth's
    render_s, n_views, cross, pairs, dense_any = 0.0, 0, [], 0, False
    scales = ConfidenceScales(rc.confidence_surface_mm, rc.confidence_cross_view_mm, rc.confidence_observers)
    confidence_means = []  # per timestamp: the mean confidence of its labelled pixels
    surface_fraction = []  # per timestamp, with canonical_from = "tracked_surface_near": labels from the mesh
    motion = LabelMotion(rc, keys, cfg.capture.frontal_serial) if gt is not None else None
    for i, key in enumerate(keys):
        seq, frame = key.rsplit("/", 1)
        frame = int(frame)
        rdir = timestamp_dir(work, subject, seq, frame)
        cams = read_cameras_json(rdir / "cameras.json")
        with np.load(rdir / "observers.npz") as z:
            observed, serials = z["observed"], [str(s) for s in z["serials"]]
        with np.load(rdir / "depth.npz") as z:
            dense = str(z["kind"]) == "dense"
            dense_depth = z["depth"] if dense else None
        dense_any |= dense
        with np.load(canonical_dir(work, subject, seq, frame) / "points.npz") as z:
            canonical, keep, distance_mm = z["canonical"], z["keep"], z["distance_mm"]
            by_mode = {m: z[f"canonical_{m}"] for m in TRANSFER_MODES}
        pts = read_points(rdir / "points.ply")["positions"]
        t0 = time.perf_counter()
        maps = render_timestamp(pts, canonical, observed, keep, cams, serials, tracked[i], faces,
                                rc.splat_radius_px, device, dense_depth, vertex_label=vertex_label,
                                segmentation=read_view_masks(rdir))
        render_s += time.perf_counter() - t0
        n_views += len(serials)
        has = maps.index >= 0
        pixel_point = np.where(has, maps.index, 0)  # (V, H, W) the point each pixel shows (0 where none)
        surface_mm = np.where(has, distance_mm[pixel_point], 0)  # (V, H, W) the point's distance to the mesh
        # every labelled pixel's canonical point on the tracked mesh at its ray (the labels near the surface
        # and the error-source figures read them)
        on_mesh = [tracked_surface_labels(maps, v, canonical_mesh, faces) for v in range(len(serials))]
        if rc.canonical_from == "tracked_surface_near":
            near = np.stack([view.labelled for view in on_mesh]) & (surface_mm <= rc.canonical_from_near_mm)
            maps.canonical[near] = np.stack([view.canonical for view in on_mesh])[near]
            surface_fraction.append(float(near.sum() / max(maps.mask.sum(), 1)))
        disagreement = cross_view_disagreement_mm(
            maps, cams, nearest_cameras(serials, cams, rc.confidence_cross_view_cameras), rc.consistency_depth_mm / 1000)
        confidence = to_levels(label_confidence(maps.mask, surface_mm, disagreement,
                                                np.where(has, observed.sum(1)[pixel_point], 0), scales), maps.mask)
        stored = maps.canonical.astype(rc.canonical_dtype)
        store_err = max(store_err, float(np.abs(stored.astype(np.float32) - maps.canonical).max()) * 1000)
        cv, npairs = cross_view_canonical_mm(maps, cams, rc.consistency_depth_mm / 1000, rc.cross_view_pixels_per_view)
        cross.append(cv)
        pairs += npairs
        valid_fraction = float(maps.mask.sum() / max(maps.foreground.sum(), 1))
        labelled_confidence = from_levels(confidence[maps.mask])
        confidence_means.append(float(labelled_confidence.mean()) if len(labelled_confidence) else np.nan)
        row = {"sequence": seq, "frame": frame, "valid_fraction": round(valid_fraction, 5),
               "valid_pixels": int(maps.mask.sum()), "cross_view_canonical_mm": cv, "cross_view_pairs": npairs,
               "confidence_mean": round(confidence_means[-1], 4)}
        if gt is not None:
            ce, rel = [], []
            wanted = motion.cameras_wanted(cams) if motion is not None else set()
            scene_vertices, scene_faces, _, scene_canonical = gt.scene(seq, frame)
            if wanted:  # each reconstructed point's true canonical point: the ground-truth surface nearest to it
                _, tri, bary = closest_points(scene_vertices, scene_faces, pts)
                point_truth = barycentric_interpolate(scene_canonical.astype(np.float32), scene_faces, tri, bary)
            for v, s in enumerate(serials):
                g = gt.view_maps(seq, frame, s, downscale=cfg.reconstruct.downscale or cfg.capture.downscale)
                m = maps.mask[v] & g["mask"]
                not_head[0] += int((maps.mask[v] & ~g["mask"]).sum())
                not_head[1] += int(maps.mask[v].sum())
                head_cover[0] += int(m.sum())
                head_cover[1] += int(g["mask"].sum())
                gt_region = gt_regions(g, regions)
                region_iou.append(mask_iou(eval_region(maps.region[v]), np.isin(gt_region, FACE_HAIR_IDS)))
                region_of_pixel = gt_region[m]
                ce.append(np.linalg.norm(stored[v][m].astype(np.float32) - g["canonical"][m], axis=1) * 1000)
                rel.append(np.abs(maps.depth[v][m] - g["depth"][m]) / g["depth"][m])
                if s in wanted:
                    region_v = eval_region(maps.region[v])
                    oracles = {  # labels exact up to a stage (label_motion.ERROR_SOURCES)
                        "true_at_labelled_pixels": ViewLabels(g["canonical"], m, region_v),
                        "true_of_reconstructed_points": ViewLabels(
                            np.where(maps.mask[v][..., None], point_truth[pixel_point[v]], 0).astype(np.float32),
                            maps.mask[v], region_v),
                        "tracked_surface_at_pixels": on_mesh[v]}
                    motion.keep(seq, frame, s, cams[s],
                                ViewLabels(stored[v].astype(np.float32), maps.mask[v], region_v,
                                           from_levels(confidence[v])),
                                ViewTruth(g["canonical"], g["mask"], g["triangle"], g["bary"], g["depth"], gt_region),
                                oracles)
                point = maps.index[v][m]  # the point each valid pixel shows: its transfers and its distance
                by_transfer_gt.append({mode: np.linalg.norm(c[point] - g["canonical"][m], axis=1) * 1000
                                       for mode, c in by_mode.items()} | {"far": distance_mm[point] > NEAR_MM})
                by_region.append((region_of_pixel, ce[-1]))
            if motion is not None:
                motion.measure(seq, frame, scene_vertices, scene_faces)
            ce, rel = np.concatenate(ce), np.concatenate(rel)
            gt_can.append(ce)
            gt_rel.append(rel)
            face_hair = np.isin(np.concatenate([r for r, _ in by_region[-len(serials):]]), FACE_HAIR_IDS)
            row.update(gt_canonical_error_mm=round(float(np.median(ce)), 4),
                       gt_canonical_error_mm_p90=round(float(np.percentile(ce, 90)), 4),
                       gt_canonical_error_mm_face_hair=round(float(np.median(ce[face_hair])), 4)
                       if face_hair.any() else None,
                       gt_depth_absrel=round(float(np.median(rel)), 6))
        per_ts.append(row)
        folder = render_dir(work, subject, seq, frame)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = dict(depth=maps.depth, canonical=stored, mask=maps.mask, serials=np.array(serials),
                      foreground=maps.foreground, region=maps.region, confidence=confidence)
        atomic_write(folder / "maps.npz", lambda p: np.savez_compressed(p, **arrays))
        atomic_write(folder / "quality.json", lambda p: p.write_text(json.dumps(row)))
        if i == 0:
            try:  # the inputs: reconstruct's PNGs, or decoded again where a light build pruned them
                views = view_images(source, subject, cfg, work, seq, frame, serials)
            except InputFileNotFound:
                views = None
            atomic_write(out.file("preview.png"), lambda p: write_preview(views, maps, p))
    result = RenderResult(
        subject=subject, timestamps=len(keys), views=n_views // max(len(keys), 1),
        valid_fraction=round(float(np.median([r["valid_fraction"] for r in per_ts])), 5) if per_ts else 0.0,
        cross_view_canonical_mm=round(float(np.nanmedian(cross)), 4) if cross else float("nan"),
        cross_view_pairs=pairs, canonical_dtype=rc.canonical_dtype, canonical_storage_error_mm=round(store_err, 5),
        ms_per_view=round(1000 * render_s / max(n_views, 1), 2), dense=dense_any, per_timestamp=per_ts,
        confidence_mean=round(float(np.nanmedian(confidence_means)), 4) if per_ts else None,
        labels_from_tracked_surface=round(float(np.mean(surface_fraction)), 4) if surface_fraction else None)
    if gt_can:
        all_ce, all_rel = np.concatenate(gt_can), np.concatenate(gt_rel)
        result.gt_canonical_error_mm = round(float(np.median(all_ce)), 4)
        result.gt_canonical_error_mm_p90 = round(float(np.percentile(all_ce, 90)), 4)
        result.gt_depth_absrel = round(float(np.median(all_rel)), 6)
        result.gt_canonical_error_mm_by_transfer = transfer_errors(by_transfer_gt)
        result.gt_canonical_error_mm_by_region = region_errors(by_region)
        region = np.concatenate([r for r, _ in by_region])
        face_hair = np.isin(region, FACE_HAIR_IDS)
        if face_hair.any():
            result.gt_canonical_error_mm_face_hair = round(float(np.median(all_ce[face_hair])), 4)
        result.gt_not_head_fraction = round(not_head[0] / max(not_head[1], 1), 5)
        result.gt_head_valid_fraction = round(head_cover[0] / max(head_cover[1], 1), 5)
        result.region_iou_face_hair = round(float(np.median(region_iou)), 4)
        result.region_iou_face_hair_min = round(float(np.min(region_iou)), 4)
        shape = maps.mask.shape[1:]
        result.label_epe = motion.figures(GT_REGIONS, 504 / max(shape))
        result.label_epe["resolution"] = list(shape)
        for m in (2, 8):  # the paper's margins as headline fields (every margin is in label_epe)
            head = result.label_epe["margins"].get(str(m), {}).get("head", {})
            setattr(result, f"label_epe_px_504_m{m}", head.get("label_epe_px_504"))
            setattr(result, f"label_epe_floor_px_504_m{m}", head.get("floor_epe_px_504"))
            setattr(result, f"label_epe_confident_half_px_504_m{m}", head.get("confident_half", {}).get("label_epe_px_504"))
    return result


def tracked_surface_labels(maps: ViewMaps, v: int, canonical_vertices: np.ndarray, faces: np.ndarray):
    """View v's labelled pixels labelled instead with the canonical point of the tracked mesh where the
    pixel's ray meets it (no reconstructed point involved): :class:`label_motion.ViewLabels`."""
    tri = maps.triangle[v]
    labelled = maps.mask[v] & (tri >= 0)
    canonical = np.zeros(tri.shape + (3,), np.float32)
    canonical[labelled] = barycentric_interpolate(canonical_vertices, faces, tri[labelled], maps.bary[v][labelled])
    return ViewLabels(canonical, labelled, eval_region(maps.region[v]))


# What a ground-truth pixel shows, for the error table: the head model's region of the hit triangle,
# or the part of the subject the head model lacks.
GT_REGIONS = ("face", "scalp", "ears", "neck", "eyes", "other", "hair", "mouth")
FACE_HAIR_REGIONS = ("face", "eyes", "mouth", "hair")  # the paper evaluates face + hair (Facer masks)
FACE_HAIR_IDS = [GT_REGIONS.index(n) for n in FACE_HAIR_REGIONS]
_REGION_GROUP = {"eyeballs": "eyes", "lips": "face", "nose": "face", "eye_region": "eyes", "forehead": "face",
                 "face": "face", "ears": "ears", "neck": "neck", "scalp": "scalp", "other": "other"}


def model_vertex_regions(cfg: PipelineConfig) -> np.ndarray:
    """(V,) id into canonicalize's ``REGIONS`` of each head-model vertex (from the model's masks)."""
    from ..flame.assets import load_assets
    from .canonicalize import vertex_regions

    return vertex_regions(load_assets(cfg.flame))[0]


def vertex_region_names(model_region: np.ndarray) -> np.ndarray:
    """(V,) int8 index into GT_REGIONS of each head-model vertex, from its :func:`model_vertex_regions` id."""
    lookup = np.array([GT_REGIONS.index(_REGION_GROUP[name]) for name in MODEL_REGIONS], np.int8)
    return lookup[model_region]


def gt_regions(g: dict, vertex_region: np.ndarray) -> np.ndarray:
    """(H, W) int8 index into GT_REGIONS per pixel of ground-truth view maps ``g`` (-1 = not head)."""
    out = np.full(g["part"].shape, -1, np.int8)
    head = g["part"] == 0
    faces = g["faces"]
    out[head] = vertex_region[faces[g["triangle"][head], 0]]
    out[g["part"] == 1] = GT_REGIONS.index("hair")
    out[(g["part"] == 2) | (g["part"] == 3)] = GT_REGIONS.index("mouth")
    return out


def region_errors(by_region: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """{region: {"median": mm, "p90": mm, "pixels": n}} over the valid head pixels of every view."""
    if not by_region:
        return {}
    region = np.concatenate([r for r, _ in by_region])
    err = np.concatenate([e for _, e in by_region])
    out = {}
    for rid, name in enumerate(GT_REGIONS):
        sel = region == rid
        if sel.any():
            out[name] = {"median": round(float(np.median(err[sel])), 3),
                         "p90": round(float(np.percentile(err[sel], 90)), 3), "pixels": int(sel.sum())}
    return out


def transfer_errors(per_view: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Median canonical error (mm) against ground truth of every transfer mode, over the valid pixels
    whose point is within :data:`NEAR_MM` of the tracked surface ("near") and beyond it ("far")."""
    far = np.concatenate([d["far"] for d in per_view])
    out: dict[str, float] = {"far_pixel_fraction": round(float(far.mean()), 5) if len(far) else 0.0}
    for mode in TRANSFER_MODES:
        err = np.concatenate([d[mode] for d in per_view])
        for name, sel in (("near", ~far), ("far", far)):
            out[f"{mode}_{name}"] = round(float(np.median(err[sel])), 4) if sel.any() else None
    return out


def write_preview(images: dict[str, np.ndarray] | None, maps: ViewMaps, path, views: int = 4) -> None:
    """Rows: input image (serial -> (H, W, 3) uint8 RGB; grey where None), depth (turbo colour map),
    canonical map (xyz -> rgb) for a few views. Sparse maps are dilated by 2 px so that the points are visible."""
    import cv2

    picks = np.linspace(0, len(maps.serials) - 1, views).round().astype(int)
    valid_can = maps.canonical[maps.mask]
    lo, hi = (valid_can.min(0), valid_can.max(0)) if len(valid_can) else (np.zeros(3), np.ones(3))
    cols = []
    for v in picks:
        img = None if images is None else cv2.cvtColor(images[maps.serials[v]], cv2.COLOR_RGB2BGR)
        m = maps.mask[v]
        d = maps.depth[v]
        dn = np.zeros_like(d)
        if m.any():
            dn[m] = (d[m] - d[m].min()) / max(np.ptp(d[m]), 1e-6)
        depth_rgb = cv2.applyColorMap((255 * (1 - dn)).astype(np.uint8), cv2.COLORMAP_TURBO)
        can_rgb = (255 * np.clip((maps.canonical[v] - lo) / np.maximum(hi - lo, 1e-6), 0, 1)).astype(np.uint8)[..., ::-1]
        kernel = np.ones((5, 5), np.uint8)
        grown = cv2.dilate(m.astype(np.uint8), kernel) > 0
        depth_rgb = np.where(grown[..., None], cv2.dilate(np.where(m[..., None], depth_rgb, 0).astype(np.uint8), kernel), 40)
        can_rgb = np.where(grown[..., None], cv2.dilate(np.where(m[..., None], can_rgb, 0).astype(np.uint8), kernel), 40)
        if img is None:
            img = np.full_like(depth_rgb, 96)
        cols.append(np.concatenate([img, depth_rgb.astype(np.uint8), can_rgb.astype(np.uint8)], 0))
    cv2.imwrite(str(path), np.concatenate(cols, 1), [cv2.IMWRITE_PNG_COMPRESSION, 3])
