"""Pinhole cameras in the OpenCV convention (x right, y down, z forward), meters and pixels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# NeRSemble v2's 16 camera serials, in the order of its calibration files; 222200037 is frontal.
NERSEMBLE_SERIALS = ("222200042", "222200044", "222200046", "222200040", "222200036", "222200048",
                     "220700191", "222200041", "222200037", "222200038", "222200047", "222200043",
                     "222200049", "222200039", "222200045", "221501007")
FRONTAL_SERIAL = "222200037"


def scale_intrinsics(k: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K of an image resized by (sx, sy), pixel centres at integer coordinates: (3, 3) float64."""
    out = np.asarray(k, dtype=np.float64).copy()
    out[0, 0] *= sx
    out[1, 1] *= sy
    out[0, 2] = (out[0, 2] + 0.5) * sx - 0.5
    out[1, 2] = (out[1, 2] + 0.5) * sy - 0.5
    return out


@dataclass(frozen=True)
class Camera:
    """One calibrated view.

    K: (3, 3) float64 intrinsics in pixels of a ``width`` x ``height`` image.
    world_2_cam: (4, 4) float64 rigid transform, meters.
    """

    serial: str
    K: np.ndarray
    world_2_cam: np.ndarray
    width: int
    height: int

    def scaled(self, downscale: float) -> "Camera":
        """The same camera for an image resized by 1/downscale (pixel-centre convention)."""
        if downscale == 1:
            return self
        s = 1.0 / downscale
        k = scale_intrinsics(self.K, s, s)
        return Camera(self.serial, k, self.world_2_cam, int(round(self.width * s)), int(round(self.height * s)))

    @property
    def center(self) -> np.ndarray:
        """(3,) camera centre in world coordinates, meters."""
        r, t = self.world_2_cam[:3, :3], self.world_2_cam[:3, 3]
        return -r.T @ t

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) world points -> ((N, 2) pixel coordinates, (N,) depth along the optical axis)."""
        cam = points @ self.world_2_cam[:3, :3].T + self.world_2_cam[:3, 3]
        z = cam[:, 2]
        uvw = cam @ self.K.T
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = uvw[:, :2] / z[:, None]
        return uv, z

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Rays through pixel centres: origin (3,) and (H, W, 3) directions with unit camera-z,
        so that a ray parameter t equals the depth along the optical axis."""
        u, v = np.meshgrid(np.arange(self.width) + 0.0, np.arange(self.height) + 0.0)
        pix = np.stack([u, v, np.ones_like(u)], -1)
        d_cam = pix @ np.linalg.inv(self.K).T
        d_world = d_cam @ self.world_2_cam[:3, :3]  # R^T d for each row
        return self.center, d_world


def look_at(position: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 1.0, 0.0])) -> np.ndarray:
    """world_2_cam (4, 4) of an OpenCV camera at ``position`` looking at ``target``."""
    z = target - position
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, :3] = np.stack([x, y, z])
    m[:3, 3] = -m[:3, :3] @ position
    return m


def write_cameras_json(path, cameras: dict[str, Camera]) -> None:
    """``{serial: {K, world_2_cam, width, height}}`` (the per-timestamp ``cameras.json`` of reconstruct),
    written atomically."""
    import json
    from pathlib import Path

    from .artifacts import atomic_write

    table = {s: {"K": c.K.tolist(), "world_2_cam": c.world_2_cam.tolist(), "width": c.width, "height": c.height}
             for s, c in cameras.items()}
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(table)))


def read_cameras_json(path) -> dict[str, Camera]:
    """The cameras a ``cameras.json`` holds (see :func:`write_cameras_json`), serial order kept."""
    import json
    from pathlib import Path

    table = json.loads(Path(path).read_text())
    return {s: Camera(s, np.asarray(c["K"], np.float64), np.asarray(c["world_2_cam"], np.float64), c["width"],
                      c["height"]) for s, c in table.items()}
