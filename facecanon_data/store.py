"""The dataset store: one sharded Zarr v3 group per subject, committed atomically, plus an index.

Layout (schema version ``SCHEMA_VERSION``)::

    STORE/zarr.json                       root group, attrs: schema_version
    STORE/subjects/{pid}/                 one subject, a complete Zarr v3 group
        attrs: schema_version, provenance {source, pipeline, config_hash, code_version, written},
               timestamps [{sequence, frame, reason, quality...}], serials [V]
        rgb          (T, V, H, W, 3) uint8
        depth        (T, V, H, W)    float32  metres along the optical axis, 0 = no data
        canonical    (T, V, H, W, 3) float16  metres, FLAME canonical space
        mask         (T, V, H, W)    bool     depth and canonical valid
        K            (T, V, 3, 3)    float32  pixels of the stored images
        world_2_cam  (T, V, 4, 4)    float32  metres, OpenCV convention
        track/expression (T, E), track/global_rot|neck|jaw|left_eye|right_eye|translation (T, 3)
        track/tracked_vertices (T, Vtx, 3) float32, track/canonical_vertices (Vtx, 3), track/shape (S,),
        track/offsets (Vtx, 3), track/faces (F, 3)
        points/xyz (P, 3) float32, points/canonical (P, 3) float32, points/offsets (T + 1,) int64
    STORE/index.parquet                   one row per view-sample
    STORE/.staging/                       subjects being written (never read)

Image arrays have one view-image per chunk and one shard per array, so a subject is a few files and a
reader fetches exactly one chunk per view. Compression: zstd level 1 (measured on rendered subjects:
see README). Writes: a subject is written by exactly one process into ``.staging/{pid}-{uuid}`` and
renamed into ``subjects/{pid}`` when complete; an existing subject is moved aside first and deleted
after, so a reader sees the old subject, then (briefly) none, then the new one — never a mixture.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
IMAGE_ARRAYS = {"rgb": "uint8", "depth": "float32", "canonical": "float16", "mask": "bool"}
CAMERA_ARRAYS = {"K": (3, 3), "world_2_cam": (4, 4)}


class StoreError(ValueError):
    """The store or a subject in it is malformed; names the path and the problem."""


@dataclass
class SubjectData:
    """Everything stored for one subject (T kept timestamps, V views, H x W images)."""

    subject: str
    serials: list[str]
    timestamps: list[dict]  # {sequence, frame, reason, quality figures...}
    rgb: np.ndarray  # (T, V, H, W, 3) uint8
    depth: np.ndarray  # (T, V, H, W) float32
    canonical: np.ndarray  # (T, V, H, W, 3) float16/32
    mask: np.ndarray  # (T, V, H, W) bool
    K: np.ndarray  # (T, V, 3, 3)
    world_2_cam: np.ndarray  # (T, V, 4, 4)
    track: dict[str, np.ndarray] = field(default_factory=dict)
    points_xyz: list[np.ndarray] = field(default_factory=list)  # T arrays (P_t, 3)
    points_canonical: list[np.ndarray] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def validate(self) -> None:
        t, v, h, w = self.depth.shape
        expect = {"rgb": (t, v, h, w, 3), "canonical": (t, v, h, w, 3), "mask": (t, v, h, w),
                  "K": (t, v, 3, 3), "world_2_cam": (t, v, 4, 4)}
        for name, shape in expect.items():
            if getattr(self, name).shape != shape:
                raise StoreError(f"subject {self.subject}: {name} has shape {getattr(self, name).shape}, expected {shape}")
        if len(self.serials) != v or len(self.timestamps) != t:
            raise StoreError(f"subject {self.subject}: {len(self.serials)} serials / {len(self.timestamps)} "
                             f"timestamps for arrays of {v} views / {t} timestamps")
        if not np.isfinite(self.depth).all() or not np.isfinite(self.canonical.astype(np.float32)).all():
            raise StoreError(f"subject {self.subject}: depth or canonical contains NaN/inf")


def _compressor():
    import zarr.codecs as zc

    return zc.ZstdCodec(level=1)


def _write_array(group, name: str, data: np.ndarray, image: bool = False) -> None:
    data = np.ascontiguousarray(data)
    if image:
        chunks = (1, 1) + data.shape[2:]
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=data.shape,
                           compressors=_compressor())[...] = data
    else:
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                                 compressors=_compressor())
        arr[...] = data


def write_subject(store: str | Path, data: SubjectData) -> Path:
    """Write one subject atomically into ``store`` (created when missing). Returns its final path."""
    import zarr

    data.validate()
    store = Path(store)
    ensure_store(store)
    staging = store / ".staging" / f"{data.subject}-{uuid.uuid4().hex[:8]}"
    try:
        g = zarr.open_group(str(staging), mode="w", zarr_format=3)
        for name, dtype in IMAGE_ARRAYS.items():
            _write_array(g, name, getattr(data, name).astype(dtype), image=True)
        for name in CAMERA_ARRAYS:
            _write_array(g, name, getattr(data, name).astype(np.float32))
        tg = g.create_group("track")
        for k, arr in data.track.items():
            _write_array(tg, k, np.asarray(arr))
        pg = g.create_group("points")
        counts = [len(p) for p in data.points_xyz]
        _write_array(pg, "offsets", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        _write_array(pg, "xyz", (np.concatenate(data.points_xyz) if counts else np.zeros((0, 3))).astype(np.float32))
        _write_array(pg, "canonical", (np.concatenate(data.points_canonical) if counts else np.zeros((0, 3))).astype(np.float32))
        g.attrs.update({"schema_version": SCHEMA_VERSION, "subject": data.subject, "serials": list(data.serials),
                        "timestamps": _jsonable(data.timestamps),
                        "provenance": {**_jsonable(data.provenance), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
        final = store / "subjects" / data.subject
        final.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if final.exists():
            trash = store / ".staging" / f"{data.subject}-old-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        os.rename(staging, final)  # the commit: one atomic rename
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def ensure_store(store: Path) -> None:
    """Create the root group once (idempotent; safe with concurrent writers)."""
    import zarr

    root = store / "zarr.json"
    if root.is_file():
        return
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".zarr.json.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                               "attributes": {"schema_version": SCHEMA_VERSION}}))
    os.replace(tmp, root)
    (store / "subjects").mkdir(exist_ok=True)
    zarr.open_group(str(store), mode="r")  # the root parses


def subjects(store: str | Path) -> list[str]:
    """Committed subjects (never those still in ``.staging``)."""
    folder = Path(store) / "subjects"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())


def open_subject(store: str | Path, subject: str):
    import zarr

    path = Path(store) / "subjects" / subject
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: subject not in the store")
    return zarr.open_group(str(path), mode="r")


# ---------------------------------------------------------------------------------------------
# index


INDEX_COLUMNS = ("subject", "sequence", "frame", "serial", "t", "v", "reason", "valid_fraction",
                 "cd_l1_mm", "landmark_px", "height", "width")


def build_index(store: str | Path) -> Path:
    """Rebuild ``index.parquet`` (one row per view-sample) from the committed subjects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Path(store)
    rows: dict[str, list] = {c: [] for c in INDEX_COLUMNS}
    for pid in subjects(store):
        g = open_subject(store, pid)
        attrs = g.attrs.asdict()
        h, w = g["depth"].shape[2:4]
        for t, ts in enumerate(attrs["timestamps"]):
            for v, serial in enumerate(attrs["serials"]):
                q = ts.get("views", {}).get(serial, {})
                rows["subject"].append(pid)
                rows["sequence"].append(ts["sequence"])
                rows["frame"].append(int(ts["frame"]))
                rows["serial"].append(serial)
                rows["t"].append(t)
                rows["v"].append(v)
                rows["reason"].append(ts.get("reason", ""))
                rows["valid_fraction"].append(float(q.get("valid_fraction", np.nan)))
                rows["cd_l1_mm"].append(float(ts.get("cd_l1_mm", np.nan)))
                rows["landmark_px"].append(float(ts.get("landmark_px", np.nan)))
                rows["height"].append(int(h))
                rows["width"].append(int(w))
    table = pa.table(rows).replace_schema_metadata({b"schema_version": str(SCHEMA_VERSION).encode()})
    out = store / "index.parquet"
    tmp = store / f".index.{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


def read_index(store: str | Path):
    import pyarrow.parquet as pq

    path = Path(store) / "index.parquet"
    if not path.is_file():
        raise StoreError(f"{path}: no index (run `facecanon-data index {store}`)")
    return pq.read_table(path)


def validate_store(store: str | Path) -> list[str]:
    """Problems found (empty list = valid): schema, shapes, dtypes, NaNs, index vs arrays."""
    problems: list[str] = []
    store = Path(store)
    if not (store / "zarr.json").is_file():
        return [f"{store}: not a facecanon-data store (no zarr.json)"]
    expected_rows = set()
    for pid in subjects(store):
        path = store / "subjects" / pid
        try:
            g = open_subject(store, pid)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{path}: cannot open ({exc})")
            continue
        attrs = g.attrs.asdict()
        if attrs.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"{path}: schema_version {attrs.get('schema_version')} != {SCHEMA_VERSION}")
            continue
        try:
            t, v, h, w = g["depth"].shape
        except KeyError:
            problems.append(f"{path}: missing array depth")
            continue
        shapes = {"rgb": (t, v, h, w, 3), "canonical": (t, v, h, w, 3), "mask": (t, v, h, w),
                  "K": (t, v, 3, 3), "world_2_cam": (t, v, 4, 4)}
        dtypes = {**IMAGE_ARRAYS, "K": "float32", "world_2_cam": "float32"}
        for name, shape in shapes.items():
            if name not in g:
                problems.append(f"{path}: missing array {name}")
                continue
            a = g[name]
            if tuple(a.shape) != shape:
                problems.append(f"{path}/{name}: shape {tuple(a.shape)} != {shape}")
            if str(a.dtype) != dtypes[name]:
                problems.append(f"{path}/{name}: dtype {a.dtype} != {dtypes[name]}")
        for name in ("depth", "canonical", "K", "world_2_cam"):
            if name in g and not np.isfinite(np.asarray(g[name][...], np.float32)).all():
                problems.append(f"{path}/{name}: contains NaN or inf")
        if len(attrs.get("serials", [])) != v or len(attrs.get("timestamps", [])) != t:
            problems.append(f"{path}: attrs list {len(attrs.get('serials', []))} serials / "
                            f"{len(attrs.get('timestamps', []))} timestamps for arrays of {v} / {t}")
        offs = np.asarray(g["points/offsets"][...]) if "points" in g else None
        if offs is None or len(offs) != t + 1 or offs[-1] != g["points/xyz"].shape[0]:
            problems.append(f"{path}/points: offsets do not match the point arrays")
        for ti, ts in enumerate(attrs.get("timestamps", [])):
            for vi, serial in enumerate(attrs.get("serials", [])):
                expected_rows.add((pid, ts["sequence"], int(ts["frame"]), serial, ti, vi))
    if (store / "index.parquet").is_file():
        idx = read_index(store).to_pydict()
        got = set(zip(idx["subject"], idx["sequence"], idx["frame"], idx["serial"], idx["t"], idx["v"]))
        if got != expected_rows:
            problems.append(f"{store}/index.parquet: {len(got - expected_rows)} rows without arrays, "
                            f"{len(expected_rows - got)} samples missing from the index (run `facecanon-data index`)")
    elif expected_rows:
        problems.append(f"{store}/index.parquet: missing (run `facecanon-data index {store}`)")
    return problems
