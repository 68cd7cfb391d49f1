"""Stage ``write``: assemble a subject's stage outputs and commit it to the store (one writer).

Reads ``select`` (reasons), ``reconstruct`` (images, cameras, points), ``track`` (parameters,
vertices, errors), ``canonicalize`` (canonical points) and ``render`` (maps, quality) from the work
folder; writes one subject group atomically (see :mod:`facecanon_data.store`).
"""
from __future__ import annotations

import json

import numpy as np

from ..artifacts import StageDir, code_version
from ..cameras import read_cameras_json
from ..config import PipelineConfig
from ..store import IMAGE_ARRAYS, SubjectData, write_subject
from .canonicalize import canonical_dir
from ..sampling import bounded_subset
from .reconstruct import read_points, timestamp_dir, view_images
from .render import render_dir
from ..errors import InputValueError

STAGE = "write"


class _WorkImages:
    """The image arrays of a subject's work folder, loaded one timestamp at a time (the most recent kept):
    ``render``'s maps and ``reconstruct``'s images of timestamp t, {name: (V, H, W, ...)}."""

    def __init__(self, work, subject: str, keys: list[str], serials: list[str], source=None,
                 cfg: PipelineConfig | None = None):
        self.work, self.subject, self.keys, self.serials = work, subject, keys, serials
        self.source, self.cfg = source, cfg
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def load(self, t: int) -> dict[str, np.ndarray]:
        if self._cached is not None and self._cached[0] == t:
            return self._cached[1]
        seq, frame = self.keys[t].rsplit("/", 1)
        maps = render_dir(self.work, self.subject, seq, int(frame)) / "maps.npz"
        with np.load(maps) as z:  # serials already checked equal by subject_data_from_work
            missing = [k for k in ("region", "confidence") if k not in z.files]
            if missing:
                raise InputValueError(f"{maps}: no {' or '.join(missing)} map (written by an older render; "
                                      "run `render` again)")
            out = {k: z[k] for k in ("depth", "canonical", "mask", "region", "confidence")}
        images = view_images(self.source, self.subject, self.cfg, self.work, seq, int(frame), self.serials)
        out["rgb"] = np.stack([images[s] for s in self.serials])
        self._cached = (t, out)
        return out


class _WorkStack:
    """One image array of :class:`_WorkImages` as a timestamp stack (``shape``, ``dtype``, ``[t]``)."""

    def __init__(self, images: _WorkImages, name: str, shape: tuple[int, ...], dtype):
        self.images, self.name, self.shape, self.dtype = images, name, shape, np.dtype(dtype)

    def __getitem__(self, t: int) -> np.ndarray:
        return self.images.load(t)[self.name]


def subject_data_from_work(work, subject: str, cfg: PipelineConfig, source=None) -> SubjectData:
    """The subject as the store writes it; its image arrays are timestamp stacks over the work folder
    (one timestamp in memory at a time), everything else is small and loaded here."""
    import pyarrow.parquet as pq

    sel = pq.read_table(StageDir(work, subject, "select").file("selection.parquet")).to_pydict()
    reasons = {(s, int(f)): r for s, f, r in zip(sel["sequence"], sel["frame"], sel["reason"])}
    track = StageDir(work, subject, "track")
    errs = pq.read_table(track.file("errors.parquet")).to_pydict()
    err_of = {(s, int(f)): (c, lm) for s, f, c, lm in zip(errs["sequence"], errs["frame"], errs["cd_l1_mm"],
                                                            errs["landmark_px"])}
    with np.load(track.file("vertices.npz")) as z:
        keys, tracked, canonical_v, faces = [str(k) for k in z["keys"]], z["tracked"], z["canonical"], z["faces"]
    with np.load(track.file("params.npz")) as z:
        params = {k: z[k] for k in z.files if k != "keys"}
    ks, w2cs, stamps, pts, pcan = [], [], [], [], []
    serials, view_shape = None, (0, 0, 0)
    for key in keys:
        seq, frame = key.rsplit("/", 1)
        frame = int(frame)
        rdir = timestamp_dir(work, subject, seq, frame)
        with np.load(render_dir(work, subject, seq, frame) / "maps.npz") as z:  # reads only the arrays used
            ser = [str(s) for s in z["serials"]]
            mask = z["mask"]  # (V, H, W)
        view_shape = mask.shape
        serials = serials or ser
        if ser != serials:
            raise InputValueError(f"{rdir}: camera serials differ between timestamps")
        cams = read_cameras_json(rdir / "cameras.json")
        ks.append(np.stack([cams[s].K for s in ser]))
        w2cs.append(np.stack([cams[s].world_2_cam for s in ser]))
        quality = json.loads((render_dir(work, subject, seq, frame) / "quality.json").read_text())
        cd, lm = err_of.get((seq, frame), (np.nan, np.nan))
        valid = [float(m.sum() / max(m.size, 1)) for m in mask]
        stamps.append({"sequence": seq, "frame": frame, "reason": reasons.get((seq, frame), ""),
                       "cd_l1_mm": cd, "landmark_px": lm, **{k: v for k, v in quality.items() if k not in ("sequence", "frame")},
                       "views": {s: {"valid_fraction": valid[i]} for i, s in enumerate(ser)}})
        positions = read_points(rdir / "points.ply")["positions"]
        kept_points = bounded_subset(len(positions), cfg.track.max_points_per_timestamp)  # the points track fitted
        pts.append(positions[kept_points])
        with np.load(canonical_dir(work, subject, seq, frame) / "points.npz") as z:
            pcan.append(z["canonical"][kept_points])
    track_arrays = {k: v for k, v in params.items()}
    track_arrays.update(tracked_vertices=tracked.astype(np.float32), canonical_vertices=canonical_v.astype(np.float32),
                        faces=faces.astype(np.int32))
    images = _WorkImages(work, subject, keys, serials or [], source, cfg)
    shape = (len(keys),) + tuple(view_shape)
    stack = {name: _WorkStack(images, name, shape + ((3,) if name in ("rgb", "canonical") else ()), dtype)
             for name, dtype in IMAGE_ARRAYS.items()}
    return SubjectData(
        subject=subject, serials=serials, timestamps=stamps, **stack, K=np.stack(ks), world_2_cam=np.stack(w2cs),
        track=track_arrays, points_xyz=pts, points_canonical=pcan,
        quality={k: v for k, v in ((StageDir(work, subject, "render").done() or {}).get("figures") or {}).items()
                 if k.startswith(("label_epe", "gt_", "region_iou"))},
        provenance={"source": str(cfg.capture.root), "pipeline": cfg.name, "pipeline_file": cfg.source_file,
                    "dense_backend": (StageDir(work, subject, "reconstruct").done() or {})
                    .get("figures", {}).get("dense_backend", "none"),
                    "color_correction": bool((StageDir(work, subject, "select").done() or {})
                                             .get("figures", {}).get("color_correction", False)),
                    "config_hash": cfg.hash(), "config": cfg.to_dict(), "code_version": code_version()})


def run_write(subject: str, cfg: PipelineConfig, work, store, stage_key: str = "", source=None) -> dict:
    """Commit the subject; ``stage_key`` (the runner's marker key) is recorded in its provenance, so a
    later run can tell whether the store still holds this very commit."""
    data = subject_data_from_work(work, subject, cfg, source)
    data.provenance["stage_key"] = stage_key
    path = write_subject(store, data)
    return {"subject": subject, "store": str(store), "path": str(path), "timestamps": len(data.timestamps),
            "views": len(data.serials), "resolution": list(data.depth.shape[2:4])}
