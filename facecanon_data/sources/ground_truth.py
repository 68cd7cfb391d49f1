"""Ground truth of a synthetic subject, kept apart from the capture the pipeline reads.

On disk, ``{gt_root}/{pid}/``:
  ``subject.npz``  shape (S,), offsets (V, 3) (smooth bumps + detail), canonical_vertices (V, 3),
                   faces (F, 3), model_digest; the whole subject (head model + hair, teeth, tongue, torso;
                   ``synthetic/scene.py``): scene_faces (Fs, 3), scene_part (N,) into part_names,
                   scene_canonical (N, 3) (0 on the torso)
  ``{SEQ}.npz``    per frame: expression (T, E), global_rot/neck/jaw/left_eye/right_eye/translation
                   (T, 3), vertices (T, V, 3) float32 posed head model in world meters, scene_vertices
                   (T, N, 3) the whole subject (its first V rows are ``vertices``), detail_weights (T, K)
Captures written before the scene existed have no ``scene_*`` arrays: the head model is then the subject.

Per-view maps are not stored (16 views x frames x 4 float channels would be gigabytes); they are
ray-cast on request from the stored posed mesh with the ray caster (``meshes.cast_camera_rays``) and
cameras that made the images, so they are exactly the ground truth of what the video shows.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..cameras import Camera
from ..errors import InputError


def file_digest(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class GroundTruthMismatch(InputError, ValueError):
    """The ground truth belongs to another capture than the one being read."""


class SyntheticGroundTruth:
    def __init__(self, folder: str | Path, cameras: dict[str, Camera], calibration_file: str | Path | None = None):
        self.folder = Path(folder)
        path = self.folder / "subject.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ground-truth subject file not found")
        with np.load(path, allow_pickle=False) as z:
            self.subject = {k: z[k] for k in z.files}
        if calibration_file is not None and "calibration_digest" in self.subject:
            if str(self.subject["calibration_digest"]) != file_digest(calibration_file):
                raise GroundTruthMismatch(f"{path}: ground truth was written for another capture "
                                          f"(calibration differs from {calibration_file})")
        self.cameras = cameras
        self._sequence = lru_cache(maxsize=4)(self._load_sequence)

    @property
    def faces(self) -> np.ndarray:
        return self.subject["faces"]

    def canonical_vertices(self) -> np.ndarray:
        """(V, 3) float32 canonical mesh: shape + static offsets, zero expression and pose."""
        return self.subject["canonical_vertices"]

    def _load_sequence(self, sequence: str) -> dict[str, np.ndarray]:
        path = self.folder / f"{sequence}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ground truth for sequence {sequence!r} not found")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if "vertices" not in arrays or arrays["vertices"].ndim != 3:
            raise InputError(f"{path}: no per-frame 'vertices' array (T, V, 3)")
        frames = len(arrays["vertices"])
        for name, a in arrays.items():  # every array is indexed by frame in frame()
            if a.ndim == 0 or len(a) != frames:
                raise InputError(f"{path}: array {name!r} of shape {a.shape} is not per frame "
                                 f"(expected {frames} rows, as 'vertices')")
        return arrays

    def frame(self, sequence: str, frame: int) -> dict[str, np.ndarray]:
        """Parameters and posed ``vertices`` (V, 3) of one frame."""
        seq = self._sequence(sequence)
        if not 0 <= frame < len(seq["vertices"]):
            raise IndexError(f"{self.folder}/{sequence}.npz: frame {frame} out of range")
        return {k: v[frame] for k, v in seq.items()}

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(str(p) for p in self.subject.get("part_names", np.array(["head"])))

    def scene(self, sequence: str, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The whole subject of one frame: vertices (N, 3) m, faces (F, 3), part (N,) int8 into
        :attr:`part_names`, canonical (N, 3) m (0 where not head)."""
        f = self.frame(sequence, frame)
        if "scene_vertices" not in f:
            v = f["vertices"]
            return v, self.faces, np.zeros(len(v), np.int8), self.canonical_vertices()
        return f["scene_vertices"], self.subject["scene_faces"], self.subject["scene_part"], self.subject["scene_canonical"]

    def view_maps(self, sequence: str, frame: int, serial: str, downscale: float = 1) -> dict[str, np.ndarray]:
        """Ground-truth maps of one view, from the whole subject:
        depth (H, W) m of whatever the subject shows (0 = studio); foreground (H, W) bool the subject;
        mask (H, W) bool its head (head model, hair, teeth, tongue: everything but the torso);
        canonical (H, W, 3) m on the head (0 elsewhere); part (H, W) int8 (-1 = studio);
        triangle (H, W) int64 of the scene (-1 = studio), bary (H, W, 3) float32 in it; faces (F, 3) the
        scene's triangles."""
        from ..meshes import barycentric_interpolate, cast_camera_rays, raycasting_scene

        vertices, faces, part_of_vertex, canonical_vertices = self.scene(sequence, frame)
        cam = self.cameras[serial].scaled(downscale)
        depth, triangle, bary = cast_camera_rays(raycasting_scene(vertices, faces), cam)  # ray parameter = depth
        foreground = triangle >= 0
        part = np.full(foreground.shape, -1, np.int8)
        part[foreground] = part_of_vertex[faces[triangle[foreground], 0]]
        names = self.part_names
        mask = foreground & (part != names.index("torso")) if "torso" in names else foreground
        canonical = np.zeros((*mask.shape, 3), np.float32)
        canonical[mask] = barycentric_interpolate(canonical_vertices.astype(np.float32), faces,
                                                  triangle[mask], bary[mask])
        return {"depth": depth, "foreground": foreground, "mask": mask, "canonical": canonical, "part": part,
                "triangle": triangle, "bary": bary, "faces": faces}
