"""Any model scored on the store: the frames it consumes, written out, and the maps it returns, read back.

The round trip: ``export-frames`` writes the protocol's test views as image folders, an external model
(for example the released Face Anything inference) runs on them anywhere, and ``evaluate --predictions``
scores its files under the same protocol (:func:`~facecanon_data.training.evaluate.run_protocol`) as the
bundled model in process.

Frames (``export_frames``), per evaluated subject, sequence and camera::

    OUT/{subject}/{sequence}/{serial}/images/{frame:05d}.png   RGB as stored, in frame order
    OUT/{subject}/{sequence}/{serial}/cameras.json             frames, width, height, per frame the
                                                               intrinsics (3, 3) in pixels of these images
                                                               and world_2_cam (4, 4), metres

Predictions, per subject, sequence and camera, in the same folder layout under the predictions folder,
one of:

- ``predictions.npz`` (this project's format): ``depth`` (N, H, W) float32, any positive scale (aligned per
  image by the protocol); ``canonical`` (N, H, W, 3) float32, any units and frame (matched by nearest
  neighbours, so no convention is assumed); optional ``valid`` (N, H, W) bool (default: everywhere),
  ``frames`` (N,) int (checked against the exported frames when present) and ``depth_monocular``
  (N, H, W): the depth of each image predicted alone (the monocular table uses it when present, ``depth``
  otherwise).
- ``raw_predictions.npz`` (the released Face Anything ``run_inference.py``): ``depth`` (N, H, W) relative,
  ``canonical`` (N, H, W, 3), ``valid`` (N, H, W) bool, ``intrinsics`` (N, 3, 3), ``extrinsics`` (N, 4, 4)
  and ``conf`` (N, H, W) or empty, which the protocol does not use.

N is the number of exported frames of that camera, in frame order. Maps at another resolution than the
protocol's are resampled to it by nearest neighbour (no value is blended with an invalid one). Files are
read with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write
from ..errors import InputValueError
from .config import EvalConfig
from .dataset import FaceCanonDataset
from .evaluate import PredictedMaps, camera_frames, protocol_dataset

OWN_FILE, RELEASED_FILE = "predictions.npz", "raw_predictions.npz"


def camera_folder(root: str | Path, subject: str, sequence: str, serial: str) -> Path:
    return Path(root) / subject / sequence / serial


def export_frames(store: str, cfg: EvalConfig, out: str | Path, progress=None) -> dict:
    """Write the protocol's views of ``store`` as image folders under ``out`` (module docstring).
    ``progress(done, total)`` is called after each camera folder. Returns counts: subjects, cameras
    (folders) and images."""
    import cv2

    ds, views, missing = protocol_dataset(store, cfg)
    rows = ds.rows
    plan = [(subject, key, sel) for subject, ids in views.items() for key, sel in camera_frames(ds, ids).items()]
    images = 0
    for done, (subject, (sequence, serial), sel) in enumerate(plan, 1):
        folder = camera_folder(out, subject, sequence, serial)
        frames, ks, w2cs = [], [], []
        for i in sel.tolist():
            view = ds.read_view(i)
            frame = int(rows["frame"][i])
            rgb = np.ascontiguousarray(view["rgb"][..., ::-1])  # OpenCV writes BGR
            atomic_write(folder / "images" / f"{frame:05d}.png", lambda p, rgb=rgb: _imwrite(cv2, p, rgb))
            frames.append(frame)
            ks.append(view["K"].astype(float).tolist())
            w2cs.append(view["world_2_cam"].astype(float).tolist())
            height, width = view["rgb"].shape[:2]
            images += 1
        meta = {"subject": subject, "sequence": sequence, "serial": serial, "frames": frames,
                "width": width, "height": height, "intrinsics": ks, "world_2_cam": w2cs, "units": "metres",
                "protocol": cfg.name}
        atomic_write(folder / "cameras.json", lambda p, meta=meta: p.write_text(json.dumps(meta)))
        if progress:
            progress(done, len(plan))
    return {"subjects": list(views), "missing_subjects": missing, "cameras": len(plan), "images": images,
            "out": str(out)}


def _imwrite(cv2, path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write the image")


def _nearest(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, ph, pw, ...) -> (N, h, w, ...): each target pixel takes the source pixel under its centre."""
    ph, pw = maps.shape[1:3]
    if (ph, pw) == (h, w):
        return maps
    ys = np.minimum(((np.arange(h) + 0.5) * ph / h).astype(np.int64), ph - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * pw / w).astype(np.int64), pw - 1)
    return maps[:, ys[:, None], xs[None, :]]


def read_prediction_file(path: Path, frames: list[int], h: int, w: int) -> dict[str, np.ndarray]:
    """One camera's predictions file -> {"depth", "canonical", "valid", "depth_monocular"?} at (h, w),
    (N, h, w[, 3]) for the N exported ``frames``. Raises :class:`InputValueError` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputValueError(f"{path}: not a readable .npz file ({exc})") from None
    n = len(frames)
    for key in ("depth", "canonical"):
        if key not in data:
            raise InputValueError(f"{path}: no array {key!r} (has {sorted(data)})")
    depth, canonical = data["depth"], data["canonical"]
    if depth.ndim != 3 or canonical.shape != depth.shape + (3,):
        raise InputValueError(f"{path}: depth must be (N, H, W) and canonical (N, H, W, 3); got {depth.shape} "
                              f"and {canonical.shape}")
    if len(depth) != n:
        raise InputValueError(f"{path}: {len(depth)} frames predicted, but {n} frames were exported for this "
                              f"camera ({frames[0]}..{frames[-1]}); run the model on exactly the exported images")
    if "frames" in data and [int(f) for f in data["frames"]] != frames:
        raise InputValueError(f"{path}: its frames {data['frames'].tolist()} are not the exported {frames}")
    valid = data.get("valid")
    if valid is None or valid.size == 0:
        valid = np.ones(depth.shape, bool)
    if valid.shape != depth.shape:
        raise InputValueError(f"{path}: valid is {valid.shape}, depth {depth.shape}")
    valid = valid.astype(bool) & np.isfinite(canonical).all(-1)
    out = {"depth": _nearest(np.where(valid, depth, np.nan).astype(np.float32), h, w),
           "canonical": _nearest(np.where(valid[..., None], canonical, 0).astype(np.float32), h, w),
           "valid": _nearest(valid, h, w)}
    if "depth_monocular" in data:
        if data["depth_monocular"].shape != depth.shape:
            raise InputValueError(f"{path}: depth_monocular is {data['depth_monocular'].shape}, depth {depth.shape}")
        out["depth_monocular"] = _nearest(np.where(valid, data["depth_monocular"], np.nan).astype(np.float32), h, w)
    return out


class FilePredictor:
    """Predictions read from a folder (module docstring): per camera, one file, loaded on first use and
    kept while the protocol is on the same subject."""

    def __init__(self, root: str | Path, cfg: EvalConfig):
        self.root, self.cfg = Path(root), cfg
        if not self.root.is_dir():
            raise InputValueError(f"{self.root}: no such predictions folder")
        self._subject, self._cameras = None, {}
        self.files: set[str] = set()  # the files read, for the result

    def _camera(self, ds: FaceCanonDataset, subject: str, sequence: str, serial: str) -> tuple[list[int], dict]:
        if subject != self._subject:
            self._subject, self._cameras = subject, {}
        key = (sequence, serial)
        if key not in self._cameras:
            rows = ds.rows
            ids = np.nonzero((rows["subject"] == subject) & (rows["sequence"] == sequence) & (rows["serial"] == serial)
                             & (rows["frame"] < self.cfg.first_frames))[0]
            frames = sorted(int(f) for f in rows["frame"][ids])
            folder = camera_folder(self.root, subject, sequence, serial)
            found = [folder / name for name in (OWN_FILE, RELEASED_FILE) if (folder / name).is_file()]
            if not found:
                raise InputValueError(f"{folder}: no {OWN_FILE} or {RELEASED_FILE} (predictions of subject {subject}, "
                                      f"sequence {sequence}, camera {serial}: {len(frames)} exported frames)")
            h, w = self.cfg.resolution
            self._cameras[key] = (frames, read_prediction_file(found[0], frames, h, w))
            self.files.add(str(found[0]))
        return self._cameras[key]

    def __call__(self, ds: FaceCanonDataset, rows: list, sample: dict, kind: str) -> PredictedMaps:
        r = ds.rows
        parts = []
        for i in rows:
            frames, maps = self._camera(ds, str(r["subject"][i]), str(r["sequence"][i]), str(r["serial"][i]))
            j = frames.index(int(r["frame"][i]))
            depth = maps.get("depth_monocular", maps["depth"]) if kind == "monocular" else maps["depth"]
            parts.append((depth[j], maps["canonical"][j], maps["valid"][j]))
        return PredictedMaps(*(np.stack([p[k] for p in parts]) for k in range(3)))


class RecordingPredictor:
    """Wraps a predictor and keeps, per index row, what the protocol asked of it: the depth of the
    multi-view pass ("views"), the depth of the image alone ("monocular") and the canonical map of its
    camera's frames ("frames"; else of the multi-view pass)."""

    def __init__(self, inner):
        self.inner = inner
        self.kept: dict[int, dict[str, np.ndarray]] = {}
        self.ds: FaceCanonDataset | None = None  # the protocol's dataset, whose index rows ``kept`` holds

    def __call__(self, ds, rows, sample, kind):
        self.ds = ds
        maps = self.inner(ds, rows, sample, kind)
        for j, i in enumerate(rows):
            kept = self.kept.setdefault(int(i), {})
            if kind == "views":
                kept["depth"] = maps.depth[j]
                kept.setdefault("canonical", maps.canonical[j])
            elif kind == "monocular":
                kept["depth_monocular"] = maps.depth[j]
            else:
                kept["canonical"] = maps.canonical[j]
        return maps


def write_recorded_predictions(recorder: RecordingPredictor, out: str | Path) -> list[Path]:
    """The recorded maps as ``predictions.npz`` files under ``out``, one per camera (module docstring)."""
    ds, written = recorder.ds, []
    if ds is None:
        return written
    ids = np.array(sorted(recorder.kept), np.int64)
    for subject in sorted(set(ds.rows["subject"][ids].tolist())):
        for (sequence, serial), sel in camera_frames(ds, ids[ds.rows["subject"][ids] == subject]).items():
            kept = [recorder.kept[int(i)] for i in sel]
            arrays = {"frames": ds.rows["frame"][sel].astype(np.int64),
                      "depth": np.stack([k["depth"] for k in kept]).astype(np.float32),
                      "canonical": np.stack([k["canonical"] for k in kept]).astype(np.float32)}
            if all("depth_monocular" in k for k in kept):
                arrays["depth_monocular"] = np.stack([k["depth_monocular"] for k in kept]).astype(np.float32)
            path = camera_folder(out, subject, sequence, serial) / OWN_FILE
            atomic_write(path, lambda p, a=arrays: np.savez_compressed(p, **a))
            written.append(path)
    return written
