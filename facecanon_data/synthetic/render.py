"""Ray-cast rendering of the synthetic head with open3d (Embree; no OpenGL needed).

One ray per pixel centre. Per hit: the triangle and barycentrics give every per-vertex attribute.

Appearance: the photograph on the face (bilinear lookup through per-vertex photo coordinates), a
procedural skin elsewhere with freckle-like spots (functions of the *rest* position, so the pattern is
glued to the surface and multi-view consistent), a dark mouth cavity; low-textured hair, teeth, tongue
and checked clothing; Lambertian shading under a fixed light; the studio plate behind (``studio.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cameras import Camera
from ..meshes import barycentric_interpolate, camera_rays, cast_camera_rays, raycasting_scene
from .procedural import Waves, vertex_normals

HAIR_RGB = np.array([0.23, 0.16, 0.10], np.float32)
LIGHT_DIR = np.array([0.25, 0.55, 0.8]) / np.linalg.norm([0.25, 0.55, 0.8])


@dataclass
class RenderOutput:
    """rgb: (H, W, 3) float32 linear colour in [0, 1], before the camera. depth: (H, W) float32 meters
    along the optical axis, 0 where empty. mask: (H, W) bool subject. triangle: (H, W) int64, -1 = empty."""

    rgb: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    triangle: np.ndarray


@dataclass
class SubjectAppearance:
    """What the renderer needs of one assembled subject (N vertices, faces (F, 3); see ``scene.py``).

    part: (N,) int8 part id. texture_pos: (N, 3) m where each vertex sits at rest (patterns are functions
    of it, so they are glued to the surface and agree between views). hair_rgb, cloth_rgb: (3,) albedo.
    """

    faces: np.ndarray
    part: np.ndarray
    texture_pos: np.ndarray
    hair_rgb: np.ndarray
    cloth_rgb: np.ndarray


class SubjectRenderer:
    """Renders a posed synthetic subject (head model + hair, teeth, tongue, torso) into cameras.

    Args:
        texture: the head model's texture attributes (``synthetic_texture.npz``), per head vertex.
        photo: (h, w, 3) uint8 photograph the face texture comes from.
    """

    def __init__(self, texture: dict, photo: np.ndarray):
        self.photo = photo.astype(np.float32) / 255.0
        self.head_attrs = np.concatenate([texture["photo_uv"], texture["photo_weight"][:, None],
                                          texture["hair_weight"][:, None], texture["mouth_weight"][:, None]],
                                         1).astype(np.float32)
        self.skin = np.asarray(texture["skin_rgb"], np.float32)
        rng = np.random.default_rng(1234)
        self.tone = Waves(rng, 6, (0.042, 0.084), np.float32)
        self.mottle = Waves(rng, 10, (0.0084, 0.0168), np.float32)
        self.spots = Waves(rng, 14, (0.0035, 0.007), np.float32)
        self.strands = Waves(rng, 12, (0.0021, 0.0042), np.float32)
        self.weave = Waves(rng, 10, (0.0028, 0.0056), np.float32)
        self._rays, self._rays_of = None, None

    def render(self, vertices: np.ndarray, camera: Camera, look: SubjectAppearance,
               background: np.ndarray) -> RenderOutput:
        """Render posed ``vertices`` (N, 3) m into ``camera`` over ``background`` (H, W, 3) float [0, 1].
        Returns linear colour before the camera response (``rgb`` float32) and the hit maps."""
        if self._rays_of is not camera:  # one camera per video: its rays are computed once
            self._rays, self._rays_of = camera_rays(camera), camera
        depth, tri, bary = cast_camera_rays(raycasting_scene(vertices, look.faces), camera, self._rays)
        mask = tri >= 0
        img = background.copy()
        ti, bi = tri[mask], bary[mask]
        if len(ti):
            img[mask] = self._shade(vertices, look, ti, bi)
        return RenderOutput(rgb=img, depth=depth, mask=mask, triangle=tri)

    # -- appearance ----------------------------------------------------------------------------
    def _shade(self, vertices: np.ndarray, look: SubjectAppearance, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
        faces = look.faces
        part = look.part[faces[tri, 0]]
        attrs = np.concatenate([look.texture_pos, vertex_normals(vertices.astype(np.float32), faces)], 1)
        pn = barycentric_interpolate(attrs, faces, tri, bary)
        p, n = pn[:, :3], pn[:, 3:]
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
        lambert = np.clip(n @ LIGHT_DIR, 0, 1)[:, None]
        col = np.empty((len(tri), 3), np.float32)
        head = part == 0
        if head.any():
            col[head] = self._skin(p[head], tri[head], bary[head], faces, lambert[head])
        hair = part == 1
        if hair.any():
            q = p[hair]
            strands = self.strands(q * np.array([1.0, 0.25, 1.0], np.float32))[:, None]
            col[hair] = look.hair_rgb * (1 + 0.18 * strands + 0.08 * self.mottle(q)[:, None]) * (0.4 + 0.7 * lambert[hair])
        teeth = part == 2
        if teeth.any():
            gaps = 0.55 + 0.45 * np.abs(np.sin(np.pi * p[teeth, 0] / 0.008))[:, None] ** 0.3
            col[teeth] = np.array([0.86, 0.83, 0.74], np.float32) * gaps * (0.45 + 0.35 * lambert[teeth])
        tongue = part == 3
        if tongue.any():
            col[tongue] = np.array([0.72, 0.36, 0.38], np.float32) * (1 + 0.1 * self.mottle(p[tongue])[:, None]) * (
                0.4 + 0.3 * lambert[tongue])
        torso = part == 4
        if torso.any():
            q = p[torso]
            check = np.tanh(4 * np.sin(2 * np.pi * q[:, 0] / 0.03) * np.sin(2 * np.pi * q[:, 1] / 0.03))[:, None]
            col[torso] = look.cloth_rgb * (1 + 0.22 * check + 0.12 * self.weave(q)[:, None]) * (0.4 + 0.65 * lambert[torso])
        return col

    def _skin(self, p: np.ndarray, tri: np.ndarray, bary: np.ndarray, faces: np.ndarray, lambert: np.ndarray) -> np.ndarray:
        """The head model's skin: the photograph on the face, procedural skin and scalp paint elsewhere."""
        a = barycentric_interpolate(self.head_attrs, faces, tri, bary)
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
        shade_photo = 0.8 + 0.25 * lambert  # the photograph already carries its own shading
        shade_proc = 0.45 + 0.65 * lambert
        return col * (w_photo * shade_photo + (1 - w_photo) * shade_proc)


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
