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
        region       (T, V, H, W)    uint8    codes of regions.REGION_LABELS (face + hair = evaluation region)
        K            (T, V, 3, 3)    float32  pixels of the stored images
        world_2_cam  (T, V, 4, 4)    float32  metres, OpenCV convention
        track/expression (T, E), track/global_rot|neck|jaw|left_eye|right_eye|translation (T, 3)
        track/tracked_vertices (T, Vtx, 3) float32, track/canonical_vertices (Vtx, 3), track/shape (S,),
        track/offsets (Vtx, 3), track/faces (F, 3)
        points/xyz (P, 3) float32, points/canonical (P, 3) float32, points/offsets (T + 1,) int64
    STORE/index.parquet                   one row per view-sample
    STORE/.staging/                       subjects being written (never read)

Image arrays have one view-image per chunk and one shard per timestamp, so a reader fetches exactly one
chunk per view and a writer streams: it holds one timestamp of images at a time, whatever the subject's
length (each shard is written whole, never read back and rewritten). Every chunk is encoded ``bytes → zstd(1) → crc32c`` and
written even when it holds only the fill value, so a chunk that is absent is always an error, never
zeros (:mod:`facecanon_data.chunk_reader` reads and verifies them). The subject's attrs carry an
``integrity`` manifest: every file of the subject group (array metadata and chunk files) with its size
and crc32c, written last, so ``validate`` finds missing, extra, truncated or altered files.

Writes: a subject is written by exactly one process into ``.staging/{pid}-{uuid}`` and renamed into
``subjects/{pid}`` when complete; an existing subject is moved aside first and deleted after, so a
reader sees the old subject, then (briefly) none, then the new one — never a mixture. Concurrent
writers of one subject retry the swap until their rename lands: the last to commit wins, whole.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from .errors import InputError

SCHEMA_VERSION = 3  # 2: crc32c per chunk, every chunk written, integrity manifest; 3: region
IMAGE_ARRAYS = {"rgb": "uint8", "depth": "float32", "canonical": "float16", "mask": "bool", "region": "uint8"}
TRAINING_ARRAYS = ("rgb", "depth", "canonical", "mask")  # what the loader reads unless asked for more
CAMERA_ARRAYS = {"K": (3, 3), "world_2_cam": (4, 4)}


class StoreError(InputError, ValueError):
    """The store or a subject in it is malformed; names the path and the problem."""


@dataclass
class SubjectData:
    """Everything stored for one subject (T kept timestamps, V views, H x W images).

    The image arrays may be numpy arrays or any *timestamp stack*: an object with ``shape``, ``dtype``
    and ``stack[t]`` returning timestamp t's (V, H, W, ...) array; :func:`write_subject` reads them one
    timestamp at a time, so a stack that loads on demand keeps the writer's memory to one timestamp."""

    subject: str
    serials: list[str]
    timestamps: list[dict]  # {sequence, frame, reason, quality figures...}
    rgb: np.ndarray  # (T, V, H, W, 3) uint8
    depth: np.ndarray  # (T, V, H, W) float32
    canonical: np.ndarray  # (T, V, H, W, 3) float16/32
    mask: np.ndarray  # (T, V, H, W) bool
    region: np.ndarray  # (T, V, H, W) uint8 codes of regions.REGION_LABELS
    K: np.ndarray  # (T, V, 3, 3)
    world_2_cam: np.ndarray  # (T, V, 4, 4)
    track: dict[str, np.ndarray] = field(default_factory=dict)
    points_xyz: list[np.ndarray] = field(default_factory=list)  # T arrays (P_t, 3)
    points_canonical: list[np.ndarray] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def validate(self) -> None:
        t, v, h, w = self.depth.shape
        expect = {"rgb": (t, v, h, w, 3), "canonical": (t, v, h, w, 3), "mask": (t, v, h, w),
                  "region": (t, v, h, w), "K": (t, v, 3, 3), "world_2_cam": (t, v, 4, 4)}
        for name, shape in expect.items():
            if getattr(self, name).shape != shape:
                raise StoreError(f"subject {self.subject}: {name} has shape {getattr(self, name).shape}, expected {shape}")
        if len(self.serials) != v or len(self.timestamps) != t:
            raise StoreError(f"subject {self.subject}: {len(self.serials)} serials / {len(self.timestamps)} "
                             f"timestamps for arrays of {v} views / {t} timestamps")

    def timestamp_images(self, t: int) -> dict[str, np.ndarray]:
        """Timestamp t's image arrays, {name: (V, H, W, ...)} in the store's dtypes, checked finite."""
        out = {name: np.ascontiguousarray(np.asarray(getattr(self, name)[t]).astype(dtype, copy=False))
               for name, dtype in IMAGE_ARRAYS.items()}
        for name in ("depth", "canonical"):
            if not np.isfinite(out[name]).all():
                stamp = self.timestamps[t]
                raise StoreError(f"subject {self.subject}: {name} of timestamp {stamp.get('sequence')}/"
                                 f"{stamp.get('frame')} contains NaN/inf")
        return out


def _compressors():
    import zarr.codecs as zc

    return [zc.ZstdCodec(level=1), zc.Crc32cCodec()]


# write_empty_chunks: a chunk of fill values is stored too, so "absent" can only mean "lost".
_WRITE_CONFIG = {"write_empty_chunks": True}


def _create_image_array(group, name: str, shape: tuple[int, ...], dtype: str):
    """(T, V, H, W, ...): one view-image per chunk, one timestamp per shard."""
    return group.create_array(name, shape=shape, dtype=dtype, chunks=(1, 1) + tuple(shape[2:]),
                              shards=(1,) + tuple(shape[1:]), compressors=_compressors(), config=_WRITE_CONFIG)


def _write_array(group, name: str, data: np.ndarray) -> None:
    data = np.ascontiguousarray(data)
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                             compressors=_compressors(), config=_WRITE_CONFIG)
    arr[...] = data


def _file_manifest(group_dir: Path) -> dict[str, list[int]]:
    """{relative path: [bytes, crc32c]} of every file of a subject group but its own ``zarr.json``."""
    from .chunk_reader import crc32c

    out = {}
    for path in sorted(group_dir.rglob("*")):
        rel = path.relative_to(group_dir).as_posix()
        if path.is_file() and rel != "zarr.json":
            data = path.read_bytes()
            out[rel] = [len(data), crc32c(data)]
    return out


def _commit(staging: Path, final: Path, store: Path, subject: str) -> None:
    """Rename ``staging`` to ``final``, moving a committed subject aside first. With concurrent writers
    of the same subject, each retries until its own rename lands; the last one wins, whole."""
    trash: list[Path] = []
    try:
        for _ in range(1000):
            try:
                os.rename(staging, final)  # the commit: one atomic rename
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            aside = store / ".staging" / f"{subject}-old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, aside)
                trash.append(aside)
            except FileNotFoundError:  # another writer moved it aside first
                pass
        raise StoreError(f"{final}: could not commit subject {subject} (another writer kept replacing it)")
    finally:
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)


def write_subject(store: str | Path, data: SubjectData) -> Path:
    """Write one subject atomically into ``store`` (created when missing). Returns its final path."""
    import zarr

    data.validate()
    store = Path(store)
    ensure_store(store)
    staging = store / ".staging" / f"{data.subject}-{uuid.uuid4().hex[:8]}"
    try:
        g = zarr.open_group(str(staging), mode="w", zarr_format=3)
        images = {name: _create_image_array(g, name, tuple(getattr(data, name).shape), dtype)
                  for name, dtype in IMAGE_ARRAYS.items()}
        for t in range(len(data.timestamps)):  # one timestamp in memory at a time: one shard per array
            for name, slab in data.timestamp_images(t).items():
                images[name][t] = slab
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
                        "provenance": {**_jsonable(data.provenance), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                        "integrity": {"algorithm": "crc32c", "files": _file_manifest(staging)}})
        final = store / "subjects" / data.subject
        final.parent.mkdir(parents=True, exist_ok=True)
        _commit(staging, final, store, data.subject)
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


def subject_attrs(store: str | Path, subject: str) -> dict:
    """A committed subject's attributes, after checking its schema version."""
    path = Path(store) / "subjects" / subject / "zarr.json"
    try:
        attrs = json.loads(path.read_text()).get("attributes", {})
    except FileNotFoundError:
        raise StoreError(f"{path.parent}: subject not in the store") from None
    except (ValueError, AttributeError) as exc:
        raise StoreError(f"{path}: malformed group metadata ({exc})") from None
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path.parent}: schema_version {attrs.get('schema_version')}, this version reads "
                         f"{SCHEMA_VERSION} (rebuild it with `facecanon-data build` or `write`)")
    return attrs


def subject_readers(store: str | Path, subject: str, names=tuple(IMAGE_ARRAYS) + tuple(CAMERA_ARRAYS)):
    """{array name: :class:`~facecanon_data.chunk_reader.ArrayReader`} of a committed subject: verified
    single-chunk reads that raise naming the subject, array and chunk instead of returning fill values."""
    from .chunk_reader import ArrayReader

    subject_attrs(store, subject)
    folder = Path(store) / "subjects" / subject
    return {n: ArrayReader(folder / n, label=f"subject {subject}, array {n}") for n in names}


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


def validate_store(store: str | Path, quick: bool = False, sample: int = 8) -> list[str]:
    """Problems found (empty list = valid): schema, every file against the subject's integrity manifest,
    every array's dtype and shape against the schema, every chunk decoded and checksum-verified (rgb and
    mask included), NaN/inf and negative depth, point offsets, and the index against the arrays.

    Files are checked against the manifest by size, array metadata also by checksum; chunk contents are
    verified by decoding them (each chunk carries its own crc32c), so no file is read twice.
    ``quick``: ``sample`` seeded chunks per image array instead of all (the camera, track and point
    arrays are always read whole).
    """
    problems: list[str] = []
    store = Path(store)
    if not (store / "zarr.json").is_file():
        return [f"{store}: not a facecanon-data store (no zarr.json)"]
    expected_rows = set()
    for pid in subjects(store):
        found, rows = _validate_subject(store, pid, quick, sample)
        problems += found
        expected_rows |= rows
    if (store / "index.parquet").is_file():
        try:
            idx = read_index(store).to_pydict()
            got = set(zip(idx["subject"], idx["sequence"], idx["frame"], idx["serial"], idx["t"], idx["v"]))
        except Exception as exc:  # noqa: BLE001 - an unreadable index is a finding
            problems.append(f"{store}/index.parquet: unreadable ({exc})")
        else:
            if got != expected_rows:
                problems.append(f"{store}/index.parquet: {len(got - expected_rows)} rows without arrays, "
                                f"{len(expected_rows - got)} samples missing from the index (run `facecanon-data index`)")
    elif expected_rows:
        problems.append(f"{store}/index.parquet: missing (run `facecanon-data index {store}`)")
    return problems


_PER_TIMESTAMP = {"track/expression", "track/global_rot", "track/neck", "track/jaw", "track/left_eye",
                  "track/right_eye", "track/translation", "track/tracked_vertices"}
_SIDE_SCHEMA_TEXT = {"points/xyz": "(P, 3) float32", "points/canonical": "(P, 3) float32",
                     "points/offsets": "(T + 1,) int64", "track/faces": "(F, 3) integer"}


def _side_array_schema(name: str, t: int):
    """A check ``(shape, dtype) -> bool`` for a track/ or points/ array, or None for arrays it does not know."""
    if name in ("points/xyz", "points/canonical"):
        return lambda shape, dtype: len(shape) == 2 and shape[1] == 3 and dtype == "float32"
    if name == "points/offsets":
        return lambda shape, dtype: shape == (t + 1,) and dtype == "int64"
    if name == "track/faces":
        return lambda shape, dtype: len(shape) == 2 and shape[1] == 3 and dtype in ("int32", "int64")
    if name in _PER_TIMESTAMP:
        return lambda shape, dtype: len(shape) >= 2 and shape[0] == t and dtype == "float32"
    if name.startswith("track/"):
        return lambda shape, dtype: dtype == "float32"
    return None


def _validate_subject(store: Path, pid: str, quick: bool, sample: int) -> tuple[list[str], set]:
    from .chunk_reader import ArrayReader, ChunkError, crc32c

    path = store / "subjects" / pid
    try:
        attrs = subject_attrs(store, pid)
    except StoreError as exc:
        return [str(exc)], set()
    problems: list[str] = []
    manifest = (attrs.get("integrity") or {}).get("files")
    if not isinstance(manifest, dict):
        return [f"{path}: no integrity manifest in its attributes"], set()
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"zarr.json"}
    for rel in sorted(set(manifest) - present):
        problems.append(f"{path}/{rel}: missing (listed in the integrity manifest)")
    for rel in sorted(present - set(manifest)):
        problems.append(f"{path}/{rel}: not in the integrity manifest")
    for rel in sorted(set(manifest) & present):
        size, digest = manifest[rel]
        f = path / rel
        if f.stat().st_size != size:
            problems.append(f"{f}: {f.stat().st_size} bytes, the manifest says {size}")
        elif f.name == "zarr.json" and crc32c(f.read_bytes()) != digest:
            problems.append(f"{f}: content altered (crc32c differs from the manifest)")

    def reader(name: str):
        try:
            return ArrayReader(path / name, label=f"subject {pid}, array {name}")
        except ChunkError as exc:
            problems.append(str(exc))
            return None

    depth = reader("depth")
    if depth is None or len(depth.shape) != 4:
        problems.append(f"{path}/depth: missing or not (T, V, H, W)")
        return problems, set()
    t, v, h, w = depth.shape
    schema = {"rgb": ((t, v, h, w, 3), "uint8"), "depth": ((t, v, h, w), "float32"),
              "canonical": ((t, v, h, w, 3), "float16"), "mask": ((t, v, h, w), "bool"),
              "region": ((t, v, h, w), "uint8"),
              "K": ((t, v, 3, 3), "float32"), "world_2_cam": ((t, v, 4, 4), "float32")}
    rng = np.random.default_rng(0)
    for name, (shape, dtype) in schema.items():
        arr = depth if name == "depth" else reader(name)
        if arr is None:
            continue
        if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
            problems.append(f"{path}/{name}: {tuple(arr.shape)} {arr.dtype}, the schema says {shape} {dtype}")
            continue
        grid = list(np.ndindex(*arr.grid))
        if quick and name in IMAGE_ARRAYS and len(grid) > sample:
            grid = [grid[i] for i in sorted(rng.choice(len(grid), sample, replace=False))]
        for coords in grid:  # one chunk at a time: memory independent of the subject's size
            try:
                chunk = arr.read_chunk(tuple(int(c) for c in coords))
            except ChunkError as exc:
                problems.append(str(exc))
                break
            if name in ("depth", "canonical", "K", "world_2_cam") and not np.isfinite(chunk.astype(np.float32)).all():
                problems.append(f"{path}/{name}: chunk {tuple(coords)} contains NaN or inf")
                break
            if name == "depth" and (chunk < 0).any():
                problems.append(f"{path}/depth: chunk {tuple(coords)} has negative depth")
                break
    side: dict[str, np.ndarray] = {}
    for group in ("track", "points"):
        folder = path / group
        for sub in sorted(p.parent.name for p in folder.glob("*/zarr.json")):
            name = f"{group}/{sub}"
            arr = reader(name)
            if arr is None:
                continue
            expected = _side_array_schema(name, t)
            if expected is not None and not expected(tuple(arr.shape), str(arr.dtype)):
                problems.append(f"{path}/{name}: {tuple(arr.shape)} {arr.dtype} does not fit the schema "
                                f"({_SIDE_SCHEMA_TEXT.get(name, 'float32, first axis T')})")
                continue
            try:
                side[name] = arr.read_all()
            except ChunkError as exc:
                problems.append(str(exc))
    if len(attrs.get("serials", [])) != v or len(attrs.get("timestamps", [])) != t:
        problems.append(f"{path}: attrs list {len(attrs.get('serials', []))} serials / "
                        f"{len(attrs.get('timestamps', []))} timestamps for arrays of {v} / {t}")
    offs, xyz = side.get("points/offsets"), side.get("points/xyz")
    if offs is None or xyz is None or len(offs) != t + 1 or offs[-1] != len(xyz):
        problems.append(f"{path}/points: offsets do not match the point arrays")
    rows = set()
    for ti, ts in enumerate(attrs.get("timestamps", [])):
        for vi, serial in enumerate(attrs.get("serials", [])):
            rows.add((pid, ts["sequence"], int(ts["frame"]), serial, ti, vi))
    return problems, rows
