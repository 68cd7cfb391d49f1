"""FLAME-format model assets: the head model, its vertex masks and its landmark embedding.

One loader serves the licensed FLAME 2020 / 2023 files and the project's synthetic head, which is stored
in exactly FLAME's key layout. Pickles go through :mod:`facecanon_data.flame.safe_pickle`; the arrays are
cached beside the pickle as ``.npz`` so later loads are plain numpy reads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ..artifacts import atomic_write
from ..errors import InputError, InputFileNotFound

FLAME_NUM_SHAPE = 300  # FLAME's shapedirs: 300 identity columns followed by 100 expression columns.
FLAME_NUM_JOINTS = 5  # global, neck, jaw, left eye, right eye
# The keys of FLAME 2020's FLAME_masks.pkl (the synthetic head writes exactly these).
MASK_NAMES = ("boundary", "eye_region", "face", "forehead", "left_ear", "left_eye_region", "left_eyeball", "lips",
              "neck", "nose", "right_ear", "right_eye_region", "right_eyeball", "scalp")
# Names the pipeline may use for unions of file masks (the file has no such keys).
MASK_UNIONS = {"eyeballs": ("left_eyeball", "right_eyeball"), "ears": ("left_ear", "right_ear")}
_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")


class AssetError(InputError, ValueError):
    """A model, mask or embedding file is missing a key or has a wrong shape; names the file."""


@dataclass(frozen=True)
class FlameModel:
    """A FLAME-layout linear head model (numpy, float32).

    Attributes:
        v_template: (V, 3) float32, meters. Mean head, zero pose.
        faces: (F, 3) int64 vertex indices.
        shapedirs: (V, 3, S) float32, meters per unit coefficient. Identity blendshapes.
        exprdirs: (V, 3, E) float32. Expression blendshapes.
        posedirs: (P, V*3) float32 with P = 9 * (J - 1). Pose-corrective blendshapes, applied to the
            flattened (R - I) of every non-root joint (smplx's layout).
        J_regressor: (J, V) float32 dense. Joint locations as vertex combinations.
        lbs_weights: (V, J) float32, rows sum to 1.
        parents: (J,) int64, parents[0] == -1.
        source: file the model came from; ``digest`` its content hash (for provenance).
    """

    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    exprdirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    lbs_weights: np.ndarray
    parents: np.ndarray
    source: str = ""
    digest: str = ""

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_shape(self) -> int:
        return int(self.shapedirs.shape[2])

    @property
    def num_expression(self) -> int:
        return int(self.exprdirs.shape[2])


@dataclass(frozen=True)
class LandmarkEmbedding:
    """MediaPipe landmarks embedded on the mesh surface.

    Attributes:
        face_idx: (L,) int64 triangle index per landmark.
        bary: (L, 3) float32 barycentric coordinates in that triangle.
        mediapipe_idx: (L,) int64 index into MediaPipe's 478 landmarks.
    """

    face_idx: np.ndarray
    bary: np.ndarray
    mediapipe_idx: np.ndarray

    def points(self, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """(..., V, 3) vertices -> (..., L, 3) landmark positions."""
        tri = vertices[..., faces[self.face_idx], :]  # (..., L, 3, 3)
        return np.einsum("...lkc,lk->...lc", tri, self.bary)


@dataclass(frozen=True)
class FlameAssets:
    model: FlameModel
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # file key -> (K,) int64 vertex ids
    embedding: LandmarkEmbedding | None = None
    masks_source: str = ""  # the masks file ("" when the pipeline configures none)

    def mask(self, name: str) -> np.ndarray:
        """(K,) int64 vertex ids of a mask of the file, or of a union in :data:`MASK_UNIONS`.

        A name the file lacks is an :class:`AssetError` listing the names it has (never silently empty).
        """
        parts = MASK_UNIONS.get(name, (name,))
        missing = [p for p in parts if p not in self.masks]
        if missing:
            where = self.masks_source or "the pipeline (flame.masks is not set)"
            have = ", ".join(sorted(self.masks)) or "none"
            union = f" (the union of {' and '.join(parts)})" if name in MASK_UNIONS else ""
            raise AssetError(f"{where}: no mask {name!r}{union}; it has: {have}")
        return np.unique(np.concatenate([self.masks[p] for p in parts]))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# The FLAME family: FLAME has 5023 vertices and 5 joints; SMPL-X, the largest relative, 10475 and 55.
MAX_VERTICES = 100_000
MAX_JOINTS = 128


def _dense(a, source: str, key: str, max_shape: tuple[int, int]) -> np.ndarray:
    """A (sparse or dense) 2-D array as dense, refusing shapes beyond what the model family holds."""
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) != 2 or any(not 0 < int(n) <= m for n, m in zip(shape, max_shape)):
        raise AssetError(f"{source}: {key} has shape {shape}; the FLAME family holds at most {max_shape}")
    return np.asarray(a.toarray() if hasattr(a, "toarray") else a)


def model_from_flame_dict(raw: dict, source: str, digest: str) -> FlameModel:
    """Build a :class:`FlameModel` from a FLAME pickle's dict; validates keys and shapes."""
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise AssetError(f"{source}: missing keys {missing} (expected FLAME's layout)")
    v = np.asarray(raw["v_template"], np.float32)
    if v.ndim != 2 or v.shape[1] != 3:
        raise AssetError(f"{source}: v_template has shape {v.shape}, expected (V, 3)")
    n_v = v.shape[0]
    dirs = np.asarray(raw["shapedirs"], np.float32)
    if dirs.shape[:2] != (n_v, 3):
        raise AssetError(f"{source}: shapedirs has shape {dirs.shape}, expected ({n_v}, 3, K)")
    n_shape = min(FLAME_NUM_SHAPE, dirs.shape[2])
    posedirs = np.asarray(raw["posedirs"], np.float32)
    if posedirs.shape[:2] != (n_v, 3):
        raise AssetError(f"{source}: posedirs has shape {posedirs.shape}, expected ({n_v}, 3, P)")
    if n_v > MAX_VERTICES:
        raise AssetError(f"{source}: v_template has {n_v} vertices; the FLAME family holds at most {MAX_VERTICES}")
    J = _dense(raw["J_regressor"], source, "J_regressor", (MAX_JOINTS, MAX_VERTICES)).astype(np.float32)
    weights = np.asarray(raw["weights"], np.float32)
    kintree = np.asarray(raw["kintree_table"]).astype(np.int64)
    n_j = J.shape[0]
    if J.shape != (n_j, n_v) or weights.shape != (n_v, n_j):
        raise AssetError(f"{source}: J_regressor {J.shape} / weights {weights.shape} disagree with V={n_v}")
    if posedirs.shape[2] != 9 * (n_j - 1):
        raise AssetError(f"{source}: posedirs has {posedirs.shape[2]} columns, expected {9 * (n_j - 1)}")
    parents = kintree[0].copy()
    parents[0] = -1
    faces = np.asarray(raw["f"]).astype(np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.max() >= n_v or faces.min() < 0:
        raise AssetError(f"{source}: f is not a (F, 3) index array into {n_v} vertices")
    return FlameModel(
        v_template=v, faces=faces,
        shapedirs=np.ascontiguousarray(dirs[:, :, :n_shape]),
        exprdirs=np.ascontiguousarray(dirs[:, :, n_shape:]),
        posedirs=np.ascontiguousarray(posedirs.reshape(n_v * 3, -1).T),
        J_regressor=J, lbs_weights=weights, parents=parents, source=source, digest=digest,
    )


_CACHE_VERSION = 1


def load_flame_model(path: str | Path, cache: bool = True) -> FlameModel:
    """Load a FLAME-layout model from ``.pkl`` (restricted unpickler) or its ``.npz`` cache.

    The cache ``<name>.npz`` is written beside the pickle (if the folder is writable) and used when it
    records the same content digest as the pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: FLAME model file not found (see flame_assets/README.md)")
    digest = _file_digest(path)
    if path.suffix == ".npz":
        return _model_from_npz(path, digest)
    cache_path = path.with_suffix(".npz")
    if cache and cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as z:
                if str(z["source_digest"]) == digest and int(z["cache_version"]) == _CACHE_VERSION:
                    return _model_from_npz(cache_path, digest, source=str(path))
        except (KeyError, ValueError, OSError):
            pass  # stale or foreign cache: rebuild it below
    from .safe_pickle import safe_load_pickle

    raw = safe_load_pickle(path)
    if not isinstance(raw, dict):
        raise AssetError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    model = model_from_flame_dict(raw, str(path), digest)
    if cache:
        try:
            _save_npz(model, cache_path)
        except OSError:
            pass  # read-only asset folder: the pickle is still the source of truth
    return model


def _save_npz(model: FlameModel, path: Path) -> None:
    atomic_write(path, lambda tmp: np.savez(
        tmp, v_template=model.v_template, faces=model.faces, shapedirs=model.shapedirs, exprdirs=model.exprdirs,
        posedirs=model.posedirs, J_regressor=model.J_regressor, lbs_weights=model.lbs_weights, parents=model.parents,
        source_digest=np.array(model.digest), cache_version=np.array(_CACHE_VERSION)))


def _model_from_npz(path: Path, digest: str, source: str | None = None) -> FlameModel:
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        need = {"v_template", "faces", "shapedirs", "exprdirs", "posedirs", "J_regressor", "lbs_weights", "parents"}
        if not need <= keys:
            raise AssetError(f"{path}: missing arrays {sorted(need - keys)}")
        return FlameModel(
            v_template=z["v_template"].astype(np.float32), faces=z["faces"].astype(np.int64),
            shapedirs=z["shapedirs"].astype(np.float32), exprdirs=z["exprdirs"].astype(np.float32),
            posedirs=z["posedirs"].astype(np.float32), J_regressor=z["J_regressor"].astype(np.float32),
            lbs_weights=z["lbs_weights"].astype(np.float32), parents=z["parents"].astype(np.int64),
            source=source or str(path), digest=str(z["source_digest"]) if "source_digest" in keys else digest,
        )


def load_masks(path: str | Path, num_vertices: int) -> dict[str, np.ndarray]:
    """Read ``FLAME_masks.pkl`` (or the synthetic model's equivalent): name -> (K,) int64 vertex ids."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    else:
        from .safe_pickle import safe_load_pickle

        raw = safe_load_pickle(path)
    if not isinstance(raw, dict):
        raise AssetError(f"{path}: expected a dict of vertex-index arrays")
    masks = {}
    for name, idx in raw.items():
        idx = np.asarray(idx).astype(np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= num_vertices):
            raise AssetError(f"{path}: mask {name!r} indexes outside {num_vertices} vertices")
        masks[str(name)] = idx
    return masks


def load_landmark_embedding(path: str | Path, num_faces: int) -> LandmarkEmbedding:
    """Read a MediaPipe landmark embedding (``lmk_face_idx``, ``lmk_b_coords``, ``landmark_indices``)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: landmark embedding not found")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("lmk_face_idx", "lmk_b_coords", "landmark_indices") if k not in z.files]
        if missing:
            raise AssetError(f"{path}: missing arrays {missing}")
        face_idx = z["lmk_face_idx"].astype(np.int64).ravel()
        bary = z["lmk_b_coords"].astype(np.float32).reshape(-1, 3)
        mp_idx = z["landmark_indices"].astype(np.int64).ravel()
    if not (len(face_idx) == len(bary) == len(mp_idx)):
        raise AssetError(f"{path}: lmk_face_idx, lmk_b_coords and landmark_indices differ in length")
    if face_idx.max() >= num_faces or mp_idx.max() >= 478 or mp_idx.min() < 0:
        raise AssetError(f"{path}: indices out of range (faces {num_faces}, MediaPipe 478)")
    return LandmarkEmbedding(face_idx=face_idx, bary=bary, mediapipe_idx=mp_idx)


def load_assets(flame_cfg) -> FlameAssets:
    """The head model of a pipeline (``FlameConfig``): FLAME files, or the synthetic head (built on first use)."""
    from ..paths import expand

    if flame_cfg.kind == "synthetic":
        from .synthetic_head import ensure_head_model

        files = ensure_head_model(expand(flame_cfg.synthetic_dir))
        model_path, masks_path, emb_path = files.model, files.masks, files.embedding
    else:
        if not flame_cfg.model:
            raise AssetError("flame.model is not set: point it at FLAME's generic_model.pkl (flame_assets/README.md)")
        model_path = expand(flame_cfg.model)
        masks_path = expand(flame_cfg.masks) if flame_cfg.masks else None
        emb_path = expand(flame_cfg.embedding) if flame_cfg.embedding else None
    model = load_flame_model(model_path)
    masks = load_masks(masks_path, model.num_vertices) if masks_path else {}
    emb = load_landmark_embedding(emb_path, len(model.faces)) if emb_path else None
    return FlameAssets(model=model, masks=masks, embedding=emb, masks_source=str(masks_path or ""))
