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
from ..store import SubjectData, write_subject
from .canonicalize import canonical_dir
from .reconstruct import read_points, timestamp_dir
from .render import render_dir
from ..errors import InputValueError

STAGE = "write"


def subject_data_from_work(work, subject: str, cfg: PipelineConfig) -> SubjectData:
    import cv2
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
    rgb, depth, canon, mask, region, ks, w2cs, stamps, pts, pcan = [], [], [], [], [], [], [], [], [], []
    serials = None
    for key in keys:
        seq, frame = key.rsplit("/", 1)
        frame = int(frame)
        rdir = timestamp_dir(work, subject, seq, frame)
        with np.load(render_dir(work, subject, seq, frame) / "maps.npz") as z:
            ser = [str(s) for s in z["serials"]]
            depth.append(z["depth"])
            canon.append(z["canonical"])
            mask.append(z["mask"])
            if "region" not in z.files:
                raise InputValueError(f"{render_dir(work, subject, seq, frame) / 'maps.npz'}: no region map "
                                      f"(written by an older render; run `render` again)")
            region.append(z["region"])
        serials = serials or ser
        if ser != serials:
            raise InputValueError(f"{rdir}: camera serials differ between timestamps")
        cams = read_cameras_json(rdir / "cameras.json")
        ks.append(np.stack([cams[s].K for s in ser]))
        w2cs.append(np.stack([cams[s].world_2_cam for s in ser]))
        rgb.append(np.stack([cv2.cvtColor(cv2.imread(str(rdir / "images" / f"cam_{s}.png")), cv2.COLOR_BGR2RGB)
                             for s in ser]))
        quality = json.loads((render_dir(work, subject, seq, frame) / "quality.json").read_text())
        cd, lm = err_of.get((seq, frame), (np.nan, np.nan))
        valid = [float(m.sum() / max(m.size, 1)) for m in mask[-1]]
        stamps.append({"sequence": seq, "frame": frame, "reason": reasons.get((seq, frame), ""),
                       "cd_l1_mm": cd, "landmark_px": lm, **{k: v for k, v in quality.items() if k not in ("sequence", "frame")},
                       "views": {s: {"valid_fraction": valid[i]} for i, s in enumerate(ser)}})
        pts.append(read_points(rdir / "points.ply")["positions"])
        with np.load(canonical_dir(work, subject, seq, frame) / "points.npz") as z:
            pcan.append(z["canonical"])
    track_arrays = {k: v for k, v in params.items()}
    track_arrays.update(tracked_vertices=tracked.astype(np.float32), canonical_vertices=canonical_v.astype(np.float32),
                        faces=faces.astype(np.int32))
    return SubjectData(
        subject=subject, serials=serials, timestamps=stamps, rgb=np.stack(rgb), depth=np.stack(depth),
        canonical=np.stack(canon), mask=np.stack(mask), region=np.stack(region), K=np.stack(ks), world_2_cam=np.stack(w2cs),
        track=track_arrays, points_xyz=pts, points_canonical=pcan,
        provenance={"source": str(cfg.capture.root), "pipeline": cfg.name, "pipeline_file": cfg.source_file,
                    "config_hash": cfg.hash(), "config": cfg.to_dict(), "code_version": code_version()})


def run_write(subject: str, cfg: PipelineConfig, work, store, stage_key: str = "") -> dict:
    """Commit the subject; ``stage_key`` (the runner's marker key) is recorded in its provenance, so a
    later run can tell whether the store still holds this very commit."""
    data = subject_data_from_work(work, subject, cfg)
    data.provenance["stage_key"] = stage_key
    path = write_subject(store, data)
    return {"subject": subject, "store": str(store), "path": str(path), "timestamps": len(data.timestamps),
            "views": len(data.serials), "resolution": list(data.depth.shape[2:4])}
