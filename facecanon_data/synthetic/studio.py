"""The studio around the synthetic subject, and what each camera of the rig sees of it.

A room (panelled walls in varied colours, some close to skin and hair), a rig behind the subject
(poles, ring bars, camera bodies and light boxes: what a capture dome shows of itself), lit by two
lights. It is static: each camera's clean view of it (the *plate*) is rendered once and every frame is
the subject composited over it, then passed through the camera (gain, white balance, sensor noise).
Real releases ship one still of the empty rig per camera (``sequences/BACKGROUND/image_{serial}.jpg``);
the synthetic one is written the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cameras import Camera
from ..meshes import cast_camera_rays, raycasting_scene
from .procedural import Waves, box

STUDIO_SEED = 7  # one studio for every subject (a real rig does not move between subjects)
LIGHTS = np.array([[0.3, 0.8, 0.6], [-0.6, 0.3, 0.5]])
# Panel colours: greys and blues, a skin-like beige and a hair-like dark brown among them.
PANEL_RGB = np.array([[0.55, 0.56, 0.58], [0.35, 0.37, 0.40], [0.78, 0.60, 0.50], [0.22, 0.15, 0.10],
                      [0.30, 0.38, 0.52], [0.70, 0.70, 0.68], [0.62, 0.47, 0.38], [0.15, 0.15, 0.16]])


@dataclass
class Studio:
    """Triangles (F, 3) of vertices (N, 3) m with a flat albedo (F, 3) and an emission flag (F,) per triangle."""

    vertices: np.ndarray
    faces: np.ndarray
    albedo: np.ndarray
    emissive: np.ndarray


def _quad_panels(corner: np.ndarray, u: np.ndarray, v: np.ndarray, nu: int, nv: int, rng, inward: np.ndarray):
    """A wall as nu x nv quads from ``corner`` along u and v (each quad its own colour)."""
    verts, faces, albedo = [], [], []
    for i in range(nu):
        for j in range(nv):
            c = corner + u * i / nu + v * j / nv
            q = np.array([c, c + u / nu, c + u / nu + v / nv, c + v / nv])
            f = np.array([[0, 1, 2], [0, 2, 3]])
            if np.cross(q[1] - q[0], q[2] - q[0]) @ inward < 0:
                f = f[:, ::-1]
            faces.append(f + len(verts) * 4)
            verts.append(q)
            albedo += [PANEL_RGB[rng.integers(len(PANEL_RGB))] * rng.uniform(0.85, 1.1)] * 2
    return np.concatenate(verts), np.concatenate(faces), np.array(albedo)


def _prism(a: np.ndarray, b: np.ndarray, radius: float, sides: int = 8):
    """A closed prism (pole or bar) from a to b."""
    axis = (b - a) / np.linalg.norm(b - a)
    e1 = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    th = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    ring = radius * (np.cos(th)[:, None] * e1 + np.sin(th)[:, None] * e2)
    verts = np.concatenate([a + ring, b + ring])
    faces = []
    for i in range(sides):
        j = (i + 1) % sides
        faces += [(i, j, sides + j), (i, sides + j, sides + i)]
    return verts, np.array(faces)


def build_studio(seed: int = STUDIO_SEED) -> Studio:
    rng = np.random.default_rng(seed)
    parts = []  # (verts, faces, albedo per face, emissive)
    lo, hi = np.array([-2.4, -1.3, -2.6]), np.array([2.4, 1.7, 2.2])
    size = hi - lo
    centre = (lo + hi) / 2
    walls = [(lo, np.array([size[0], 0, 0]), np.array([0, size[1], 0]), 6, 4),  # back wall
             (np.array([lo[0], lo[1], hi[2]]), np.array([size[0], 0, 0]), np.array([0, size[1], 0]), 6, 4),
             (lo, np.array([0, 0, size[2]]), np.array([0, size[1], 0]), 6, 4),
             (np.array([hi[0], lo[1], lo[2]]), np.array([0, 0, size[2]]), np.array([0, size[1], 0]), 6, 4),
             (lo, np.array([size[0], 0, 0]), np.array([0, 0, size[2]]), 5, 5),  # floor
             (np.array([lo[0], hi[1], lo[2]]), np.array([size[0], 0, 0]), np.array([0, 0, size[2]]), 5, 5)]
    for corner, u, v, nu, nv in walls:
        mid = corner + u / 2 + v / 2
        verts, faces, albedo = _quad_panels(corner, u, v, nu, nv, rng, centre - mid)
        parts.append((verts, faces, albedo, False))
    metal, dark = np.array([0.45, 0.46, 0.48]), np.array([0.08, 0.08, 0.09])
    # The rig behind and beside the subject: poles on a 1.35 m circle, two ring bars, cameras and lights.
    az = np.radians(np.arange(100, 261, 20))
    ring = [np.array([1.35 * np.sin(a), 0.0, 1.35 * np.cos(a)]) for a in az]
    for p in ring:
        v, f = _prism(p + [0, -1.3, 0], p + [0, 1.2, 0], 0.02)
        parts.append((v, f, np.tile(metal, (len(f), 1)), False))
    for y in (-0.45, 0.55):
        for p, q in zip(ring[:-1], ring[1:]):
            v, f = _prism(p + [0, y, 0], q + [0, y, 0], 0.015)
            parts.append((v, f, np.tile(metal * 0.9, (len(f), 1)), False))
    for k, p in enumerate(ring):
        out = -p / np.linalg.norm(p)  # facing the subject
        rot = np.stack([np.cross([0, 1, 0], out), [0, 1, 0], out], 1)
        y = 0.12 if k % 2 else -0.2
        v, f = box(p * 0.97 + [0, y, 0], (0.07, 0.06, 0.11), rot)
        parts.append((v, f, np.tile(dark, (len(f), 1)), False))
        if k % 3 == 1:  # a light box above every third camera
            v, f = box(p * 0.95 + [0, 0.75, 0], (0.35, 0.25, 0.06), rot)
            parts.append((v, f, np.tile([0.97, 0.97, 0.95], (len(f), 1)), True))
    verts, faces, albedo, emissive, n = [], [], [], [], 0
    for v, f, a, e in parts:
        verts.append(v)
        faces.append(f + n)
        albedo.append(a)
        emissive.append(np.full(len(f), e))
        n += len(v)
    return Studio(np.concatenate(verts).astype(np.float32), np.concatenate(faces).astype(np.int64),
                  np.clip(np.concatenate(albedo), 0, 1).astype(np.float32), np.concatenate(emissive))


def render_plate(studio: Studio, camera: Camera) -> np.ndarray:
    """The clean view (H, W, 3) float32 in [0, 1] of the empty studio from ``camera``: flat albedo with
    fine texture (a function of the world position, so views agree), two Lambert lights and ambient."""
    scene = raycasting_scene(studio.vertices, studio.faces)
    depth, tri, _ = cast_camera_rays(scene, camera)
    h, w = tri.shape
    img = np.full((h, w, 3), 0.5, np.float32)
    hit = tri >= 0
    t = tri[hit]
    origin, dirs = camera.pixel_rays()  # unit camera-z directions: the ray parameter is the depth
    dirs = dirs[hit]
    p = (origin + dirs * depth[hit][:, None]).astype(np.float32)
    v = studio.vertices[studio.faces[t]]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    n *= -np.sign((n * dirs).sum(1, keepdims=True))  # face the camera
    rng = np.random.default_rng(STUDIO_SEED + 1)
    coarse, fine = Waves(rng, 8, (0.05, 0.12))(p), Waves(rng, 12, (0.006, 0.02))(p)
    tex = 1 + 0.10 * coarse[:, None] + 0.07 * fine[:, None]
    light = 0.35 + sum(0.4 * np.clip(n @ (d / np.linalg.norm(d)), 0, 1) for d in LIGHTS)[:, None]
    col = studio.albedo[t] * tex * light
    col[studio.emissive[t]] = studio.albedo[t][studio.emissive[t]]
    img[hit] = col
    return np.clip(img, 0, 1)


def camera_response(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) per-camera gain x white balance: rigs are not perfectly uniform (+-6 %, +-3 %)."""
    return (rng.uniform(0.94, 1.06, (count, 1)) * rng.uniform(0.97, 1.03, (count, 3))).astype(np.float32)


CCM_TERMS = 10  # Cheung 2004's quadratic terms: within half an 8-bit level on average (3 or 4 terms: ~0.45)
CCM_FIT_SAMPLES = 20000


def response_correction(response: np.ndarray, terms: int = CCM_TERMS) -> np.ndarray:
    """(3, terms) colour-correction matrix in NeRSemble's ``color_calibration.json`` format that maps a
    camera with ``response`` (3,) (:func:`expose`, applied to sRGB-encoded values) back to the reference
    (response 1): least squares in linear RGB over colours spread through the sRGB cube, those the camera
    does not clip. Deterministic (its own fixed sample, no random stream consumed)."""
    from ..sources.color import augment_cheung2004, srgb_to_linear

    reference = np.random.default_rng(0).uniform(0, 1, (CCM_FIT_SAMPLES, 3))
    seen = reference * response.astype(np.float64)
    unclipped = (seen <= 1).all(axis=1)
    design = augment_cheung2004(srgb_to_linear(seen[unclipped]), terms)
    solution, *_ = np.linalg.lstsq(design, srgb_to_linear(reference[unclipped]), rcond=None)
    return solution.T


def expose(image: np.ndarray, response: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Through the camera: (H, W, 3) float [0, 1] x response (3,) + Gaussian sensor noise -> uint8."""
    out = image * response
    out += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
    np.clip(out, 0, 1, out=out)
    out *= 255
    out += 0.5
    return out.astype(np.uint8)
