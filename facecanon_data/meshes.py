"""Triangle-mesh connectivity shared by the head model, the tracker and the synthetic builder."""
from __future__ import annotations

import numpy as np


def adjacency(num_vertices: int, faces: np.ndarray):
    """Symmetric (V, V) scipy CSR matrix with 1 where two vertices share an edge."""
    import scipy.sparse as sp

    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(num_vertices,) * 2).tocsr()
    a.data[:] = 1.0
    return a


# -- open3d ray-casting scenes: closest points, distances and camera rays against a triangle mesh
# (one helper for what the tracker, canonicalize, render, the ground truth and the generator all need)


def raycasting_scene(vertices: np.ndarray, faces: np.ndarray):
    """An open3d ``RaycastingScene`` holding one mesh: vertices (V, 3) m, faces (F, 3)."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(faces, np.uint32)))
    return scene


def uv_to_barycentric(uv: np.ndarray) -> np.ndarray:
    """open3d's primitive uvs (..., 2) -> barycentric weights (..., 3) of the triangle's vertices."""
    return np.stack([1.0 - uv[..., 0] - uv[..., 1], uv[..., 0], uv[..., 1]], -1).astype(np.float32)


def barycentric_interpolate(attribute: np.ndarray, faces: np.ndarray, triangle: np.ndarray,
                            bary: np.ndarray) -> np.ndarray:
    """A per-vertex attribute (V, C) at surface points given by triangle (N,) and bary (N, 3) -> (N, C)."""
    return np.einsum("nkc,nk->nc", attribute[faces[triangle]], bary)


def closest_points(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact closest surface point of each of (N, 3) points: (closest (N, 3) m, triangle (N,) int64,
    bary (N, 3) float32)."""
    import open3d as o3d

    from .threads import open3d_threads

    res = raycasting_scene(vertices, faces).compute_closest_points(
        o3d.core.Tensor(np.ascontiguousarray(points, np.float32)), nthreads=open3d_threads())
    return (res["points"].numpy(), res["primitive_ids"].numpy().astype(np.int64),
            uv_to_barycentric(res["primitive_uvs"].numpy()))


def point_to_mesh_distance(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Unsigned distance (N,) m of (N, 3) points to the mesh surface."""
    import open3d as o3d

    scene = raycasting_scene(vertices, faces)
    return scene.compute_distance(o3d.core.Tensor(np.ascontiguousarray(points, np.float32))).numpy()


def camera_rays(camera) -> np.ndarray:
    """(H, W, 6) float32 rays (origin, direction with unit camera-z) through the pixel centres."""
    origin, dirs = camera.pixel_rays()
    return np.concatenate([np.broadcast_to(origin, dirs.shape), dirs], -1).astype(np.float32)


def cast_camera_rays(scene, camera, rays: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ray per pixel of ``camera`` into ``scene``: (t (H, W) float32 m along the ray, 0 = miss;
    triangle (H, W) int64, -1 = miss; bary (H, W, 3) float32). ``rays``: :func:`camera_rays` of the
    camera, when the caller casts into it many times."""
    import open3d as o3d

    from .threads import open3d_threads

    rays = camera_rays(camera) if rays is None else rays
    hit = scene.cast_rays(o3d.core.Tensor(rays), nthreads=open3d_threads())
    t = hit["t_hit"].numpy()
    valid = np.isfinite(t)
    triangle = np.where(valid, hit["primitive_ids"].numpy().astype(np.int64), -1)
    return np.where(valid, t, 0.0).astype(np.float32), triangle, uv_to_barycentric(hit["primitive_uvs"].numpy())
