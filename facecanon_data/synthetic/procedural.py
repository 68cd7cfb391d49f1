"""Procedural geometry and texture shared by the synthetic scene, its studio and its renderer."""
from __future__ import annotations

import numpy as np


class Waves:
    """Band-limited random field: a sum of ``count`` plane waves with random directions, phases and
    wavelengths uniform in ``wavelength_m`` (lo, hi) meters; unit variance.

    Chosen over lattice noise because it is a handful of vectorized sin() calls per point. ``dtype``:
    float64 for geometry, float32 for per-pixel shading (evaluated in float32 when the points are too).
    """

    def __init__(self, rng: np.random.Generator, count: int, wavelength_m: tuple[float, float], dtype=np.float64):
        d = rng.normal(size=(count, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = 2 * np.pi / rng.uniform(*wavelength_m, size=count)
        self.omega = (d * k[:, None]).T.astype(dtype)  # (3, count) rad/m
        self.phase = rng.uniform(0, 2 * np.pi, size=count).astype(dtype)
        self.norm = dtype(np.sqrt(count / 2.0))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) points, meters -> (N,) field values."""
        arg = points @ self.omega
        arg += self.phase
        np.sin(arg, out=arg)
        return arg.sum(1) / self.norm


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (..., V, 3) of vertices (..., V, 3); faces (F, 3)."""
    v = vertices
    fn = np.cross(v[..., faces[:, 1], :] - v[..., faces[:, 0], :], v[..., faces[:, 2], :] - v[..., faces[:, 0], :])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, (..., faces[:, k], slice(None)), fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=-1, keepdims=True), 1e-12)


def box(center, size, rotation=np.eye(3)) -> tuple[np.ndarray, np.ndarray]:
    """Closed box of ``size`` (3,) m, rotated, at ``center`` (3,) m: vertices (8, 3) and 12 outward faces."""
    c = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) * np.asarray(size) / 2
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return c @ np.asarray(rotation).T + center, faces
