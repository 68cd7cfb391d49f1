"""Ray-cast rendering of the synthetic head with open3d (Embree; no OpenGL needed).

One ray per pixel centre. Per hit: the triangle and barycentrics give every per-vertex attribute, so
the colour image and the ground-truth depth, mask and canonical maps come from the same cast.

Appearance: the photograph on the face (bilinear lookup through per-vertex photo coordinates), a
procedural skin elsewhere with freckle-like spots and hair strands on the scalp (functions of the
*template* position, so the pattern is glued to the surface and multi-view consistent), a dark mouth
cavity, Lambertian shading under a fixed studio light, and a plain grey background.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cameras import Camera
from ..meshes import barycentric_interpolate, cast_camera_rays, raycasting_scene

BACKGROUND_RGB = np.array([0.62, 0.63, 0.65])
HAIR_RGB = np.array([0.23, 0.16, 0.10], np.float32)
LIGHT_DIR = np.array([0.25, 0.55, 0.8]) / np.linalg.norm([0.25, 0.55, 0.8])


@dataclass
class RenderOutput:
    """rgb: (H, W, 3) uint8. depth: (H, W) float32 meters along the optical axis, 0 where empty.
    mask: (H, W) bool. canonical: (H, W, 3) float32 canonical point per pixel, meters (0 where empty).
    triangle: (H, W) int64 hit triangle, -1 where empty."""

    rgb: np.ndarray | None
    depth: np.ndarray
    mask: np.ndarray
    canonical: np.ndarray | None
    triangle: np.ndarray


class _Waves:
    """Band-limited procedural noise: a sum of plane waves with random directions and phases.

    Chosen over lattice noise because it is a handful of vectorized sin() calls per pixel.
    """

    def __init__(self, rng: np.random.Generator, count: int, wavelength_m: float):
        d = rng.normal(size=(count, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = wavelength_m * rng.uniform(0.7, 1.4, size=count)
        self.omega = ((2 * np.pi / lam)[:, None] * d).T.astype(np.float32)  # (3, count)
        self.phase = rng.uniform(0, 2 * np.pi, size=count).astype(np.float32)
        self.norm = np.float32(np.sqrt(count / 2.0))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """(N, 3) float32 points, meters -> (N,) float32, unit variance."""
        arg = p @ self.omega
        arg += self.phase
        np.sin(arg, out=arg)
        return arg.sum(1) / self.norm


class HeadRenderer:
    """Renders a posed synthetic head into cameras.

    Args:
        faces: (F, 3) triangles. texture: the model's texture attributes (``synthetic_texture.npz``).
        template: (V, 3) template vertices: the texture is a function of these.
        photo: (h, w, 3) uint8 photograph the face texture comes from.
        ``texture``, ``template`` and ``photo`` may be None for geometry-only rendering (``color=False``).
    """

    def __init__(self, faces: np.ndarray, texture: dict | None, template: np.ndarray | None,
                 photo: np.ndarray | None):
        self.faces = faces.astype(np.int64)
        if texture is None:  # geometry only (ground-truth maps)
            return
        self.template = template.astype(np.float32)
        self.photo = photo.astype(np.float32) / 255.0
        self.photo_uv = texture["photo_uv"].astype(np.float32)
        self.photo_w = texture["photo_weight"].astype(np.float32)
        self.hair_w = texture["hair_weight"].astype(np.float32)
        self.mouth_w = texture["mouth_weight"].astype(np.float32)
        self.skin = np.asarray(texture["skin_rgb"], np.float32)
        rng = np.random.default_rng(1234)
        self.tone = _Waves(rng, 6, 0.06)
        self.mottle = _Waves(rng, 10, 0.012)
        self.spots = _Waves(rng, 14, 0.005)
        self.strands = _Waves(rng, 12, 0.003)

    # -- geometry ------------------------------------------------------------------------------
    def cast(self, vertices: np.ndarray, camera: Camera):
        """Ray-cast ``vertices`` (V, 3) world meters into ``camera``: (t, tri, bary) per pixel."""
        return cast_camera_rays(raycasting_scene(vertices, self.faces), camera)

    def _interp(self, attr: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """(V, C) per-vertex attribute at hit points: tri (N,), bary (N, 3) -> (N, C)."""
        return barycentric_interpolate(attr, self.faces, tri, bary)

    def render(self, vertices: np.ndarray, camera: Camera, canonical_vertices: np.ndarray | None = None,
               color: bool = True) -> RenderOutput:
        """Render posed ``vertices`` (V, 3) into ``camera``; optional canonical map from (V, 3)."""
        depth, tri, bary = self.cast(vertices, camera)
        mask = tri >= 0
        h, w = mask.shape
        ti, bi = tri[mask], bary[mask]
        canonical = None
        if canonical_vertices is not None:
            canonical = np.zeros((h, w, 3), np.float32)
            canonical[mask] = self._interp(canonical_vertices.astype(np.float32), ti, bi)
        rgb = None
        if color:
            img = np.empty((h, w, 3), np.float32)
            vy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
            img[:] = BACKGROUND_RGB * (1.04 - 0.08 * vy)
            img[mask] = self._shade(vertices, ti, bi)
            rgb = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        return RenderOutput(rgb=rgb, depth=depth, mask=mask, canonical=canonical, triangle=tri)

    # -- appearance ----------------------------------------------------------------------------
    def _shade(self, vertices: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
        p = self._interp(self.template, tri, bary)  # texture space (N, 3)
        attrs = np.concatenate([self.photo_uv, self.photo_w[:, None], self.hair_w[:, None],
                                self.mouth_w[:, None]], 1)
        a = self._interp(attrs, tri, bary)
        uv, w_photo, w_hair, w_mouth = a[:, :2], a[:, 2:3], a[:, 3:4], a[:, 4:5]
        # Procedural skin: tone variation, mottling and small dark spots (features for SIFT).
        # Each pattern is evaluated only where it is visible (the waves dominate the cost).
        spots = np.clip((self.spots(p) - 1.0) * 1.6, 0, 1)[:, None]
        col = _bilinear(self.photo, uv) * (1 - 0.1 * spots)  # fine detail the upsampled photo lacks
        proc = w_photo[:, 0] < 0.999
        if proc.any():
            q, wh, sp = p[proc], w_hair[proc], spots[proc]
            mottle = self.mottle(q)[:, None]
            skin = self.skin * (1 + 0.07 * self.tone(q)[:, None] + 0.06 * mottle) * (1 - 0.35 * sp)
            hairy = wh[:, 0] > 1e-3
            if hairy.any():
                strands = self.strands(q[hairy] * np.array([1.0, 0.25, 1.0], np.float32))[:, None]
                hair = HAIR_RGB * (1 + 0.35 * strands + 0.15 * mottle[hairy])
                skin[hairy] = skin[hairy] * (1 - wh[hairy]) + hair * wh[hairy]
            wp = w_photo[proc]
            col[proc] = col[proc] * wp + skin * (1 - wp)
        col = col * (1 - w_mouth) + np.array([0.18, 0.05, 0.05], np.float32) * w_mouth
        # Lambertian shading with smooth (interpolated) vertex normals of the posed mesh.
        normals = self._vertex_normals(vertices)
        n = self._interp(normals, tri, bary)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
        lambert = np.clip(n @ LIGHT_DIR, 0, 1)[:, None]
        shade_photo = 0.8 + 0.25 * lambert  # the photograph already carries its own shading
        shade_proc = 0.45 + 0.65 * lambert
        return col * (w_photo * shade_photo + (1 - w_photo) * shade_proc)

    def _vertex_normals(self, vertices: np.ndarray) -> np.ndarray:
        v = vertices.astype(np.float32)
        f = self.faces
        fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        vn = np.zeros_like(v)
        for k in range(3):
            np.add.at(vn, f[:, k], fn)
        return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample (h, w, C) float32 ``image`` at (N, 2) pixel positions with cv2.remap (rows <= 32767)."""
    import cv2

    n = len(xy)
    cols = 4096
    rows = -(-n // cols)
    pad = np.zeros((rows * cols, 2), np.float32)
    pad[:n] = xy
    out = cv2.remap(image, pad[:, 0].reshape(rows, cols), pad[:, 1].reshape(rows, cols),
                    interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * cols, -1)[:n]
