"""Stage ``track``: fit FLAME to all kept timestamps of a subject jointly.

Shared by every timestamp: one identity shape and one set of static per-vertex offsets (FlowFace's
static deformations). Per timestamp: expression, jaw, neck, eyes, and the rigid head transform.
Cameras are fixed (calibrated). Observations: each timestamp's reconstructed points and the MediaPipe
landmarks detected in every view where a face is found (mapped onto the mesh by the landmark
embedding).

Energy (weights in ``[track]``):
  landmarks  Huber(|project(embedded landmark) - detection|, px), averaged over detections
  points     Huber(|point - closest surface point|, mm) over points within ``point_max_distance_mm``;
             the closest point is exact (open3d, triangle + barycentrics), refreshed every
             ``refresh_every`` steps, and differentiable through the barycentric combination
  priors     shape and expression coefficients (L2), jaw / neck / eye rotations (L2, radians)
  offsets    L2 size (mm) and a sparse uniform mesh Laplacian (smoothness); zero on ``offset_free_masks``
No temporal term: selected timestamps are not consecutive.

Stages (all timestamps in one batched tensor program, Adam, early stop on relative loss change):
rigid from landmarks -> + shape and expression -> + point-to-surface -> + static offsets. The rigid
pose starts from a Procrustes fit of the template's landmarks to landmarks triangulated from all views.

Outliers: per timestamp the unidirectional L1 chamfer (mean point-to-mesh distance of the head points,
the paper's CD-L1, mm; a point is head when its nearest surface point is outside ``stats_exclude_masks``
(the neck) and within ``stats_max_distance_mm``, so torso, clothing and studio never count) and the
landmark error (median px); timestamps beyond median + k * MAD of either are dropped and the subject is
fitted again without them, once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import StageDir, atomic_write
from ..cameras import Camera, read_cameras_json
from ..config import PipelineConfig, TrackConfig
from ..meshes import closest_points
from ..threads import apply_thread_cap
from ..sampling import bounded_subset
from .reconstruct import read_points, timestamp_dir
from ..errors import InputError, InputValueError

# Diagnostic regions of the tracked mesh (mask names or unions, flame/assets.py): per-region CD-L1 and
# errors.png. The neck's figure includes whatever clothing lies within stats_max_distance_mm of it.
REGIONS = ("face", "scalp", "ears", "neck")

log = logging.getLogger(__name__)
STAGE = "track"


@dataclass
class TimestampObservation:
    """Inputs of one timestamp. points: (N, 3) m. cameras: serial -> Camera (working resolution).
    landmarks: serial -> (L, 2) px of the embedded MediaPipe landmarks (views with a face)."""

    sequence: str
    frame: int
    points: np.ndarray
    cameras: dict[str, Camera]
    landmarks: dict[str, np.ndarray]
    image_dir: Path | None = None  # the views as PNG (for the overlay), when there are images

    @property
    def key(self) -> str:
        return f"{self.sequence}/{self.frame:06d}"


@dataclass
class TrackResult:
    subject: str
    timestamps_in: int
    timestamps_kept: int
    outliers_removed: int
    cd_l1_mm_median: float
    landmark_px_median: float
    points_excluded_fraction: float  # median over kept timestamps: points not counted as head by the stats
    seconds: float
    device: str
    gt_vertex_error_mm_mean: float | None = None  # only when the ground truth has the model's topology
    gt_surface_error_mm_mean: float | None = None
    # The canonical mesh's face vertices against the true neutral head (same topology, track.canonical
    # "subject"), mean mm: what the canonical maps inherit, which the posed error hides where the rigid
    # pose absorbs a shift of the whole canonical head.
    gt_canonical_vertex_error_mm_mean: float | None = None
    # Median over kept timestamps of CD-L1 per region (REGIONS) the masks file names, mm.
    cd_l1_mm_by_region: dict[str, float] = field(default_factory=dict)
    # Largest |mean over kept timestamps| of an expression coefficient, in prior standard deviations
    # (FLAME's coefficients are unit-variance): identity leaking into the expression shows as a bias.
    expression_bias: float | None = None
    timestamp_detail_mm_mean: float | None = None  # with track.timestamp_detail: mean |offset| over vertices
    outliers: dict[str, str] = field(default_factory=dict)
    per_timestamp: list[dict] = field(default_factory=list)

    def figures(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "per_timestamp"}


# ---------------------------------------------------------------------------------------------
# observations


def load_observations(work, subject: str, keys: list[str], landmark_indices: np.ndarray, source=None,
                      cfg: PipelineConfig | None = None) -> list[TimestampObservation]:
    """The given kept timestamps (``"SEQ/FRAME"`` keys, from reconstruct's figures) with their points,
    cameras and per-view landmarks (views from :func:`~.reconstruct.view_images`: ``source`` and ``cfg``
    decode them again where a light build pruned them)."""
    from ..facemesh import FaceMeshDetector
    from .reconstruct import view_images

    obs = []
    with FaceMeshDetector(static_image_mode=True) as det:
        for key in keys:
            seq, frame = key.rsplit("/", 1)
            folder = timestamp_dir(work, subject, seq, int(frame))
            cams = read_cameras_json(folder / "cameras.json")
            lms = {}
            images = view_images(source, subject, cfg, work, seq, int(frame), list(cams))
            for s in cams:
                lm = det.detect(images[s])
                if lm is not None:
                    lms[s] = lm[landmark_indices, :2].astype(np.float64)
            points = read_points(folder / "points.ply")["positions"]
            limit = cfg.track.max_points_per_timestamp if cfg is not None else 0
            points = points[bounded_subset(len(points), limit)]
            obs.append(TimestampObservation(seq, int(frame), points.astype(np.float64), cams, lms, folder / "images"))
    return obs


def triangulate(points2d: dict[str, np.ndarray], cameras: dict[str, Camera]) -> np.ndarray:
    """Linear (DLT) triangulation of (L, 2) detections in several views -> (L, 3) m."""
    serials = [s for s in points2d if s in cameras]
    projections = {s: cameras[s].K @ cameras[s].world_2_cam[:3] for s in serials}
    n = len(next(iter(points2d.values())))
    out = np.zeros((n, 3))
    for i in range(n):
        rows = []
        for s in serials:
            p, (u, v) = projections[s], points2d[s][i]
            rows += [u * p[2] - p[0], v * p[2] - p[1]]
        _, _, vt = np.linalg.svd(np.asarray(rows))
        out[i] = vt[-1, :3] / vt[-1, 3]
    return out


# ---------------------------------------------------------------------------------------------
# the fit


class _Fitter:
    """All timestamps batched; parameters are torch leaves grouped by stage."""

    def __init__(self, assets, obs: list[TimestampObservation], tcfg: TrackConfig, device: str):
        import torch

        from ..flame.lbs import FlameLayer, FlameParams

        self.torch, self.tcfg, self.obs, self.device = torch, tcfg, obs, device
        model = assets.model
        self.layer = FlameLayer(model).to(device)
        self.faces = model.faces
        self.faces_t = torch.as_tensor(model.faces, device=device)
        emb = assets.embedding
        if emb is None:
            raise InputValueError("tracking needs a MediaPipe landmark embedding (flame.embedding)")
        self.lmk_faces = torch.as_tensor(model.faces[emb.face_idx], device=device)  # (L, 3)
        self.lmk_bary = torch.as_tensor(emb.bary, dtype=torch.float32, device=device)
        t = len(obs)
        ns, ne = min(tcfg.num_shape, model.num_shape), min(tcfg.num_expression, model.num_expression)
        p = FlameParams.zeros(t, ns, ne, device=device)
        p.offsets = torch.zeros(model.num_vertices, 3, device=device)
        self.params = p
        # Cameras and detections as padded tensors: (T, C, 3, 4) projections, (T, C, L, 2) px, (T, C) valid.
        serials = sorted(obs[0].cameras)
        proj = np.stack([[o.cameras[s].K @ o.cameras[s].world_2_cam[:3] for s in serials] for o in obs])
        n_l = len(emb.mediapipe_idx)
        det = np.zeros((t, len(serials), n_l, 2))
        valid = np.zeros((t, len(serials)), bool)
        for i, o in enumerate(obs):
            for c, s in enumerate(serials):
                if s in o.landmarks:
                    det[i, c], valid[i, c] = o.landmarks[s], True
        self.proj = torch.as_tensor(proj, dtype=torch.float32, device=device)
        self.det = torch.as_tensor(det, dtype=torch.float32, device=device)
        self.valid = torch.as_tensor(valid, device=device)
        self.points = [torch.as_tensor(o.points, dtype=torch.float32, device=device) for o in obs]
        self.corr: list[tuple] | None = None
        self.head_vertices = np.ones(model.num_vertices, bool)  # where a point's nearest surface counts
        for name in tcfg.stats_exclude_masks:
            self.head_vertices[assets.mask(name)] = False
        self.covered_vertices = np.zeros(model.num_vertices, bool)  # where hair may lie over the skin
        for name in tcfg.covered_masks:
            self.covered_vertices[assets.mask(name)] = True
        self.regions = {}  # (V,) bool per diagnostic region the masks file can name
        for name in REGIONS:
            try:
                self.regions[name] = np.isin(np.arange(model.num_vertices), assets.mask(name))
            except InputError:
                continue
        free = np.ones(model.num_vertices, np.float32)
        for name in tcfg.offset_free_masks:
            free[assets.mask(name)] = 0.0
        self.offset_mask = torch.as_tensor(free[:, None], device=device)
        self.laplacian = uniform_laplacian(model.num_vertices, model.faces, device)
        # Coarse static offsets: a field on the mesh's K smoothest eigenfunctions (manifold harmonics),
        # (V, K) at unit RMS per column, with coefficients (K, 3) m; folded into the offsets after the fit.
        k = min(tcfg.offset_coarse_basis, model.num_vertices - 2)
        self.coarse_basis = torch.as_tensor(smooth_basis(model.num_vertices, model.faces, k), device=device) \
            if k > 0 else None
        self.coarse = torch.zeros(max(k, 0), 3, device=device)
        # Per-timestamp expression detail the expression basis lacks (wrinkles, asymmetric pulls), (T, V, 3)
        # m in rest space: posed with the head, so the canonical mesh (static offsets only) maps it out.
        self.detail = torch.zeros(t, model.num_vertices, 3, device=device) if tcfg.timestamp_detail else None
        self._init_rigid(assets, emb)

    # -- initialization ------------------------------------------------------------------------
    def _init_rigid(self, assets, emb) -> None:
        """Rigid pose per timestamp: template landmarks -> landmarks triangulated from all views."""
        from ..features import rotvec_from_matrix, umeyama

        torch = self.torch
        template_lmk = emb.points(assets.model.v_template, assets.model.faces)
        j0 = (assets.model.J_regressor @ assets.model.v_template)[0]
        for i, o in enumerate(self.obs):
            if len(o.landmarks) < 2:
                continue
            target = triangulate(o.landmarks, o.cameras)
            s, r, t = umeyama(template_lmk.astype(np.float64), target)
            # FLAME rotates about the root joint: v' = R (v - J0) + J0 + translation.
            self.params.global_rot[i] = torch.as_tensor(rotvec_from_matrix(r), dtype=torch.float32)
            self.params.translation[i] = torch.as_tensor(t + r @ j0 - j0, dtype=torch.float32)

    # -- energy --------------------------------------------------------------------------------
    def static_offsets(self):
        """(V, 3) m: the fine per-vertex offsets plus the coarse field, rigid parts held at zero."""
        offsets = self.params.offsets
        if self.coarse_basis is not None:
            offsets = offsets + self.coarse_basis @ self.coarse
        return offsets * self.offset_mask

    def vertices(self):
        """(T, V, 3) m posed meshes: static offsets, plus each timestamp's detail when fitted."""
        from dataclasses import replace

        offsets = self.static_offsets()
        if self.detail is not None:
            offsets = offsets[None] + self.detail * self.offset_mask
        return self.layer(replace(self.params, offsets=offsets))

    def fold_coarse_offsets(self) -> None:
        """Move the coarse field into ``params.offsets`` (what is saved and canonicalized)."""
        if self.coarse_basis is not None:
            with self.torch.no_grad():
                self.params.offsets = self.params.offsets + self.coarse_basis @ self.coarse
                self.coarse.zero_()

    def point_gate_mm(self, stage: int, step: int, steps: int) -> float:
        """The distance beyond which a point is not matched: annealed geometrically from
        ``point_gate_start_mm`` to ``point_max_distance_mm`` over the first points stage, so regions that
        start far (a wider jaw, the back of the head) are pulled in before it tightens; tight after."""
        c = self.tcfg
        start, end = max(c.point_gate_start_mm, c.point_max_distance_mm), c.point_max_distance_mm
        if stage > 2 or steps <= 1:
            return end
        return float(start * (end / start) ** min(1.0, step / (0.6 * steps)))

    def landmark_residual_px(self, verts):
        """(T, C, L) reprojection distance of the embedded landmarks, px (detections only)."""
        tri = verts[:, self.lmk_faces]  # (T, L, 3, 3)
        lmk = (tri * self.lmk_bary[None, :, :, None]).sum(2)  # (T, L, 3)
        homo = self.torch.cat([lmk, self.torch.ones_like(lmk[..., :1])], -1)  # (T, L, 4)
        uvw = self.torch.einsum("tcij,tlj->tcli", self.proj, homo)
        uv = uvw[..., :2] / uvw[..., 2:3].clamp_min(1e-6)
        return (uv - self.det).norm(dim=-1)

    def refresh_correspondences(self, verts, gate_mm: float | None = None) -> None:
        """Exact closest surface points (triangle + barycentrics) of every point, per timestamp, within
        ``gate_mm`` (default ``point_max_distance_mm``); beyond that tight gate only points nearest the
        head count (excluded by region: clothing and torso snap to the neck). Each kept point also
        records whether its nearest vertex is in ``covered_masks`` (see ``point_residual_mm``)."""
        self.corr = []
        v_np = verts.detach().cpu().numpy()
        tight = self.tcfg.point_max_distance_mm / 1000.0
        limit = max(gate_mm / 1000.0, tight) if gate_mm is not None else tight
        for i, pts in enumerate(self.points):
            closest, tri, bary = closest_points(v_np[i], self.faces, pts.cpu().numpy())
            dist = np.linalg.norm(closest - pts.cpu().numpy(), axis=1)
            nearest_vertex = self.faces[tri, np.argmax(bary, 1)]
            head = self.head_vertices[nearest_vertex]
            near = (dist < tight) | ((dist < limit) & head)
            covered = self.covered_vertices[nearest_vertex]
            t = self.torch
            self.corr.append((t.as_tensor(np.where(near)[0], device=self.device),
                              t.as_tensor(tri[near], device=self.device),
                              t.as_tensor(bary[near], dtype=t.float32, device=self.device),
                              t.as_tensor(covered[near], device=self.device)))

    def point_residual_mm(self, verts) -> list:
        """Per timestamp, (N_i,) mm: distance of each matched point to its surface point. Points matched
        in a covered region (hair over the scalp) count only when they lie inside the surface (behind
        its outward normal): what stands outside there is volume the model has no surface for, and
        fitting it would inflate the skull and, through the shape, move the face in canonical space."""
        out = []
        for i, (idx, tri, bary, covered) in enumerate(self.corr):
            corners = verts[i][self.faces_t[tri]]  # (N, 3, 3) m
            surf = (corners * bary[..., None]).sum(1)
            delta = self.points[i][idx] - surf
            res = delta.norm(dim=-1) * 1000.0
            if bool(covered.any()):
                normal = self.torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
                outside = (delta * normal).sum(-1) > 0
                res = res[~(covered & outside)]
            out.append(res)
        return out

    def loss(self, verts, stage: int):
        torch, c, p = self.torch, self.tcfg, self.params
        lmk = self.landmark_residual_px(verts)
        valid = self.valid[:, :, None].expand_as(lmk)
        w_lmk = c.landmark_weight * (c.landmark_weight_with_points if stage >= 2 else 1.0)
        total = w_lmk * _huber(lmk[valid], c.landmark_huber_px).mean()
        if stage >= 1:
            total = total + c.shape_prior * (p.shape ** 2).sum() + c.expression_prior * (p.expression ** 2).sum(1).mean()
            # Identity stays out of the expression: a coefficient's mean over the subject's timestamps is
            # pulled to zero (performances are mostly near-neutral), so no constant bias can stand in for
            # what the shape basis lacks.
            total = total + c.expression_mean_prior * (p.expression.mean(0) ** 2).sum()
            total = total + c.jaw_prior * (p.jaw ** 2).sum(1).mean() + c.neck_prior * (p.neck ** 2).sum(1).mean()
            total = total + c.eye_prior * ((p.left_eye ** 2).sum(1) + (p.right_eye ** 2).sum(1)).mean()
        if stage >= 2:
            res = torch.cat(self.point_residual_mm(verts))
            if len(res):
                total = total + c.point_weight * _huber(res, c.point_huber_mm).mean()
        if stage >= 2 and self.coarse_basis is not None:
            # Coarse field: regularised by smoothness, hardly by size, so centimetres are reachable.
            coarse_mm = (self.coarse_basis @ self.coarse) * self.offset_mask * 1000.0
            lap = torch.sparse.mm(self.laplacian, coarse_mm)
            total = total + c.offset_coarse_laplacian * (lap ** 2).sum(1).mean() / 1e2
            total = total + c.offset_coarse_l2 * (coarse_mm ** 2).sum(1).mean() / 1e2
        if stage >= 3:
            off_mm = p.offsets * self.offset_mask * 1000.0
            total = total + c.offset_l2 * (off_mm ** 2).sum(1).mean() / 1e2
            lap = torch.sparse.mm(self.laplacian, off_mm)
            total = total + c.offset_laplacian * (lap ** 2).sum(1).mean() / 1e2
        if stage >= 3 and self.detail is not None:
            # Small (a strong prior toward zero: what all timestamps share belongs to the static offsets)
            # and smooth; (T, V, 3) -> the Laplacian over (V, 3T).
            det_mm = (self.detail * self.offset_mask) * 1000.0
            total = total + c.timestamp_detail_l2 * (det_mm ** 2).sum(-1).mean() / 1e2
            flat = det_mm.permute(1, 0, 2).reshape(det_mm.shape[1], -1)
            lap = torch.sparse.mm(self.laplacian, flat)
            total = total + c.timestamp_detail_laplacian * (lap ** 2).sum(1).mean() / det_mm.shape[0] / 1e2
        return total

    def groups(self, stage: int) -> list[dict]:
        """Adam parameter groups with step sizes in each group's own units (rad, m, coefficients)."""
        p, lr = self.params, self.tcfg.learning_rate
        g = [{"params": [p.global_rot], "lr": 0.5 * lr},  # rad
             {"params": [p.translation], "lr": 0.05 * lr}]  # m: 0.5 mm steps at lr = 0.01
        if stage >= 1:
            g += [{"params": [p.shape, p.expression], "lr": 2.0 * lr},  # unit-variance coefficients
                  {"params": [p.jaw, p.neck, p.left_eye, p.right_eye], "lr": 0.5 * lr}]
        if stage >= 2 and self.coarse_basis is not None:
            g += [{"params": [self.coarse], "lr": 0.1 * lr}]  # m (RMS of a field): 1 mm steps
        if stage >= 3:
            g += [{"params": [p.offsets], "lr": 0.02 * lr}]  # m: 0.2 mm steps
        if stage >= 3 and self.detail is not None:
            g += [{"params": [self.detail], "lr": 0.01 * lr}]  # m: 0.1 mm steps
        return g

    def fit(self, progress: Callable[[str], None] | None = None) -> None:
        """The four stages; each decays its step sizes (cosine) to 5 % and stops early when flat."""
        torch, c = self.torch, self.tcfg
        for stage, steps in enumerate(c.iterations):
            groups = self.groups(stage)
            tensors = [t for g in groups for t in g["params"]]
            for t in tensors:
                t.requires_grad_(True)
            opt = torch.optim.Adam(groups)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda k, n=max(steps, 1): 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(k, n) / n)))
            history: list[float] = []
            for step in range(steps):
                if stage >= 2 and (self.corr is None or step % c.refresh_every == 0):
                    with torch.no_grad():
                        self.refresh_correspondences(self.vertices(), self.point_gate_mm(stage, step, steps))
                opt.zero_grad()
                loss = self.loss(self.vertices(), stage)
                loss.backward()
                opt.step()
                sched.step()
                history.append(loss.item())
                if len(history) > 20 and abs(history[-21] - history[-1]) < c.early_stop_rel * abs(history[-21]) * 20:
                    break
            if progress:
                progress(f"stage {stage}: {len(history)} steps, loss {history[-1] if history else float('nan'):.4f}")
            for t in tensors:
                t.requires_grad_(False)
            if stage >= 2:
                self.corr = None  # the next stage starts from correspondences at its own gate
        self.fold_coarse_offsets()

    # -- per-timestamp errors ------------------------------------------------------------------
    def errors(self) -> "FitErrors":
        """The fit's per-timestamp errors at the current parameters, from one closest-point pass per
        timestamp (see :class:`FitErrors`)."""
        torch = self.torch
        t, n_vertices = len(self.obs), len(self.head_vertices)
        cd, excluded = np.full(t, np.nan), np.zeros(t)
        by_region = {name: np.full(t, np.nan) for name in self.regions}
        total, count = np.zeros(n_vertices), np.zeros(n_vertices)
        with torch.no_grad():
            verts = self.vertices()
            v_np = verts.cpu().numpy().astype(np.float32)
            for i, pts in enumerate(self.points):
                if not len(pts):
                    continue
                dist_mm, vertex, outside = point_distances(v_np[i], self.faces, pts.cpu().numpy())
                near = dist_mm <= self.tcfg.stats_max_distance_mm
                # As in the fit: what stands outside a covered region (hair over the scalp) is not head.
                head = near & self.head_vertices[vertex] & ~(self.covered_vertices[vertex] & outside)
                cd[i] = dist_mm[head].mean() if head.any() else np.nan
                excluded[i] = 1.0 - head.mean()
                for name, in_region in self.regions.items():
                    sel = near & in_region[vertex]
                    if sel.any():
                        by_region[name][i] = dist_mm[sel].mean()
                np.add.at(total, vertex[near], dist_mm[near])
                np.add.at(count, vertex[near], 1)
            lmk = self.landmark_residual_px(verts)
            lm = np.array([float(lmk[i][self.valid[i]].median()) if self.valid[i].any() else np.nan
                           for i in range(t)])
        with np.errstate(invalid="ignore", divide="ignore"):
            residual = total / count
        return FitErrors(cd, lm, excluded, by_region, residual)


@dataclass
class FitErrors:
    """cd_l1_mm (T,): mean distance of the *head* points to the tracked mesh, mm (the paper's
    unidirectional L1 chamfer): points whose nearest mesh vertex is outside ``stats_exclude_masks`` and
    within ``stats_max_distance_mm`` (torso and clothing snap to the neck; studio lies far), and not
    outside a ``covered_masks`` region (hair over the scalp, which the fit does not chase either).
    landmark_px (T,): median landmark reprojection error. excluded (T,): fraction of points not head.
    by_region {REGIONS name: (T,)}: the mean over all points within ``stats_max_distance_mm`` nearest
    each region (NaN where none): the scalp's includes the hair standing off it, the neck's the collar.
    vertex_residual (V,): mean distance of the points nearest each vertex over all timestamps, mm."""

    cd_l1_mm: np.ndarray
    landmark_px: np.ndarray
    excluded: np.ndarray
    by_region: dict[str, np.ndarray]
    vertex_residual: np.ndarray


def point_distances(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance of (N, 3) points to the mesh (V, 3) m, in mm (N,); the mesh vertex (N,) nearest to each
    point's closest surface point; and (N,) bool whether the point lies outside (in front of that
    triangle's outward normal)."""
    closest, tri, bary = closest_points(vertices, faces, points)
    corners = vertices[faces[tri]]  # (N, 3, 3)
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    outside = ((points - closest) * normal).sum(1) > 0
    return np.linalg.norm(points - closest, axis=1) * 1000, faces[tri, np.argmax(bary, 1)], outside


def _huber(x, delta: float):
    a = x.abs()
    return (a.clamp(max=delta) ** 2) / 2 + delta * (a - a.clamp(max=delta))


def smooth_basis(n: int, faces: np.ndarray, k: int) -> np.ndarray:
    """(n, k) float32: the k smoothest functions on the mesh (eigenvectors of the graph Laplacian
    D - A with the smallest eigenvalues, mass-weighted), each scaled to unit RMS over the vertices.
    scipy's shift-invert Lanczos: under a second for FLAME's 5023 vertices and k = 64."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    from ..meshes import adjacency

    a = adjacency(n, faces).astype(np.float64)
    deg = np.asarray(a.sum(1)).ravel()
    lap = sp.diags(deg) - a
    mass = sp.diags(np.maximum(deg, 1.0))
    _, vecs = eigsh(lap.tocsc(), k=k, M=mass.tocsc(), sigma=-1e-3, which="LM", v0=np.ones(n))
    vecs /= np.maximum(np.sqrt((vecs ** 2).mean(0)), 1e-12)
    return vecs.astype(np.float32)


def uniform_laplacian(n: int, faces: np.ndarray, device="cpu"):
    """Sparse (V, V) uniform graph Laplacian L = I - D^-1 A as a torch COO tensor (never dense)."""
    import scipy.sparse as sp
    import torch

    from ..meshes import adjacency

    a = adjacency(n, faces)
    deg = np.asarray(a.sum(1)).ravel()
    lap = (sp.eye(n) - sp.diags(1.0 / np.maximum(deg, 1)) @ a).tocoo()
    idx = torch.as_tensor(np.vstack([lap.row, lap.col]), dtype=torch.long)
    lap_t = torch.sparse_coo_tensor(idx, torch.as_tensor(lap.data, dtype=torch.float32), (n, n),
                                    check_invariants=True)
    return lap_t.coalesce().to(device)


def _mad_outliers(values: np.ndarray, k: float, floor: float) -> np.ndarray:
    """values > median + k * MAD, the MAD floored at ``floor`` x median (a tight cluster of good fits
    would otherwise flag ordinary variation)."""
    med = np.nanmedian(values)
    mad = max(np.nanmedian(np.abs(values - med)), floor * abs(med), 1e-9)
    return values > med + k * mad


# ---------------------------------------------------------------------------------------------


def pick_device(requested: str) -> str:
    from ..devices import pick_torch_device

    return pick_torch_device(requested, "track.device")


def tracking_assets(cfg: PipelineConfig):
    """The pipeline's head model, which tracking needs with its MediaPipe landmark embedding."""
    from ..flame.assets import AssetError, load_assets

    assets = load_assets(cfg.flame)
    if assets.embedding is None:
        raise AssetError(f"{cfg.source_file or 'the pipeline'}: flame.embedding is not set; tracking needs the "
                         "MediaPipe landmark embedding (mediapipe_landmark_embedding.npz, see flame_assets/README.md)")
    for name in cfg.track.offset_free_masks + cfg.track.stats_exclude_masks:  # a name the file lacks fails here
        assets.mask(name)
    return assets


def run_track(source, subject: str, cfg: PipelineConfig, work, device: str | None = None,
              observations: list[TimestampObservation] | None = None, timestamps: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> TrackResult:
    """Fit a subject (see module docstring) and write ``{work}/{subject}/track/``.

    The observations are ``observations`` when given, else loaded for ``timestamps`` (reconstruct's
    kept ``"SEQ/FRAME"`` keys)."""
    import torch

    tcfg = cfg.track
    dev = pick_device(device or tcfg.device)
    assets = tracking_assets(cfg)
    t0 = time.perf_counter()
    if observations is None:
        observations = load_observations(work, subject, timestamps or [], assets.embedding.mediapipe_idx, source, cfg)
    obs = observations
    if not obs:
        raise InputValueError(f"subject {subject}: no kept timestamps to track")
    out = StageDir(work, subject, STAGE)
    out.path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    apply_thread_cap(cfg.threads)
    fitter = _Fitter(assets, obs, tcfg, dev)
    fitter.fit(progress)
    first = fitter.errors()
    cd, lm = first.cd_l1_mm, first.landmark_px
    bad_cd = _mad_outliers(cd, tcfg.outlier_mad_k, tcfg.outlier_mad_floor)
    bad_lm = _mad_outliers(lm, tcfg.outlier_mad_k, tcfg.outlier_mad_floor)
    bad = bad_cd | bad_lm
    reasons = {}
    for i in np.where(bad)[0]:
        why = []
        if bad_cd[i]:
            why.append(f"CD-L1 {cd[i]:.2f} mm > median {np.nanmedian(cd):.2f} + {tcfg.outlier_mad_k} MAD")
        if bad_lm[i]:
            why.append(f"landmark error {lm[i]:.2f} px > median {np.nanmedian(lm):.2f} + {tcfg.outlier_mad_k} MAD")
        reasons[obs[i].key] = "; ".join(why)
    if bad.any() and (~bad).sum() >= 1:
        kept_obs = [o for o, b in zip(obs, bad) if not b]
        fitter = _Fitter(assets, kept_obs, tcfg, dev)  # refit the shared parameters without them, once
        fitter.fit(progress)
        final = fitter.errors()
    else:
        kept_obs, final = obs, first
    cd_k, lm_k, excluded_k, region_cd = final.cd_l1_mm, final.landmark_px, final.excluded, final.by_region
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        verts = fitter.vertices().cpu().numpy()
        canonical = _canonical(fitter, tcfg).cpu().numpy()
        expression = fitter.params.expression.cpu().numpy()
        detail_mm = None if fitter.detail is None else \
            float((fitter.detail * fitter.offset_mask).norm(dim=-1).mean()) * 1000
    result = TrackResult(subject=subject, timestamps_in=len(obs), timestamps_kept=len(kept_obs),
                         outliers_removed=int(bad.sum()), cd_l1_mm_median=round(float(np.nanmedian(cd_k)), 4),
                         landmark_px_median=round(float(np.nanmedian(lm_k)), 4),
                         points_excluded_fraction=round(float(np.median(excluded_k)), 4), seconds=round(seconds, 1),
                         device=dev, outliers=reasons,
                         cd_l1_mm_by_region={k: round(float(np.nanmedian(v)), 4) for k, v in region_cd.items()
                                             if np.isfinite(v).any()},
                         expression_bias=round(float(np.abs(expression.mean(0)).max()), 4) if expression.size else None,
                         timestamp_detail_mm_mean=None if detail_mm is None else round(detail_mm, 4))
    gt = source.ground_truth(subject) if source is not None else None
    if gt is not None:
        _ground_truth_errors(result, gt, assets, kept_obs, verts, canonical if tcfg.canonical == "subject" else None)
    kept_index = {o.key: i for i, o in enumerate(kept_obs)}
    for i, o in enumerate(obs):
        j = kept_index.get(o.key)
        result.per_timestamp.append({
            "sequence": o.sequence, "frame": o.frame, "kept": j is not None,
            "cd_l1_mm": float(cd_k[j]) if j is not None else float(first.cd_l1_mm[i]),
            "landmark_px": float(lm_k[j]) if j is not None else float(first.landmark_px[i]),
            "points_excluded_fraction": float(excluded_k[j]) if j is not None else float(first.excluded[i]),
            "views_with_landmarks": len(o.landmarks), "reason": reasons.get(o.key, ""),
            **{f"cd_l1_mm_{k}": float(v[j]) if j is not None else float("nan") for k, v in region_cd.items()}})
    _write_outputs(out, fitter, kept_obs, verts, canonical, result, cfg, final.vertex_residual)
    return result


def _ground_truth_errors(result: TrackResult, gt, assets, kept_obs: list, verts: np.ndarray,
                         canonical: np.ndarray | None = None) -> None:
    """Face-region error of the tracked meshes ``verts`` (T, V, 3) m against the ground truth, in mm:
    ``gt_surface_error_mm_mean`` (tracked face vertices to the ground-truth head surface) always;
    ``gt_vertex_error_mm_mean`` (vertex to same vertex) only when the ground truth has the tracked
    model's topology: with any other mesh, vertex ids do not correspond; with the same topology and a
    subject ``canonical`` mesh (V, 3) m also ``gt_canonical_vertex_error_mm_mean``."""
    from ..meshes import point_to_mesh_distance

    face = assets.masks.get("face", np.arange(verts.shape[1]))
    same_topology = np.array_equal(np.asarray(gt.faces), np.asarray(assets.model.faces))
    vertex_errs, surface_errs = [], []
    for i, o in enumerate(kept_obs):
        true = gt.frame(o.sequence, o.frame)["vertices"]
        surface_errs.append(point_to_mesh_distance(true, gt.faces, verts[i][face]).mean())
        if same_topology:
            vertex_errs.append(np.linalg.norm(verts[i][face] - true[face], axis=1).mean())
    result.gt_surface_error_mm_mean = round(float(np.mean(surface_errs)) * 1000, 4)
    if vertex_errs:
        result.gt_vertex_error_mm_mean = round(float(np.mean(vertex_errs)) * 1000, 4)
    if same_topology and canonical is not None:
        err = np.linalg.norm(canonical[face] - np.asarray(gt.canonical_vertices())[face], axis=1).mean()
        result.gt_canonical_vertex_error_mm_mean = round(float(err) * 1000, 4)


def _canonical(fitter: _Fitter, tcfg: TrackConfig):
    p = fitter.params
    from dataclasses import replace

    params = replace(p, offsets=p.offsets * fitter.offset_mask)
    return fitter.layer.canonical_vertices(params, template=tcfg.canonical == "template")


def _write_outputs(out: StageDir, fitter: _Fitter, kept_obs, verts, canonical, result: TrackResult, cfg,
                   vertex_residual: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = fitter.params.to_numpy()
    if fitter.detail is not None:  # (T, V, 3) m, per kept timestamp
        p["timestamp_offsets"] = (fitter.detail * fitter.offset_mask).detach().cpu().numpy()
    keys = np.array([o.key for o in kept_obs])
    atomic_write(out.file("params.npz"), lambda f: np.savez(f, keys=keys, **p))
    atomic_write(out.file("vertices.npz"), lambda f: np.savez(
        f, keys=keys, tracked=verts.astype(np.float32), canonical=canonical.astype(np.float32),
        faces=fitter.faces, canonical_kind=np.array(cfg.track.canonical)))
    rows = result.per_timestamp
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    atomic_write(out.file("errors.parquet"), lambda f: pq.write_table(table, f))
    atomic_write(out.file("errors.png"), lambda f: _plot_errors(rows, f, cfg.track.outlier_mad_k))
    atomic_write(out.file("overlay.png"), lambda f: _overlay(kept_obs, verts, fitter.faces, f))
    atomic_write(out.file("residual.png"), lambda f: _plot_residual(canonical, fitter.faces, vertex_residual, f))


def _plot_errors(rows, path, k) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = [k[len("cd_l1_mm_"):] for k in rows[0] if k.startswith("cd_l1_mm_")]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.35 * len(rows) + 2), 8.5), sharex=True)
    x = np.arange(len(rows))
    colors = ["tab:blue" if r["kept"] else "tab:red" for r in rows]
    for ax, key, unit in ((axes[0], "cd_l1_mm", "CD-L1, head (mm)"), (axes[2], "landmark_px", "landmark error (px)")):
        ax.bar(x, [r[key] for r in rows], color=colors)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    width = 0.8 / max(len(regions), 1)
    for k, name in enumerate(regions):  # where the fit stays off: one bar per region and timestamp
        axes[1].bar(x - 0.4 + (k + 0.5) * width, [r[f"cd_l1_mm_{name}"] for r in rows], width, label=name)
    axes[1].set_ylabel("CD-L1 by region (mm)")
    axes[1].grid(axis="y", alpha=0.3)
    if regions:
        axes[1].legend(fontsize=7, ncol=len(regions))
    axes[2].set_xticks(x, [f"{r['sequence']}/{r['frame']}" for r in rows], rotation=70, fontsize=7)
    axes[0].set_title(f"Tracking error per timestamp\n(red: removed as outlier, > median + {k} MAD)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _plot_residual(canonical: np.ndarray, faces: np.ndarray, residual_mm: np.ndarray, path) -> None:
    """The canonical mesh seen from the front and from the left, each vertex coloured by the mean
    distance, mm, of the points nearest it over all kept timestamps (grey: no point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    v = canonical[0] if canonical.ndim == 3 else canonical
    fin = np.isfinite(residual_mm)
    top = float(np.percentile(residual_mm[fin], 98)) if fin.any() else 1.0
    cmap = plt.get_cmap("magma_r")
    fig, axes = plt.subplots(1, 2, figsize=(9, 5))
    # (horizontal axis, vertical axis, depth axis, its sign toward the viewer): from +z and from -x.
    for ax, (a, b, depth, sign, title) in zip(axes, ((0, 1, 2, 1, "front"), (2, 1, 0, -1, "right side"))):
        tri = v[faces]
        order = np.argsort(sign * tri[:, :, depth].mean(1))  # painter's algorithm: far triangles first
        with np.errstate(invalid="ignore"):
            tri_res = np.nansum(residual_mm[faces], 1) / fin[faces].sum(1)  # NaN where no vertex has points
        colors = np.where(np.isfinite(tri_res)[:, None], cmap(np.clip(np.nan_to_num(tri_res) / top, 0, 1)),
                          (0.75, 0.75, 0.75, 1.0))
        ax.add_collection(PolyCollection(tri[order][:, :, [a, b]], facecolors=colors[order], edgecolors="none",
                                     linewidths=0, antialiaseds=False))
        ax.set_xlim(v[:, a].min(), v[:, a].max())
        ax.set_ylim(v[:, b].min(), v[:, b].max())
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(title, fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=axes, shrink=0.8, label="mean point-to-mesh distance (mm)")
    fig.suptitle("Tracking residual on the canonical mesh", fontsize=10)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def _overlay(kept_obs, verts, faces, path, views=("222200037", "222200042", "221501007")) -> None:
    """Front-facing mesh edges of the first kept timestamp over a few of its views (grey without images)."""
    import cv2

    o = kept_obs[0]
    tiles = []
    for s in views:
        if s not in o.cameras:
            continue
        cam = o.cameras[s]
        img = cv2.imread(str(o.image_dir / f"cam_{s}.png")) if o.image_dir is not None else None
        if img is None:
            img = np.full((cam.height, cam.width, 3), 96, np.uint8)
        uv, z = cam.project(verts[0].astype(np.float64))
        v = verts[0]
        n = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
        front = (n * (cam.center - v[faces[:, 0]])).sum(1) > 0
        for f in faces[front][::4]:
            pts = uv[f].round().astype(np.int32)
            cv2.polylines(img, [pts], True, (60, 220, 60), 1, cv2.LINE_AA)
        tiles.append(img)
    cv2.imwrite(str(path), np.concatenate(tiles, 1), [cv2.IMWRITE_PNG_COMPRESSION, 3])
