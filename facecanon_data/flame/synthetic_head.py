"""The project's own morphable head, built deterministically from a real face photograph.

Why by hand: no shippable head model exists (FLAME is licensed), and the tests need a model whose
renders MediaPipe accepts as a face and whose ground truth we know exactly. The model is stored in
FLAME's key layout so every stage runs the same code on it as on FLAME.

Construction (all in FLAME's frame: meters, x to the subject's left, y up, z out of the face):

1. **Face mask** — FaceMesh's 478 landmarks of scikit-image's public-domain ``astronaut`` photograph,
   scaled to a 14.5 cm wide face; Delaunay-triangulated in the photo plane, clipped to the face oval,
   with a hole at the mouth. The photograph's open mouth is closed in the template (inner lips meet).
2. **Head shell** — a closed, star-shaped surface around a head centre: an ellipsoid fitted to the face
   oval, smoothly united with a capped neck cylinder and ear bumps. Behind the face mask it is recessed
   (up to 1.6 cm), dark in the mouth region, so an open jaw shows a mouth cavity.
3. **Rig** — FLAME's five joints (global at the neck base, neck, jaw at the temporomandibular axis, two
   eyes), joint regressor rows from non-negative least squares, smooth skinning weights.
4. **Blendshapes** — identity components (scale, proportions, nose, jaw, cheeks, ...) and expression
   components (mouth open, smile, brow raise/lower, pucker, eye closes, cheek puff, ...) as displacement
   fields: hand-set on landmark sets, extended over the mask harmonically, carried to the shell.
5. **Masks and landmark embedding** in the layout of ``FLAME_masks.pkl`` and
   ``mediapipe_landmark_embedding.npz``.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import facemesh_topology as fmt
from ..artifacts import atomic_write
from ..meshes import raycasting_scene
from .assets import FLAME_NUM_SHAPE

FACE_WIDTH_M = 0.145
SHELL_DIRECTIONS = 4200
NUM_EXPRESSION_SLOTS = 100

IDENTITY_NAMES = ("scale", "head_width", "face_length", "nose_protrusion", "nose_width", "jaw_width",
                  "chin_protrusion", "cheek_fullness", "brow_ridge", "eye_spacing", "forehead_slope",
                  "lip_thickness", "head_depth", "neck_thickness")
EXPRESSION_NAMES = ("mouth_open", "smile", "brow_raise", "brow_lower", "pucker", "eye_close_right",
                    "eye_close_left", "cheek_puff", "mouth_frown", "mouth_left", "mouth_right", "sneer",
                    "lip_stretch", "lip_press", "eyes_wide", "brow_raise_inner")


@dataclass
class HeadModelFiles:
    model: Path  # FLAME-layout pickle
    masks: Path  # FLAME_masks-layout pickle
    embedding: Path  # mediapipe_landmark_embedding-layout npz
    texture: Path  # per-vertex texture attributes for the renderer (npz)


def model_files(folder: str | Path) -> HeadModelFiles:
    folder = Path(folder)
    return HeadModelFiles(model=folder / "synthetic_head.pkl", masks=folder / "synthetic_masks.pkl",
                          embedding=folder / "synthetic_landmark_embedding.npz",
                          texture=folder / "synthetic_texture.npz")


# ----------------------------------------------------------------------------------------------
# 1. face mask


def detect_photo_landmarks(image: np.ndarray) -> np.ndarray:
    """FaceMesh (refined, 478 points) on an RGB uint8 image -> (478, 3) in pixels (z scaled like x)."""
    from ..facemesh import FaceMeshDetector

    with FaceMeshDetector(static_image_mode=True) as det:
        lm = det.detect(image)
    if lm is None:
        raise RuntimeError("FaceMesh found no face in the source photograph")
    return lm


def _order_loop(edges) -> list[int]:
    adj: dict[int, list[int]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    start = min(adj)
    loop, prev = [start], None
    while True:
        nxt = [n for n in adj[loop[-1]] if n != prev][0]
        if nxt == start:
            return loop
        prev = loop[-1]
        loop.append(nxt)


def _inside(poly: np.ndarray, pts: np.ndarray) -> np.ndarray:
    from matplotlib.path import Path as MplPath

    return MplPath(poly).contains_points(pts)


def build_face_mask(landmarks_px: np.ndarray, oval_edges) -> dict:
    """Metric face-mask vertices (478, 3), triangles, photo coordinates and the oval loop."""
    from scipy.spatial import Delaunay

    uv = landmarks_px[:, :2].astype(np.float64)
    oval = _order_loop(oval_edges)
    width_px = np.ptp(uv[oval, 0])
    s = FACE_WIDTH_M / width_px
    centre = uv.mean(0)
    verts = np.stack([(uv[:, 0] - centre[0]) * s, -(uv[:, 1] - centre[1]) * s,
                      -(landmarks_px[:, 2] - landmarks_px[:, 2].mean()) * s], axis=1)
    tri = Delaunay(uv).simplices
    cent = uv[tri].mean(1)
    keep = _inside(uv[oval], cent)
    mouth = [fmt.MOUTH_CORNERS_INNER[0], *fmt.INNER_LIP_UPPER, fmt.MOUTH_CORNERS_INNER[1],
             *fmt.INNER_LIP_LOWER[::-1]]
    in_mouth = _inside(uv[mouth], cent)
    filled = tri[keep]  # the mouth closed over: used to find the face's footprint on the shell
    tri = tri[keep & ~in_mouth]
    # Orient triangles outward (+z in the photo's frame is toward the camera).
    n = np.cross(verts[tri[:, 1]] - verts[tri[:, 0]], verts[tri[:, 2]] - verts[tri[:, 0]])
    if np.median(n[:, 2]) < 0:
        tri, filled = tri[:, ::-1], filled[:, ::-1]
    # Close the photograph's open mouth: inner-lip pairs meet half way.
    for up, lo in zip(fmt.INNER_LIP_UPPER, fmt.INNER_LIP_LOWER):
        mid = 0.5 * (verts[up] + verts[lo])
        verts[up], verts[lo] = mid.copy(), mid.copy()
    verts[:, 2] -= verts[:, 2].max()  # nose tip at z = 0 until the final recentring
    return {"verts": verts, "faces": tri.astype(np.int64), "faces_filled": filled.astype(np.int64), "photo_uv": uv.astype(np.float32),
            "oval": np.asarray(oval), "px_to_m": s}


def mesh_laplacian(num_vertices: int, faces: np.ndarray):
    """Combinatorial graph Laplacian D - A (sparse, V x V) of a triangle mesh."""
    import scipy.sparse as sp

    from ..meshes import adjacency

    a = adjacency(num_vertices, faces)
    return sp.diags(np.asarray(a.sum(1)).ravel()) - a


def harmonic_extension(laplacian, fixed_idx: np.ndarray, fixed_values: np.ndarray) -> np.ndarray:
    """Solve L x = 0 on free vertices with x given on ``fixed_idx``; (V, C) values."""
    import scipy.sparse.linalg as spla

    v = laplacian.shape[0]
    free = np.setdiff1d(np.arange(v), fixed_idx)
    out = np.zeros((v, fixed_values.shape[1]))
    out[fixed_idx] = fixed_values
    lff = laplacian[free][:, free].tocsc()
    rhs = -laplacian[free][:, fixed_idx] @ fixed_values
    solve = spla.factorized(lff)
    for c in range(fixed_values.shape[1]):
        out[free, c] = solve(np.asarray(rhs[:, c]).ravel())
    return out


# ----------------------------------------------------------------------------------------------
# 2. head shell


def fibonacci_directions(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)


def _warp_towards_down(d: np.ndarray, power: float = 1.35) -> np.ndarray:
    """Move directions toward -y so the neck (a small solid angle from the head centre) gets vertices."""
    polar = np.arccos(np.clip(-d[:, 1], -1, 1))  # angle from straight down
    new = np.pi * (polar / np.pi) ** power
    horiz = d[:, [0, 2]]
    norm = np.linalg.norm(horiz, axis=1, keepdims=True)
    horiz = np.where(norm > 1e-9, horiz / np.maximum(norm, 1e-12), 0.0)
    out = np.empty_like(d)
    out[:, 1] = -np.cos(new)
    out[:, 0] = horiz[:, 0] * np.sin(new)
    out[:, 2] = horiz[:, 1] * np.sin(new)
    return out


def _smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    return 0.5 * (a + b + np.sqrt((a - b) ** 2 + k * k))


def _fit_head_ellipsoid(oval_pts: np.ndarray, nose_tip: np.ndarray):
    """Head centre (0, yc, zc) and semi-axes (ax, ay, az) putting the face oval on the ellipsoid."""
    from scipy.optimize import least_squares

    prior = np.array([0.0, -0.095, 0.078, 0.105, 0.102])  # yc, zc offset from nose, ax, ay, az

    def resid(p):
        yc, zc, ax, ay, az = p
        c = np.array([0.0, yc, nose_tip[2] + zc])
        q = (oval_pts - c) / np.array([ax, ay, az])
        return np.concatenate([np.linalg.norm(q, axis=1) - 1.0, 3.0 * (p - prior)])

    p = least_squares(resid, prior).x
    return np.array([0.0, p[0], nose_tip[2] + p[1]]), p[2:]


def _radius_ellipsoid(d: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return 1.0 / np.linalg.norm(d / axes, axis=1)


def build_shell(mask: dict) -> dict:
    """Star-shaped head shell around a fitted centre; returns vertices, faces and attributes."""
    import open3d as o3d
    from scipy.spatial import ConvexHull

    mv, mf = mask["verts"], mask["faces"]
    centre, axes = _fit_head_ellipsoid(mv[mask["oval"]], mv[fmt.NOSE_TIP])
    base = fibonacci_directions(SHELL_DIRECTIONS)
    hull = ConvexHull(base)
    faces = hull.simplices.copy()
    d = _warp_towards_down(base)
    # Outward orientation on the unit sphere.
    n = np.cross(base[faces[:, 1]] - base[faces[:, 0]], base[faces[:, 2]] - base[faces[:, 0]])
    flip = (n * base[faces].mean(1)).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]

    r = _radius_ellipsoid(d, axes)
    # Neck: capped vertical cylinder whose axis passes through the centre (keeps the union star-shaped).
    neck_r, neck_len = 0.052, 0.20
    horiz = np.linalg.norm(d[:, [0, 2]], axis=1)
    down = np.maximum(-d[:, 1], 1e-6)
    r_cyl = np.where(d[:, 1] < 0, np.minimum(neck_r / np.maximum(horiz, 1e-6), neck_len / down), 0.0)
    r = _smooth_max(r, r_cyl, 0.02)
    # Ears: radial bumps at the sides, slightly behind the centre.
    for side in (-1.0, 1.0):
        ear = np.array([side, 0.02, -0.12])
        ear /= np.linalg.norm(ear)
        ang = np.arccos(np.clip(d @ ear, -1, 1))
        r += 0.014 * np.exp(-(ang / 0.16) ** 2)

    # Face footprint: cast from the centre along each direction against the face mask.
    mf_filled = mask["faces_filled"]
    scene = raycasting_scene(mv, mf_filled)
    rays = np.concatenate([np.repeat(centre[None], len(d), 0), d], 1).astype(np.float32)
    hit = scene.cast_rays(o3d.core.Tensor(rays))
    t_hit = hit["t_hit"].numpy()
    on_face = np.isfinite(t_hit)
    # Interior-ness of the hit point: graph distance from the oval, interpolated barycentrically.
    depth = _graph_depth(len(mv), mf, mask["oval"])
    prim = hit["primitive_ids"].numpy()
    uvb = hit["primitive_uvs"].numpy()
    interior = np.zeros(len(d))
    tri = mf_filled[prim[on_face]]
    bw = np.stack([1 - uvb[on_face].sum(1), uvb[on_face, 0], uvb[on_face, 1]], 1)
    interior[on_face] = (depth[tri] * bw).sum(1)
    recess = 0.016 * np.clip(interior / 3.0, 0, 1) ** 0.7
    # Make the outside of the footprint meet the mask edge: spread the boundary mismatch outward.
    oval_dir = mv[mask["oval"]] - centre
    oval_r = np.linalg.norm(oval_dir, axis=1)
    oval_dir /= oval_r[:, None]
    mismatch = oval_r - _radius_ellipsoid(oval_dir, axes)
    ang = np.arccos(np.clip(d @ oval_dir.T, -1, 1))  # (N, 36)
    nearest = ang.argmin(1)
    fade = np.exp(-(ang.min(1) / 0.25) ** 2)
    r_out = r + mismatch[nearest] * fade
    r = np.where(on_face, t_hit - recess, r_out)
    verts = centre + d * r[:, None]
    # Shell colour classes, per vertex: hair on the scalp, mouth cavity behind the lips.
    mouth_centre = mv[list(fmt.INNER_LIP_UPPER)].mean(0)
    mouth_dir = (mouth_centre - centre) / np.linalg.norm(mouth_centre - centre)
    mouth_w = np.exp(-(np.arccos(np.clip(d @ mouth_dir, -1, 1)) / 0.16) ** 4) * on_face
    # Hairline: 3.5 cm above the brows at the front, sloping down to the nape at the back.
    brow_y = mv[list(fmt.RIGHT_EYEBROW + fmt.LEFT_EYEBROW)][:, 1].max()
    z_front, z_back = verts[:, 2].max(), verts[:, 2].min()
    back = np.clip((z_front - verts[:, 2]) / (z_front - z_back), 0, 1)
    hairline = (brow_y + 0.035) + ((centre[1] - 0.06) - (brow_y + 0.035)) * back ** 1.5
    hair_w = _sigmoid((verts[:, 1] - hairline) / 0.008) * (1 - on_face)
    return {"verts": verts, "faces": faces, "centre": centre, "axes": axes, "on_face": on_face,
            "mouth_w": mouth_w, "hair_w": hair_w, "neck_len": neck_len, "neck_r": neck_r}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _graph_depth(n: int, faces: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Hop distance of every vertex from ``sources`` over mesh edges."""
    from scipy.sparse.csgraph import shortest_path

    from ..meshes import adjacency

    dist = shortest_path(adjacency(n, faces), unweighted=True, indices=sources).min(0)
    return np.where(np.isfinite(dist), dist, 0.0)


# ----------------------------------------------------------------------------------------------
# 3.–5. rig, blendshapes, masks, assembly


def _gauss(pts: np.ndarray, anchors: np.ndarray, radius: float) -> np.ndarray:
    """max_k exp(-|p - a_k|^2 / r^2): a smooth region weight, (N,)."""
    d2 = ((pts[:, None, :] - anchors[None]) ** 2).sum(-1).min(1)
    return np.exp(-d2 / radius ** 2)


class _FieldBuilder:
    """Displacement fields on the whole head from displacements prescribed on landmarks."""

    def __init__(self, verts: np.ndarray, n_mask: int, mask_faces: np.ndarray):
        from scipy.spatial import cKDTree

        self.v, self.n_mask = verts, n_mask
        self.lap = mesh_laplacian(n_mask, mask_faces)
        tree = cKDTree(verts[:n_mask])
        dist, self.shell_nn = tree.query(verts[n_mask:], k=4)
        w = 1.0 / np.maximum(dist, 1e-4)
        self.shell_w = w / w.sum(1, keepdims=True)
        self.shell_fade = np.exp(-(dist[:, 0] / 0.022) ** 2)

    def from_anchors(self, anchors: dict[int, np.ndarray], radius: float) -> np.ndarray:
        """Harmonic extension over the face mask of ``{landmark: (3,) m}``; zero beyond ``radius``."""
        idx = np.array(sorted(anchors))
        vals = np.array([anchors[i] for i in idx], dtype=np.float64)
        mv = self.v[: self.n_mask]
        far = np.where(np.sqrt(((mv[:, None] - mv[idx][None]) ** 2).sum(-1)).min(1) > radius)[0]
        far = np.setdiff1d(far, idx)
        fixed = np.concatenate([idx, far])
        field_mask = harmonic_extension(self.lap, fixed, np.concatenate([vals, np.zeros((len(far), 3))]))
        return self._with_shell(field_mask)

    def _with_shell(self, field_mask: np.ndarray) -> np.ndarray:
        shell = (field_mask[self.shell_nn] * self.shell_w[..., None]).sum(1) * self.shell_fade[:, None]
        return np.concatenate([field_mask, shell]).astype(np.float32)


def _expression_fields(fb: _FieldBuilder, v: np.ndarray) -> list[np.ndarray]:
    lips = list(fmt.INNER_LIP_UPPER + fmt.INNER_LIP_LOWER + fmt.OUTER_LIP_UPPER + fmt.OUTER_LIP_LOWER
                + fmt.MOUTH_CORNERS_INNER + fmt.MOUTH_CORNERS_OUTER)
    lower = list(fmt.INNER_LIP_LOWER + fmt.OUTER_LIP_LOWER)
    mouth_c = v[lips].mean(0)
    corners = list(fmt.MOUTH_CORNERS_INNER + fmt.MOUTH_CORNERS_OUTER)
    brows = list(fmt.RIGHT_EYEBROW + fmt.LEFT_EYEBROW)
    cheeks = list(fmt.RIGHT_CHEEK + fmt.LEFT_CHEEK)
    side = lambda i: np.sign(v[i, 0] - mouth_c[0])  # noqa: E731
    f = []
    f.append(fb.from_anchors({**{i: np.array([0, -0.007, 0.001]) for i in lower},
                              fmt.CHIN: np.array([0, -0.005, 0.0])}, 0.035))  # mouth_open
    f.append(fb.from_anchors({**{i: np.array([0.006 * side(i), 0.006, -0.003]) for i in corners},
                              **{i: np.array([0, 0.003, 0.001]) for i in cheeks}}, 0.035))  # smile
    f.append(fb.from_anchors({i: np.array([0, 0.007, 0.0005]) for i in brows}, 0.03))  # brow_raise
    f.append(fb.from_anchors({i: np.array([-0.0025 * np.sign(v[i, 0]), -0.004, 0.001]) for i in brows}, 0.025))
    f.append(fb.from_anchors({i: np.array([-0.35 * (v[i, 0] - mouth_c[0]), 0, 0.007]) for i in lips}, 0.03))
    for upper, lower_lid, iris in ((fmt.RIGHT_EYE_UPPER, fmt.RIGHT_EYE_LOWER, fmt.RIGHT_IRIS),
                                   (fmt.LEFT_EYE_UPPER, fmt.LEFT_EYE_LOWER, fmt.LEFT_IRIS)):
        anchors = {u: v[lo] - v[u] + np.array([0, 0.0004, 0.0008]) for u, lo in zip(upper, lower_lid)}
        lid_c = v[list(lower_lid)].mean(0)
        anchors.update({i: lid_c - v[i] + np.array([0, 0.0004, 0.0008]) for i in iris})
        f.append(fb.from_anchors(anchors, 0.014))  # eye_close_right / left
    f.append(fb.from_anchors({i: np.array([0.006 * np.sign(v[i, 0]), 0, 0.004]) for i in cheeks}, 0.035))
    f.append(fb.from_anchors({i: np.array([0, -0.005, -0.001]) for i in corners}, 0.03))  # mouth_frown
    f.append(fb.from_anchors({i: np.array([0.006, 0, 0]) for i in lips}, 0.03))  # mouth_left: to the subject's left (+x)
    f.append(fb.from_anchors({i: np.array([-0.006, 0, 0]) for i in lips}, 0.03))  # mouth_right
    sneer = {i: np.array([0, 0.004, 0.001]) for i in fmt.OUTER_LIP_UPPER + (48, 64, 278, 294, 98, 327)}
    f.append(fb.from_anchors(sneer, 0.025))
    f.append(fb.from_anchors({i: np.array([0.007 * side(i), -0.001, -0.002]) for i in corners}, 0.03))
    f.append(fb.from_anchors({i: np.array([0, 0.0025 if i in lower else -0.0015, -0.003]) for i in lips}, 0.025))
    f.append(fb.from_anchors({i: np.array([0, 0.0022, 0.0005]) for i in fmt.RIGHT_EYE_UPPER + fmt.LEFT_EYE_UPPER}, 0.012))
    inner_brows = (107, 55, 65, 66, 336, 285, 295, 296)
    f.append(fb.from_anchors({i: np.array([0, 0.006, 0]) for i in inner_brows}, 0.025))
    assert len(f) == len(EXPRESSION_NAMES)
    return f


def _identity_fields(fb: _FieldBuilder, v: np.ndarray, info: dict) -> list[np.ndarray]:
    c, n = info["centre"], fb.n_mask
    y_mouth, y_brow, y_neck_top = info["y_mouth"], info["y_brow"], info["y_neck_top"]
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    zero = np.zeros_like(x)
    mask_only = np.r_[np.ones(n), np.zeros(len(v) - n)]
    nose = v[list(fmt.NOSE)]
    brows = v[list(fmt.RIGHT_EYEBROW + fmt.LEFT_EYEBROW)]
    eyes = v[list(fmt.RIGHT_IRIS + fmt.LEFT_IRIS)]
    cheeks = v[list(fmt.RIGHT_CHEEK + fmt.LEFT_CHEEK)]
    lips_up = v[list(fmt.OUTER_LIP_UPPER)]
    lips_lo = v[list(fmt.OUTER_LIP_LOWER)]
    below_mouth = _sigmoid((y_mouth - y) / 0.01)
    front = _sigmoid((z - c[2]) / 0.01)
    fields = [
        0.035 * (v - c),  # scale
        np.stack([0.05 * x, zero, zero], 1),  # head_width
        np.stack([zero, 0.06 * (y - y_mouth - 0.02) * _sigmoid((y_mouth + 0.02 - y) / 0.01) * front, zero], 1),
        np.stack([zero, -0.2 * (y - v[fmt.NOSE_TIP, 1]), 0.004 + zero], 1) * _gauss(v, v[[fmt.NOSE_TIP]], 0.018)[:, None] * mask_only[:, None],
        np.stack([0.25 * x, zero, zero], 1) * _gauss(v, nose, 0.01)[:, None] * mask_only[:, None],
        np.stack([0.07 * x, zero, zero], 1) * below_mouth[:, None],
        np.array([0, -0.002, 0.005]) * _gauss(v, v[[fmt.CHIN]], 0.025)[:, None],
        np.stack([0.6 * np.sign(x), zero, 0.4 + zero], 1) * 0.0045 * _gauss(v, cheeks, 0.022)[:, None],
        np.array([0, 0.001, 0.004]) * _gauss(v, brows, 0.015)[:, None],
        np.stack([0.003 * np.sign(x), zero, zero], 1) * _gauss(v, eyes, 0.016)[:, None],
        np.stack([zero, zero, -0.12 * np.clip(y - y_brow, 0, None)], 1) * front[:, None],
        (np.array([0, 0.0015, 0.0015]) * _gauss(v, lips_up, 0.006)[:, None]
         + np.array([0, -0.0015, 0.0015]) * _gauss(v, lips_lo, 0.006)[:, None]) * mask_only[:, None],
        np.stack([zero, zero, 0.07 * np.clip(z - c[2], None, 0)], 1),
        np.stack([0.1 * x, zero, 0.1 * (z - c[2])], 1) * _sigmoid((y_neck_top - y) / 0.012)[:, None],
    ]
    assert len(fields) == len(IDENTITY_NAMES)
    return [f.astype(np.float32) for f in fields]


def _joint_regressor_row(verts: np.ndarray, target: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Non-negative vertex weights summing to 1 whose combination is ``target`` (least squares)."""
    from scipy.optimize import nnls

    a = np.vstack([verts[candidates].T, 100.0 * np.ones((1, len(candidates)))])
    b = np.concatenate([target, [100.0]])
    w, _ = nnls(a, b)
    row = np.zeros(len(verts))
    row[candidates] = w / w.sum()
    return row


def build_head_model(image: np.ndarray | None = None) -> dict:
    """Build the synthetic head from a photograph (default: scikit-image's astronaut).

    Returns a dict with FLAME-layout arrays (``model``), masks, embedding and texture attributes.
    """
    import mediapipe as mp
    from scipy.spatial import cKDTree

    if image is None:
        from skimage import data

        image = data.astronaut()
    fm = mp.solutions.face_mesh
    lm = detect_photo_landmarks(image)
    mask = build_face_mask(lm, fm.FACEMESH_FACE_OVAL)
    shell = build_shell(mask)
    n_mask = len(mask["verts"])
    verts = np.concatenate([mask["verts"], shell["verts"]])
    faces = np.concatenate([mask["faces"], shell["faces"] + n_mask])
    # Origin at the face centre: between the eyes and the mouth, at the head centre's depth.
    eyes_y = verts[[fmt.RIGHT_IRIS[0], fmt.LEFT_IRIS[0]], 1].mean()
    mouth_y = verts[list(fmt.INNER_LIP_UPPER), 1].mean()
    origin = np.array([0.0, 0.5 * (eyes_y + mouth_y), shell["centre"][2]])
    verts = verts - origin
    centre = shell["centre"] - origin
    v = verts
    n_v = len(v)
    y_mouth = mouth_y - origin[1]
    y_brow = v[list(fmt.RIGHT_EYEBROW + fmt.LEFT_EYEBROW), 1].mean()
    y_chin = v[fmt.CHIN, 1]
    neck_bottom = centre[1] - shell["neck_len"]
    y_neck_top = y_chin - 0.02

    # ---- joints (FLAME order: global, neck, jaw, left eye, right eye)
    eye_depth = 0.012
    tmj = np.array([0.0, y_mouth + 0.035, centre[2] + 0.005])
    joints = np.array([
        [0.0, neck_bottom + 0.02, centre[2]],
        [0.0, y_neck_top + 0.01, centre[2] - 0.005],
        tmj,
        v[fmt.LEFT_IRIS[0]] - [0, 0, eye_depth],
        v[fmt.RIGHT_IRIS[0]] - [0, 0, eye_depth],
    ])
    tree = cKDTree(v)
    J = np.zeros((5, n_v))
    for j, q in enumerate(joints):
        # Candidates around the joint on both sides of it, so a convex combination can reach it.
        cand = np.unique(tree.query(q, k=60)[1])
        if j == 2:  # jaw axis: vertices at both cheeks around the hinge height
            cand = np.unique(np.concatenate([tree.query(q + [s * 0.07, 0, 0], k=20)[1] for s in (-1, 1)]))
        J[j] = _joint_regressor_row(v, q, cand)

    # ---- skinning weights
    photo_uv = mask["photo_uv"]
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    z_front = v[:n_mask, 2].max()
    sep = y_mouth + (tmj[1] - y_mouth) * np.clip((z_front - 0.02 - z) / (z_front - 0.02 - tmj[2]), 0, 1)
    w_jaw = _sigmoid((sep - y) / 0.006) * _sigmoid((z - (tmj[2] - 0.01)) / 0.008)
    w_jaw *= _sigmoid((y - (y_chin - 0.03)) / 0.006)
    # Near the mouth the split follows the lip line exactly (photo coordinates of the closed lips).
    lip_u = photo_uv[list(fmt.INNER_LIP_UPPER), 0]
    lip_v = photo_uv[list(fmt.INNER_LIP_UPPER), 1]
    corner_l, corner_r = photo_uv[fmt.MOUTH_CORNERS_INNER[0], 0], photo_uv[fmt.MOUTH_CORNERS_INNER[1], 0]
    u = photo_uv[:, 0]
    near = (u > corner_l - 3) & (u < corner_r + 3) & (np.abs(photo_uv[:, 1] - lip_v.mean()) < 25)
    line_v = np.interp(u, np.r_[corner_l, lip_u, corner_r], np.r_[lip_v[0], lip_v, lip_v[-1]])
    px_m = mask["px_to_m"]
    w_near = _sigmoid((photo_uv[:, 1] - line_v) * px_m / 0.0015)
    w_jaw[:n_mask][near] = w_near[near]
    w_jaw[list(fmt.INNER_LIP_UPPER)] = 0.0
    w_jaw[list(fmt.INNER_LIP_LOWER)] = 1.0
    w_eye_l = np.zeros(n_v)
    w_eye_r = np.zeros(n_v)
    w_eye_l[list(fmt.LEFT_IRIS)] = 1.0
    w_eye_r[list(fmt.RIGHT_IRIS)] = 1.0
    w_root = _sigmoid(((neck_bottom + 0.07) - y) / 0.015)
    w_jaw *= 1 - w_root
    w_neck = np.clip(1 - w_root - w_jaw - w_eye_l - w_eye_r, 0, 1)
    weights = np.stack([w_root, w_neck, w_jaw, w_eye_l, w_eye_r], 1)
    weights /= weights.sum(1, keepdims=True)

    # ---- blendshapes
    fb = _FieldBuilder(v, n_mask, mask["faces"])
    info = {"centre": centre, "y_mouth": y_mouth, "y_brow": y_brow, "y_neck_top": y_neck_top}
    shapedirs = np.zeros((n_v, 3, FLAME_NUM_SHAPE + NUM_EXPRESSION_SLOTS), np.float32)
    for k, field in enumerate(_identity_fields(fb, v, info)):
        shapedirs[:, :, k] = field
    for k, field in enumerate(_expression_fields(fb, v)):
        shapedirs[:, :, FLAME_NUM_SHAPE + k] = field
    # Pose correctives: opening the jaw (rotation about x) pulls the mouth corners in and back.
    posedirs = np.zeros((n_v, 3, 36), np.float32)
    corner_w = _gauss(v, v[list(fmt.MOUTH_CORNERS_OUTER)], 0.018)[:, None]
    posedirs[:, :, 9 + 7] = (np.stack([-0.012 * np.sign(x), np.zeros(n_v), -0.01 + 0 * x], 1) * corner_w)
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)

    # ---- masks (FLAME_masks.pkl names)
    idx = np.arange(n_v)
    mask_ids = idx[:n_mask]
    shell_ids = idx[n_mask:]
    ears = {}
    for s in (-1.0, 1.0):
        ear = np.array([s, 0.02, -0.12]) / np.linalg.norm([s, 0.02, -0.12])
        d = (v[n_mask:] - centre) / np.linalg.norm(v[n_mask:] - centre, axis=1, keepdims=True)
        ears[s] = shell_ids[np.arccos(np.clip(d @ ear, -1, 1)) < 0.2]
    right_eye = fmt.RIGHT_EYE_UPPER + fmt.RIGHT_EYE_LOWER + fmt.RIGHT_EYE_CORNERS + fmt.RIGHT_IRIS + fmt.RIGHT_EYEBROW
    left_eye = fmt.LEFT_EYE_UPPER + fmt.LEFT_EYE_LOWER + fmt.LEFT_EYE_CORNERS + fmt.LEFT_IRIS + fmt.LEFT_EYEBROW
    # Exactly FLAME_masks.pkl's keys (flame.assets.MASK_NAMES); "eyeballs" and "ears" are unions in code.
    masks = {
        "face": mask_ids,
        "boundary": np.asarray(mask["oval"]),
        "left_eyeball": np.array(fmt.LEFT_IRIS),
        "right_eyeball": np.array(fmt.RIGHT_IRIS),
        "left_eye_region": np.unique(np.r_[list(left_eye)]),
        "right_eye_region": np.unique(np.r_[list(right_eye)]),
        "eye_region": np.unique(np.r_[list(left_eye + right_eye)]),
        "nose": np.array(fmt.NOSE),
        "lips": np.unique(np.r_[list(fmt.INNER_LIP_UPPER + fmt.INNER_LIP_LOWER + fmt.OUTER_LIP_UPPER
                                     + fmt.OUTER_LIP_LOWER + fmt.MOUTH_CORNERS_INNER + fmt.MOUTH_CORNERS_OUTER)]),
        "forehead": mask_ids[v[:n_mask, 1] > y_brow + 0.008],
        "scalp": shell_ids[shell["hair_w"] > 0.5],
        "neck": shell_ids[v[n_mask:, 1] < y_neck_top],
        "left_ear": ears[1.0],  # FLAME's left is the subject's left: +x
        "right_ear": ears[-1.0],
    }
    masks = {k: np.asarray(val, dtype=np.int64) for k, val in masks.items()}

    # ---- landmark embedding: each embedded landmark is a mask vertex (one-hot barycentrics)
    emb_idx = np.array(fmt.EMBEDDED_LANDMARKS)
    face_of = {}
    for fi, tri in enumerate(mask["faces"]):
        for k, vi in enumerate(tri):
            face_of.setdefault(int(vi), (fi, k))
    lmk_face, lmk_bary = [], []
    for i in emb_idx:
        fi, k = face_of[int(i)]
        lmk_face.append(fi)
        b = np.zeros(3, np.float32)
        b[k] = 1.0
        lmk_bary.append(b)
    embedding = {"lmk_face_idx": np.array(lmk_face, np.int64), "lmk_b_coords": np.array(lmk_bary),
                 "landmark_indices": emb_idx.astype(np.int64)}

    # ---- texture attributes for the renderer
    depth = _graph_depth(n_mask, mask["faces"], mask["oval"])
    photo_w = np.r_[np.clip(depth / 2.0, 0, 1), np.zeros(len(shell_ids))]
    uv_all = np.zeros((n_v, 2), np.float32)
    uv_all[:n_mask] = photo_uv
    uv_all[n_mask:] = photo_uv[fb.shell_nn[:, 0]]
    texture = {"photo_uv": uv_all, "photo_weight": photo_w.astype(np.float32),
               "hair_weight": np.r_[np.zeros(n_mask), shell["hair_w"]].astype(np.float32),
               "mouth_weight": np.r_[np.zeros(n_mask), shell["mouth_w"]].astype(np.float32),
               "skin_rgb": _skin_tone(image, photo_uv).astype(np.float32),
               "num_mask_vertices": np.array(n_mask)}
    from scipy.sparse import csc_matrix

    model = {"v_template": v.astype(np.float64), "f": faces.astype(np.uint32), "shapedirs": shapedirs,
             "posedirs": posedirs, "J_regressor": csc_matrix(J), "weights": weights,
             "kintree_table": kintree}
    return {"model": model, "masks": masks, "embedding": embedding, "texture": texture}


def _skin_tone(image: np.ndarray, photo_uv: np.ndarray) -> np.ndarray:
    """Median photo colour over the cheeks, in [0, 1]."""
    pts = photo_uv[list(fmt.RIGHT_CHEEK + fmt.LEFT_CHEEK)].round().astype(int)
    return np.median(image[pts[:, 1], pts[:, 0]].astype(np.float64) / 255.0, axis=0)


def write_head_model(folder: str | Path, image: np.ndarray | None = None) -> HeadModelFiles:
    """Build the synthetic head and write it (atomically, file by file) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    built = build_head_model(image)
    files = model_files(folder)

    def atomic(path: Path, write) -> None:  # per-process temporary names: concurrent builders never collide
        def dump(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                write(fh)

        atomic_write(path, dump)

    atomic(files.masks, lambda fh: pickle.dump(built["masks"], fh, protocol=2))
    atomic(files.embedding, lambda fh: np.savez(fh, **built["embedding"]))
    atomic(files.texture, lambda fh: np.savez(fh, builder_digest=np.array(_builder_digest()), **built["texture"]))
    atomic(files.model, lambda fh: pickle.dump(built["model"], fh, protocol=2))  # written last: marks completion
    return files


def ensure_head_model(folder: str | Path) -> HeadModelFiles:
    """Return the synthetic head's files, generating them on first use (deterministic)."""
    files = model_files(folder)
    ok = all(p.is_file() for p in (files.model, files.masks, files.embedding, files.texture))
    if ok:
        try:
            with np.load(files.texture) as z:
                ok = str(z["builder_digest"]) == _builder_digest()
        except (KeyError, ValueError, OSError):
            ok = False
    return files if ok else write_head_model(folder)


def _builder_digest() -> str:
    """Hash of this module's source: a changed builder regenerates the model on next use."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
