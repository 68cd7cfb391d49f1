"""Stage ``reconstruct``: COLMAP on the 16 views of a timestamp with the calibrated cameras.

Per timestamp (``reconstruct_timestamp``): images at the working resolution (K scaled to match),
SIFT features, exhaustive matching with geometric verification, then triangulation with every pose
and intrinsic held fixed (no pose estimation). Then the dense backend (``reconstruct.dense``):
``colmap`` continues with undistortion, PatchMatch stereo (geometric consistency) and fusion, run in a
subprocess because pycolmap's CUDA build aborts the whole process when something is wrong with the
device; ``torch`` runs :mod:`facecanon_data.mvs` (plane sweep + refinement + consistency fusion, any
device) from the cleaned sparse points; ``auto`` picks colmap where it can run, else torch.

A timestamp is kept only when every view is *registered*, which with known poses means: the view
contributes at least ``min_observations_per_view`` triangulated observations and their mean
reprojection error is under ``max_mean_reprojection_error_px``. Otherwise the timestamp is dropped,
and the reason names the camera(s).

Outputs in ``{work}/{subject}/reconstruct/{sequence}/{frame:06d}/``: ``images/``, ``masks/`` (when
used), ``colmap/sparse/`` (the fixed-pose model), ``points.ply`` (positions, colours, normals when
dense, ``visibility`` = number of views), ``depth.npz`` (per-view depth, serial order, with
``kind`` = "dense" | "sparse"), ``cameras.json``, ``views.json`` (per-view registration stats) and
``_DONE.json`` last. The subject-level ``reconstruct/_DONE.json`` lists kept and dropped timestamps.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..artifacts import atomic_write
from ..cameras import Camera, write_cameras_json
from ..config import PipelineConfig, ReconstructConfig
from ..prefetch import prefetch
from ..threads import apply_thread_cap, pool_size
from ..errors import InputFileNotFound, InputValueError
from ..foreground import mask_iou

log = logging.getLogger(__name__)
STAGE = "reconstruct"


@dataclass
class ViewStats:
    serial: str
    observations: int  # triangulated observations in this view
    mean_reprojection_error_px: float
    registered: bool
    problem: str = ""


@dataclass
class TimestampResult:
    sequence: str
    frame: int
    kept: bool
    reason: str
    views: list[ViewStats]
    num_points: int
    dense: bool
    colmap_seconds: float  # time inside COLMAP calls (PatchMatch included)
    total_seconds: float  # the whole timestamp, image writing and clean-up included
    gt_point_error_median_mm: float | None = None
    gt_point_error_p90_mm: float | None = None
    foreground_source: str = "none"  # "mattes" | "plates" | "none": where COLMAP's masks came from
    foreground_iou: list[float] | None = None  # per view (serial order), against the ground truth
    foreground_seconds: float = 0.0  # segmenting the views from the plates (before COLMAP; not in total)
    dense_backend: str = "none"  # "colmap" | "torch" | "none": what made the dense cloud
    dense_seconds: float = 0.0  # the dense step, either backend (colmap's also counts in colmap_seconds)
    dense_cpu_seconds: float = 0.0  # torch MVS: CPU time of this process over all its threads

    @property
    def key(self) -> str:
        return f"{self.sequence}/{self.frame:06d}"


def timestamp_dir(work, subject: str, sequence: str, frame: int) -> Path:
    return Path(work) / subject / STAGE / sequence / f"{frame:06d}"


def view_images(source, subject: str, cfg: PipelineConfig, work, sequence: str, frame: int,
                serials: list[str]) -> dict[str, np.ndarray]:
    """serial -> (H, W, 3) uint8 RGB of a reconstructed timestamp at the working resolution: the PNGs
    ``reconstruct`` wrote, or, once a ``light`` build pruned them, decoded again from the capture (the
    same decoding, so the same pixels), one camera at a time: 16 decoders open at once on 2200 x 3208
    videos peak at ~1.9 GB, one at a time at ~0.3 GB (docs/pipeline.md, ``bench subject``)."""
    import cv2

    folder = timestamp_dir(work, subject, sequence, frame) / "images"
    paths = {s: folder / f"cam_{s}.png" for s in serials}
    if all(p.is_file() for p in paths.values()):
        out = {}
        for s, p in paths.items():
            img = cv2.imread(str(p))
            if img is None:
                raise InputValueError(f"{p}: unreadable image")
            out[s] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return out
    if source is None:
        raise InputFileNotFound(f"{folder}: images pruned from the work folder and no capture to decode them from")
    downscale = cfg.reconstruct.downscale or cfg.capture.downscale
    return {s: next(iter(source.frames(subject, sequence, s, [frame], downscale)))[1] for s in serials}


def read_view_masks(folder: Path) -> dict[str, np.ndarray] | None:
    """serial -> (H, W) bool: the foreground masks a timestamp's ``reconstruct`` gave COLMAP, from
    ``masks/cam_{serial}.png.png`` (COLMAP's names) or, once a light build packed them, ``masks.npz``
    (per serial the bit-packed mask and its shape); None when there are none or one is unreadable."""
    import cv2

    if (folder / "masks").is_dir():
        out = {}
        for p in sorted((folder / "masks").glob("cam_*.png.png")):
            m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            if m is None:
                return None
            out[p.name[len("cam_"):-len(".png.png")]] = m > 127
        return out or None
    if (folder / "masks.npz").is_file():
        out = {}
        with np.load(folder / "masks.npz") as z:
            for serial in (k[len("bits_"):] for k in z.files if k.startswith("bits_")):
                shape = tuple(int(n) for n in z[f"shape_{serial}"])
                out[serial] = np.unpackbits(z[f"bits_{serial}"])[:int(np.prod(shape))].reshape(shape).astype(bool)
        return out
    return None


def common_focus(cameras: list[Camera]) -> np.ndarray:
    """Least-squares point closest to all optical axes, (3,) meters: where the cameras look."""
    a, b = np.zeros((3, 3)), np.zeros(3)
    for c in cameras:
        d = c.world_2_cam[2, :3]  # optical axis in world coordinates
        p = np.eye(3) - np.outer(d, d)
        a += p
        b += p @ c.center
    return np.linalg.solve(a, b)


# ---------------------------------------------------------------------------------------------


def reconstruct_timestamp(images: dict[str, np.ndarray], cameras: dict[str, Camera], out: Path,
                          rcfg: ReconstructConfig, masks: dict[str, np.ndarray] | None = None,
                          dense: str = "none", threads: int = 0) -> TimestampResult:
    """Reconstruct one timestamp into ``out`` (see module docstring); returns its result.

    Args:
        images: serial -> (H, W, 3) uint8 RGB at the working resolution.
        cameras: serial -> camera at the same resolution.
        masks: serial -> (H, W) float in [0, 1] foreground matte, or None.
        dense: the dense backend: "colmap" (CUDA PatchMatch), "torch" (:mod:`facecanon_data.mvs`) or "none"
            (:func:`dense_backend` resolves the config's "auto").
        threads: COLMAP threads (0 = all cores). With 1, the result is bit-reproducible.
    """
    import cv2
    import pycolmap

    t0 = time.perf_counter()
    colmap_s = 0.0
    if out.exists():
        shutil.rmtree(out)
    img_dir, mask_dir, col_dir = out / "images", out / "masks", out / "colmap"
    for d in (img_dir, col_dir):
        d.mkdir(parents=True)
    serials = list(cameras)
    names = {s: f"cam_{s}.png" for s in serials}
    writes = [(img_dir / names[s], cv2.cvtColor(images[s], cv2.COLOR_RGB2BGR)) for s in serials]
    reader = pycolmap.ImageReaderOptions()
    k = cameras[serials[0]].K
    if any(not np.allclose(c.K, k) for c in cameras.values()):
        raise ValueError("cameras with different intrinsics: write one camera per image first")
    reader.camera_model = "PINHOLE"
    # plain floats: numpy 2 writes a numpy scalar's repr as "np.float64(...)", which COLMAP refuses
    reader.camera_params = ",".join(repr(float(v)) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
    if masks is not None:
        mask_dir.mkdir()
        # COLMAP: the mask of "x.png" is "x.png.png", zero = ignore.
        writes += [(mask_dir / f"{names[s]}.png", ((masks[s] > 0.5) * 255).astype(np.uint8)) for s in serials]
        reader.mask_path = mask_dir
    _write_pngs(writes)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = rcfg.max_num_features
    extraction.sift.peak_threshold = rcfg.peak_threshold
    extraction.num_threads = threads or -1
    matching = pycolmap.FeatureMatchingOptions()
    matching.guided_matching = rcfg.guided_matching
    matching.num_threads = threads or -1
    db_path = col_dir / "database.db"
    device = pycolmap.Device.cuda if dense == "colmap" else pycolmap.Device.cpu

    t = time.perf_counter()
    pycolmap.extract_features(db_path, img_dir, image_names=[names[s] for s in serials],
                              camera_mode=pycolmap.CameraMode.PER_IMAGE, reader_options=reader,
                              extraction_options=extraction, device=device)
    pycolmap.match_exhaustive(db_path, matching_options=matching, device=device)
    colmap_s += time.perf_counter() - t

    rec, id_to_serial = _fixed_pose_reconstruction(db_path, cameras)
    options = pycolmap.IncrementalPipelineOptions()
    options.triangulation.ignore_two_view_tracks = rcfg.ignore_two_view_tracks
    options.num_threads = threads or -1
    (col_dir / "sparse").mkdir()
    t = time.perf_counter()
    rec = pycolmap.triangulate_points(rec, db_path, img_dir, col_dir / "sparse", clear_points=True,
                                      options=options, refine_intrinsics=False)
    colmap_s += time.perf_counter() - t
    rec.write(col_dir / "sparse")

    views = _view_stats(rec, id_to_serial, rcfg)
    bad = [v for v in views if not v.registered]
    kept, reason = not bad, "; ".join(f"camera {v.serial}: {v.problem}" for v in bad)
    is_dense = False
    pts, colors, normals, visibility, obs = _sparse_points(rec, id_to_serial)
    mvs_s = mvs_cpu_s = 0.0  # the dense step's seconds, either backend (CPU seconds: torch only)
    if kept and dense == "colmap":
        t = time.perf_counter()
        ok, msg = _run_dense_subprocess(col_dir, img_dir, rcfg)
        mvs_s = time.perf_counter() - t
        colmap_s += mvs_s
        if ok:
            pts, colors, normals, visibility = _read_fused(col_dir / "dense" / "fused.ply")
            is_dense = True
        else:
            kept, reason = False, f"dense reconstruction failed: {msg}"
    triangulated = len(pts)
    pts, colors, normals, visibility, keep_idx = _clean(pts, colors, normals, visibility,
                                                        common_focus(list(cameras.values())), rcfg)
    if len(pts) == 0:  # nothing to track or label: drop the timestamp with the reason
        kept = False
        reason = "; ".join(filter(None, [reason, f"no point left after clean-up ({triangulated} triangulated, none "
                                                 f"within {rcfg.head_box_half_size_m} m of the cameras' common focus)"]))
    if kept and dense == "torch":
        from ..devices import pick_torch_device
        from ..mvs import reconstruct_dense

        t, cpu = time.perf_counter(), time.process_time()
        sparse_seen = np.array([[s in obs[i] for s in serials] for i in keep_idx], bool).reshape(-1, len(serials))
        cloud = reconstruct_dense([images[s] for s in serials], [cameras[s] for s in serials], pts, sparse_seen,
                                  rcfg.mvs, None if masks is None else [masks[s] > 0.5 for s in serials],
                                  pick_torch_device(rcfg.mvs.device, "reconstruct.mvs.device"))
        pts, colors, normals, visibility, _ = _clean(cloud.positions, cloud.colors, cloud.normals, cloud.visibility,
                                                     common_focus(list(cameras.values())), rcfg)
        depth = cloud.depth
        observed = _observed_by_depth(pts, depth, serials, cameras)
        is_dense, mvs_s, mvs_cpu_s = True, time.perf_counter() - t, time.process_time() - cpu
        if len(pts) == 0:  # nothing consistent across views: no label to make, like an empty sparse cloud
            kept, reason = False, "dense reconstruction (torch) kept no point after the consistency check and clean-up"
    elif is_dense:
        depth = _dense_depths(col_dir / "dense", serials, cameras)
        observed = _observed_by_depth(pts, depth, serials, cameras)
    else:
        observed = np.array([[s in obs[i] for s in serials] for i in keep_idx], bool).reshape(-1, len(serials))
        depth = _sparse_depths(pts, observed, serials, cameras)
    atomic_write(out / "observers.npz", lambda p: np.savez_compressed(p, observed=observed, serials=np.array(serials)))
    if len(pts):  # a PLY of no points cannot be written; a dropped timestamp has none
        _write_points(out / "points.ply", pts, colors, normals, visibility)
    atomic_write(out / "depth.npz", lambda p: np.savez_compressed(
        p, depth=depth.astype(np.float32), serials=np.array(serials), kind=np.array("dense" if is_dense else "sparse")))
    write_cameras_json(out / "cameras.json", cameras)
    (out / "views.json").write_text(json.dumps([asdict(v) for v in views], indent=1))
    if not rcfg.keep_database:
        db_path.unlink(missing_ok=True)
    return TimestampResult(sequence="", frame=-1, kept=kept, reason=reason, views=views, num_points=len(pts),
                           dense=is_dense, dense_backend=dense if is_dense else "none",
                           colmap_seconds=round(colmap_s, 3), dense_seconds=round(mvs_s, 3), dense_cpu_seconds=round(mvs_cpu_s, 3),
                           total_seconds=round(time.perf_counter() - t0, 3))


def _write_pngs(writes: list[tuple[Path, np.ndarray]]) -> None:
    """Uncompressed PNGs written on threads (OpenCV releases the GIL; COLMAP is idle meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    with ThreadPoolExecutor(max_workers=pool_size(8)) as pool:
        for ok in pool.map(lambda pw: cv2.imwrite(str(pw[0]), pw[1], [cv2.IMWRITE_PNG_COMPRESSION, 0]), writes):
            if not ok:
                raise OSError("cannot write COLMAP input images")


def _fixed_pose_reconstruction(db_path: Path, cameras: dict[str, Camera]):
    """A pycolmap Reconstruction with the database's cameras/rigs/frames/images and our fixed poses."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    id_to_serial: dict[int, str] = {}
    with pycolmap.Database.open(db_path) as db:
        images = db.read_all_images()
        for c in db.read_all_cameras():
            rec.add_camera(c)
        for r in db.read_all_rigs():
            rec.add_rig(r)
        by_frame = {im.frame_id: im for im in images}
        for f in db.read_all_frames():
            im = by_frame[f.frame_id]
            serial = im.name[len("cam_"):-len(".png")]
            m = cameras[serial].world_2_cam
            f.rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(m[:3, :3]), m[:3, 3])
            rec.add_frame(f)
            id_to_serial[im.image_id] = serial
        for im in images:
            rec.add_image(im)
        for f in db.read_all_frames():
            rec.register_frame(f.frame_id)
    return rec, id_to_serial


def _view_stats(rec, id_to_serial: dict[int, str], rcfg: ReconstructConfig) -> list[ViewStats]:
    """Triangulated observations and mean reprojection error per view."""
    point_ids = np.fromiter(rec.points3D.keys(), dtype=np.int64, count=rec.num_points3D())
    order = np.argsort(point_ids)
    xyz = np.array([rec.points3D[int(i)].xyz for i in point_ids[order]]).reshape(-1, 3)
    sorted_ids = point_ids[order]
    out = []
    for iid, serial in sorted(id_to_serial.items(), key=lambda kv: kv[1]):
        im = rec.images[iid]
        obs = im.get_observation_points2D()
        n = len(obs)
        mean = float("nan")
        if n:
            ids = np.fromiter((p.point3D_id for p in obs), dtype=np.int64, count=n)
            uv = np.array([p.xy for p in obs])
            pose = im.cam_from_world()
            cam_pts = xyz[np.searchsorted(sorted_ids, ids)] @ pose.rotation.matrix().T + pose.translation
            mean = float(np.linalg.norm(im.camera.img_from_cam(cam_pts) - uv, axis=1).mean())
        problems = []
        if n < rcfg.min_observations_per_view:
            problems.append(f"{n} triangulated observations < {rcfg.min_observations_per_view}")
        if n and mean > rcfg.max_mean_reprojection_error_px:
            problems.append(f"mean reprojection error {mean:.2f} px > {rcfg.max_mean_reprojection_error_px}")
        out.append(ViewStats(serial, n, round(mean, 4), not problems, ", ".join(problems)))
    return out


def _sparse_points(rec, id_to_serial):
    """Positions (N, 3), colours (N, 3) uint8, no normals, visibility (N,), observing serials per point."""
    pts = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in pts], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in pts], np.uint8).reshape(-1, 3)
    obs = [sorted({id_to_serial[el.image_id] for el in p.track.elements}) for p in pts]
    vis = np.array([len(o) for o in obs], np.int32)
    return xyz, rgb, None, vis, obs


def _clean(pts, colors, normals, visibility, centre, rcfg):
    """Crop to a head-sized cube around ``centre``, then open3d statistical outlier removal."""
    import open3d as o3d

    idx = np.where((np.abs(pts - centre) <= rcfg.head_box_half_size_m).all(1))[0]
    if len(idx) > rcfg.outlier_neighbors:
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts[idx]))
        _, inl = pc.remove_statistical_outlier(nb_neighbors=rcfg.outlier_neighbors, std_ratio=rcfg.outlier_std_ratio)
        idx = idx[np.asarray(inl, dtype=np.int64)]
    return (pts[idx], colors[idx], None if normals is None else normals[idx], visibility[idx], idx)


def _observed_by_depth(pts, depth, serials, cameras, tol: float = 0.005) -> np.ndarray:
    """(N, V) bool: view v sees point n when the point's depth matches v's depth map within ``tol`` m."""
    out = np.zeros((len(pts), len(serials)), bool)
    for v, s in enumerate(serials):
        cam = cameras[s]
        uv, z = cam.project(pts)
        px = np.floor(uv + 0.5).astype(np.int64)
        ok = (z > 0) & (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height)
        d = np.zeros(len(pts), np.float32)
        d[ok] = depth[v][px[ok, 1], px[ok, 0]]
        out[:, v] = ok & (d > 0) & (np.abs(d - z) < tol)
    return out


def _sparse_depths(pts, observed, serials, cameras) -> np.ndarray:
    """(V, H, W) depth from the points each view observed ((N, V) bool), z-buffered; 0 = none."""
    first = cameras[serials[0]]
    depth = np.zeros((len(serials), first.height, first.width), np.float32)
    for v, s in enumerate(serials):
        cam = cameras[s]
        sel = observed[:, v]
        if not sel.any():
            continue
        uv, z = cam.project(pts[sel])
        px = np.floor(uv + 0.5).astype(np.int64)
        ok = (z > 0) & (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height)
        flat = px[ok, 1] * cam.width + px[ok, 0]
        zbuf = np.full(cam.width * cam.height, np.inf, np.float32)
        np.minimum.at(zbuf, flat, z[ok].astype(np.float32))
        depth[v] = np.where(np.isfinite(zbuf), zbuf, 0).reshape(cam.height, cam.width)
    return depth


def _write_points(path: Path, pts, colors, normals, visibility) -> None:
    """PLY with positions, uint8 colours, normals (dense only) and a ``visibility`` count per point."""
    import open3d as o3d

    pc = o3d.t.geometry.PointCloud()
    pc.point.positions = o3d.core.Tensor(pts.astype(np.float32))
    pc.point.colors = o3d.core.Tensor(colors.astype(np.uint8))
    if normals is not None:
        pc.point.normals = o3d.core.Tensor(normals.astype(np.float32))
    pc.point.visibility = o3d.core.Tensor(visibility.astype(np.int32)[:, None])
    atomic_write(path, lambda p: o3d.t.io.write_point_cloud(str(p), pc))


def read_points(path: Path) -> dict[str, np.ndarray]:
    """Read a ``points.ply`` written by this stage: positions (N, 3) m, colors, [normals], visibility."""
    import open3d as o3d

    if not Path(path).is_file():
        raise InputFileNotFound(f"{path}: point cloud not found")
    pc = o3d.t.io.read_point_cloud(str(path))
    return {k: pc.point[k].numpy() for k in pc.point}


# -- dense (CUDA) -------------------------------------------------------------------------------


def _run_dense_subprocess(col_dir: Path, img_dir: Path, rcfg: ReconstructConfig) -> tuple[bool, str]:
    """Undistort + PatchMatch + fusion in a child process; (ok, message). Never raises."""
    cmd = [sys.executable, "-m", "facecanon_data.stages.dense", str(col_dir), str(img_dir),
           json.dumps(asdict(rcfg))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=rcfg.dense_timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {rcfg.dense_timeout_s} s"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return False, f"exit status {r.returncode}: {' | '.join(tail)}"
    return True, ""


def _read_fused(path: Path):
    import open3d as o3d

    pc = o3d.io.read_point_cloud(str(path))
    pts = np.asarray(pc.points)
    colors = (np.asarray(pc.colors) * 255).round().astype(np.uint8) if pc.has_colors() else np.zeros_like(pts, np.uint8)
    normals = np.asarray(pc.normals) if pc.has_normals() else None
    vis_path = path.with_suffix(".ply.vis")
    vis = _read_fusion_visibility(vis_path, len(pts))
    return pts, colors, normals, vis


def _read_fusion_visibility(path: Path, n: int) -> np.ndarray:
    """COLMAP's ``fused.ply.vis``: uint64 count, then per point uint32 k and k image indices."""
    if not path.is_file():
        return np.zeros(n, np.int32)
    raw = np.fromfile(path, dtype=np.uint32)
    out, pos = np.zeros(n, np.int32), 2
    for i in range(min(n, int(raw[0]))):
        k = int(raw[pos])
        out[i] = k
        pos += 1 + k
    return out


def _dense_depths(dense_dir: Path, serials, cameras) -> np.ndarray:
    """(V, H, W) PatchMatch geometric depth maps (undistorted = original for PINHOLE cameras)."""
    import pycolmap

    first = cameras[serials[0]]
    depth = np.zeros((len(serials), first.height, first.width), np.float32)
    for v, s in enumerate(serials):
        p = dense_dir / "stereo" / "depth_maps" / f"cam_{s}.png.geometric.bin"
        if p.is_file():
            d = pycolmap.DepthMap()
            d.read(str(p))
            arr = d.to_array()
            if arr.shape == depth.shape[1:]:
                depth[v] = arr
    return depth


# ---------------------------------------------------------------------------------------------
# the subject-level driver


@dataclass
class ReconstructResult:
    subject: str
    timestamps_total: int
    timestamps_kept: int
    views_registered_min: int
    points_median: float
    dense: bool
    seconds_per_timestamp: float
    dense_backend: str = "none"  # over kept timestamps: "torch", "colmap", "none" (or a "+" join)
    dense_seconds_per_timestamp: float = 0.0  # the dense step (either backend), mean over kept timestamps
    gt_point_error_median_mm: float | None = None
    foreground_source: str = "none"
    foreground_iou_min: float | None = None  # over views and timestamps, with ground truth
    foreground_iou_median: float | None = None
    dropped: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # "SEQ/FRAME" keys, in order
    timestamps: list[TimestampResult] = field(default_factory=list)

    def figures(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "timestamps"}


def parse_timestamps(spec: str) -> list[tuple[str, int]]:
    """``"EXP-1-head:12,EXP-2-eyes:3"`` -> [(sequence, frame), ...]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        seq, _, frame = item.rpartition(":")
        if not seq or not frame.isdigit():
            raise InputValueError(f"timestamp {item!r} is not SEQUENCE:FRAME")
        out.append((seq, int(frame)))
    return out


def _check_timestamps(source, subject: str, timestamps: list[tuple[str, int]]) -> None:
    """Every (sequence, frame) exists in the capture; else ValueError naming the sequence or video."""
    known = source.sequences(subject)
    for seq, frame in timestamps:
        if seq not in known:
            raise InputValueError(f"{source.subject_dir(subject) / 'sequences'}: subject {subject} has no sequence "
                             f"{seq!r} (sequences: {', '.join(known)})")
        n = source.num_frames(subject, seq)
        if not 0 <= frame < n:
            raise InputValueError(f"{source.subject_dir(subject) / 'sequences' / seq}: frame {frame} out of range "
                             f"(0..{n - 1})")
        missing = source.missing_cameras(subject, seq)
        if missing:
            raise InputFileNotFound(f"{source.video_path(subject, seq, missing[0])}: video file not found (sequence "
                                    f"{seq} lacks camera(s) {', '.join(missing)}; every timestamp needs all views)")


def dense_backend(rcfg: ReconstructConfig) -> str:
    """The dense backend a run uses: "colmap" | "torch" | "none" ("auto": colmap where pycolmap has CUDA and
    a device exists, else torch). "colmap" without them is an error, before any output is touched."""
    from ..devices import colmap_cuda_available

    if rcfg.dense == "auto":
        return "colmap" if colmap_cuda_available() else "torch"
    if rcfg.dense == "colmap" and not colmap_cuda_available():
        raise InputValueError("reconstruct.dense = 'colmap' but no CUDA device with pycolmap-cuda12 is available "
                              "(PatchMatch stereo is CUDA-only; 'torch' runs on any device)")
    return rcfg.dense


def reconstruct_one(source, subject: str, cfg: PipelineConfig, work, sequence: str, frame: int,
                    images: dict | None = None, masks: dict | None = None) -> TimestampResult:
    """One timestamp into ``timestamp_dir``: COLMAP with the calibrated cameras, then its figures.

    ``images`` / ``masks`` may be given (already decoded; ``masks`` as (source, {serial: mask}) from
    :class:`ForegroundMasks`); otherwise they are read from ``source``.
    Whether a timestamp needs computing is the runner's decision (its unit marker), not this function's.
    """
    rcfg = cfg.reconstruct
    apply_thread_cap(cfg.threads)
    out = timestamp_dir(work, subject, sequence, frame)
    downscale = rcfg.downscale or cfg.capture.downscale
    if images is None:
        images = source.timestamp(subject, sequence, frame, downscale=downscale)
        masks = ForegroundMasks(source, subject, rcfg, downscale).of(sequence, [frame], {frame: images})[frame]
    kind, view_masks = masks if masks is not None else ("none", None)
    cameras = source.cameras(subject, downscale=downscale)
    res = reconstruct_timestamp(images, cameras, out, rcfg, masks=view_masks, dense=dense_backend(rcfg),
                                threads=cfg.threads)
    res.sequence, res.frame, res.foreground_source = sequence, frame, kind
    gt = source.ground_truth(subject)
    if gt is not None:
        _ground_truth_error(res, out, gt, sequence, frame)
        if view_masks is not None:
            res.foreground_iou = [round(mask_iou(view_masks[s] > 0.5, gt.view_maps(sequence, frame, s, downscale)["foreground"]), 4)
                                  for s in cameras]
    return res


class ForegroundMasks:
    """Each view's foreground for COLMAP: the capture's mattes when it has them, else segmented from
    its BACKGROUND plates (``foreground.py``), else none; ``use_masks = false`` turns both off."""

    def __init__(self, source, subject: str, rcfg: ReconstructConfig, downscale: float):
        self.source, self.subject, self.rcfg, self.downscale = source, subject, rcfg, downscale
        self._plates = None

    def plates(self) -> dict[str, np.ndarray] | None:
        if self._plates is None:
            self._plates = self.source.background_plates(self.subject, self.downscale) or {}
        return self._plates or None

    def of(self, sequence: str, frames: list[int], images: dict[int, dict[str, np.ndarray]] | None = None):
        """{frame: (kind, {serial: (H, W) float mask}) or None} for ``frames`` of ``sequence``;
        ``images`` the decoded views where plates are used (read from the source when absent)."""
        if not self.rcfg.use_masks:
            return {f: None for f in frames}
        mattes = self.source.timestamp_masks(self.subject, sequence, frames, downscale=self.downscale)
        if mattes is not None:
            return {f: ("mattes", m) for f, m in mattes}
        if self.plates() is None:
            return {f: None for f in frames}
        return {f: self.from_plates(images[f] if images is not None else
                                    self.source.timestamp(self.subject, sequence, f, self.downscale))
                for f in frames}

    def from_plates(self, views: dict[str, np.ndarray]):
        """("plates", {serial: (H, W) float32 mask}) of one timestamp's decoded views, segmented on
        threads (OpenCV releases the GIL); None when the capture has no plates or masks are off."""
        from concurrent.futures import ThreadPoolExecutor

        from ..foreground import foreground_from_plate

        plates = self.plates() if self.rcfg.use_masks else None
        if plates is None:
            return None
        fcfg = self.rcfg.foreground
        with ThreadPoolExecutor(pool_size(len(views))) as pool:
            masks = pool.map(lambda s: foreground_from_plate(views[s], plates[s], fcfg).astype(np.float32), list(views))
            return "plates", dict(zip(views, masks))


def summarize_reconstruct(subject: str, results: list[TimestampResult]) -> ReconstructResult:
    """The subject-level figures from the timestamps' results; ``kept`` lists the timestamps every
    later stage works on (the one list of a subject's kept timestamps)."""
    kept = [r for r in results if r.kept]
    errs = [r.gt_point_error_median_mm for r in kept if r.gt_point_error_median_mm is not None]
    ious = [v for r in results for v in (r.foreground_iou or [])]
    sources = sorted({r.foreground_source for r in results})
    return ReconstructResult(
        subject=subject, timestamps_total=len(results), timestamps_kept=len(kept),
        foreground_source="+".join(sources) if sources else "none",
        foreground_iou_min=round(float(np.min(ious)), 4) if ious else None,
        foreground_iou_median=round(float(np.median(ious)), 4) if ious else None,
        views_registered_min=min((sum(v.registered for v in r.views) for r in results), default=0),
        points_median=float(np.median([r.num_points for r in kept])) if kept else 0.0,
        dense=any(r.dense for r in results),
        dense_backend="+".join(sorted({r.dense_backend for r in kept})) or "none",
        dense_seconds_per_timestamp=round(float(np.mean([r.dense_seconds for r in kept])), 2) if kept else 0.0,
        seconds_per_timestamp=round(float(np.mean([r.total_seconds for r in results])), 2) if results else 0.0,
        gt_point_error_median_mm=round(float(np.median(errs)), 4) if errs else None,
        dropped={r.key: r.reason for r in results if not r.kept}, kept=[r.key for r in kept], timestamps=results)


def check_reconstruct(source, subject: str, cfg: PipelineConfig, timestamps: list[tuple[str, int]]) -> None:
    """Fail fast, before any output is touched: unknown timestamps, dense = "colmap" without a device."""
    _check_timestamps(source, subject, timestamps)
    dense_backend(cfg.reconstruct)


def reconstruct_timestamps(source, subject: str, cfg: PipelineConfig, work, timestamps: list[tuple[str, int]],
                           progress: Callable[[int, int], None] | None = None) -> Iterator[TimestampResult]:
    """Reconstruct ``timestamps`` in order, decoding each sequence's videos sequentially one timestamp
    ahead of COLMAP; yields each timestamp's result as it finishes."""
    rcfg = cfg.reconstruct
    downscale = rcfg.downscale or cfg.capture.downscale
    by_seq: dict[str, list[int]] = {}
    for seq, f in timestamps:
        by_seq.setdefault(seq, []).append(f)

    foreground = ForegroundMasks(source, subject, rcfg, downscale)

    def inputs():  # decoded one timestamp ahead of COLMAP
        for seq, frames in by_seq.items():
            mattes = source.timestamp_masks(subject, seq, frames, downscale=downscale) if rcfg.use_masks else None
            for frame, images in source.timestamps(subject, seq, frames, downscale=downscale):
                yield seq, frame, images, (("mattes", next(mattes)[1]) if mattes is not None else None)

    for done, (seq, frame, images, masks) in enumerate(prefetch(inputs(), depth=1, name="reconstruct-decode"), 1):
        t = time.perf_counter()
        if masks is None:  # no mattes: segmented here, not beside COLMAP (its threads stall when a core is taken)
            masks = foreground.from_plates(images)
        segmented_s = time.perf_counter() - t
        res = reconstruct_one(source, subject, cfg, work, seq, frame, images, masks)
        res.foreground_seconds = round(segmented_s, 3)
        log.info("%s %s/%06d: %s, %d points, %.1f s", subject, seq, frame,
                 "kept" if res.kept else f"dropped ({res.reason})", res.num_points, res.total_seconds)
        if progress:
            progress(done, len(timestamps))
        yield res


def run_reconstruct(source, subject: str, cfg: PipelineConfig, work, timestamps: list[tuple[str, int]],
                    progress: Callable[[int, int], None] | None = None) -> ReconstructResult:
    """Reconstruct the given timestamps now (no resume: that is the runner's) and summarize them."""
    timestamps = sorted(set(timestamps))
    check_reconstruct(source, subject, cfg, timestamps)
    return summarize_reconstruct(subject, list(reconstruct_timestamps(source, subject, cfg, work, timestamps,
                                                                      progress)))


def result_from_dict(d: dict) -> TimestampResult:
    """A :class:`TimestampResult` back from its JSON form (a unit marker's ``result``)."""
    d = dict(d)
    d["views"] = [ViewStats(**v) for v in d["views"]]
    return TimestampResult(**d)


def _ground_truth_error(res: TimestampResult, out: Path, gt, seq: str, frame: int) -> None:
    """Distance from each kept point to the ground-truth mesh of the timestamp (median, p90, mm)."""
    from ..meshes import point_to_mesh_distance

    if res.num_points == 0:
        return
    pts = read_points(out / "points.ply")["positions"]
    vertices, faces, _, _ = gt.scene(seq, frame)  # the whole subject: torso and hair points are real points
    d = point_to_mesh_distance(vertices, faces, pts) * 1000
    res.gt_point_error_median_mm = round(float(np.median(d)), 4)
    res.gt_point_error_p90_mm = round(float(np.percentile(d, 90)), 4)
