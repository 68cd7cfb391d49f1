"""The dataset store: one sharded Zarr v3 group per subject, committed atomically, plus an index.

Layout (schema version ``SCHEMA_VERSION``)::

    STORE/zarr.json                       root group, attrs: schema_version
    STORE/subjects/{pid}/                 one subject, a complete Zarr v3 group
        attrs: schema_version, provenance {source, pipeline, config_hash, code_version, written},
               timestamps [{sequence, frame, reason, quality...}], serials [V]
        arrays: :data:`SCHEMA` (shape, dtype, unit and meaning of each; ``docs/store.md`` lists them)
    STORE/index.parquet                   one row per view-sample (:data:`INDEX_COLUMNS`)
    STORE/.staging/                       subjects being written (never read)

Image arrays have one view-image per chunk and one shard per timestamp, so a reader fetches exactly one
chunk per view and a writer streams: it holds one timestamp of images at a time, whatever the subject's
length (each shard is written whole, never read back and rewritten). Every chunk is encoded ``bytes → zstd(1) → crc32c`` and
written even when it holds only the fill value, so a chunk that is absent is always an error, never
zeros (:mod:`facecanon_data.chunk_reader` reads and verifies them). The subject's attrs carry an
``integrity`` manifest, written last: every file of the group with its size and digest, every chunk's
crc32c by array and position, and a sha256 ``digest`` of the attributes themselves (serials,
timestamps, provenance, the manifest), so ``validate`` and the loader find missing, extra, truncated,
altered or swapped files and chunks and edited metadata.

Writes: a subject is written by exactly one process into its own slot of ``.staging`` (locked while the
writer lives) and committed by one rename; a subject already there is swapped out in one atomic
exchange (Linux ``renameat2``), or, where the filesystem has none, in two renames under a journal that
the next open finishes or rolls back (:func:`recover_staging`). A reader therefore sees the old
subject or the new one, never a mixture and never none once recovery ran; what a killed writer left
in ``.staging`` is removed on the next open. Concurrent writers of one subject retry until their commit
lands: the last to commit wins, whole.
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

SCHEMA_VERSION = 5  # 2: crc32c per chunk, every chunk written, integrity manifest; 3: region;
# 4: the manifest ties every chunk to its position and a digest covers the subject's attributes; 5: confidence


@dataclass(frozen=True)
class ArraySpec:
    """One array of a stored subject, stated once: validation, the loader and ``docs/store.md`` read it.

    ``shape`` holds axis symbols (``T`` timestamps, ``V`` views, ``H`` x ``W`` pixels, ``P`` points,
    ``Vtx`` mesh vertices, ``F`` faces, ``E`` / ``S`` expression / identity coefficients, ``T+1``) or
    fixed sizes; a symbol not bound when checking matches any size."""

    name: str  # path inside the subject's group
    kind: str  # "image" (one chunk per view), "camera", "track" or "points"
    shape: tuple
    dtype: str  # what the writer stores
    unit: str
    meaning: str
    required: bool = True
    finite: bool = False  # NaN or inf in it is damage
    accepts: tuple[str, ...] = ()  # further dtypes a reader accepts

    def shape_text(self) -> str:
        return "(" + ", ".join(str(a) for a in self.shape) + ("," if len(self.shape) == 1 else "") + ")"

    @staticmethod
    def _size(axis, dims: dict[str, int]) -> int | None:
        """An axis' size with ``dims`` bound, or None when its symbol is not among them."""
        if isinstance(axis, int):
            return axis
        if axis == "T+1":
            return dims["T"] + 1 if "T" in dims else None
        return dims.get(axis)

    def expected_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The shape with ``dims`` bound; raises KeyError when an axis symbol is not among them."""
        sizes = tuple(self._size(a, dims) for a in self.shape)
        if None in sizes:
            raise KeyError(f"{self.name}: {self.shape_text()} needs {[a for a, n in zip(self.shape, sizes) if n is None]}")
        return sizes

    def fits(self, shape: tuple[int, ...], dtype: str, dims: dict[str, int]) -> bool:
        if dtype not in (self.dtype, *self.accepts) or len(shape) != len(self.shape):
            return False
        return all(want is None or size == want for size, want in zip(shape, (self._size(a, dims) for a in self.shape)))


_IMAGE, _TV = ("T", "V", "H", "W"), ("T", "V")
SCHEMA: tuple[ArraySpec, ...] = (
    ArraySpec("rgb", "image", _IMAGE + (3,), "uint8", "sRGB levels",
              "the view at the working resolution, colour-corrected where the capture has a calibration"),
    ArraySpec("depth", "image", _IMAGE, "float32", "metres",
              "distance along the optical axis; 0 where there is no label", finite=True),
    ArraySpec("canonical", "image", _IMAGE + (3,), "float16", "metres",
              "each pixel's point in the head model's canonical (neutral) space; 0 where there is no label",
              finite=True),
    ArraySpec("mask", "image", _IMAGE, "bool", "", "depth and canonical are labels here"),
    ArraySpec("region", "image", _IMAGE, "uint8", "code",
              "region of the pixel (regions.REGION_LABELS; face + hair is the evaluation region)"),
    ArraySpec("confidence", "image", _IMAGE, "uint8", "1/255",
              "label confidence in levels (c = level / 255; at least 1 where labelled, 0 where not): from the "
              "point's distance to the tracked surface, its agreement with neighbour views and its observers "
              "(facecanon_data.confidence)"),
    ArraySpec("K", "camera", _TV + (3, 3), "float32", "pixels", "intrinsics of the stored images", finite=True),
    ArraySpec("world_2_cam", "camera", _TV + (4, 4), "float32", "metres",
              "extrinsics, OpenCV convention (x right, y down, z forward)", finite=True),
    ArraySpec("points/xyz", "points", ("P", 3), "float32", "metres",
              "the reconstructed points the tracker fitted, all timestamps concatenated"),
    ArraySpec("points/canonical", "points", ("P", 3), "float32", "metres", "the same points in canonical space"),
    ArraySpec("points/offsets", "points", ("T+1",), "int64", "index",
              "timestamp t's points are rows offsets[t]:offsets[t+1]"),
    ArraySpec("track/shape", "track", ("S",), "float32", "unit variance", "identity coefficients",
              required=False),
    ArraySpec("track/expression", "track", ("T", "E"), "float32", "unit variance", "expression coefficients",
              required=False),
    *(ArraySpec(f"track/{joint}", "track", ("T", 3), "float32", "radians", f"{what} rotation (axis-angle)",
                required=False) for joint, what in (("global_rot", "head"), ("neck", "neck"), ("jaw", "jaw"),
                                                    ("left_eye", "left eyeball"), ("right_eye", "right eyeball"))),
    ArraySpec("track/translation", "track", ("T", 3), "float32", "metres", "head translation after skinning",
              required=False),
    ArraySpec("track/offsets", "track", ("Vtx", 3), "float32", "metres", "static per-vertex offsets of the subject",
              required=False),
    ArraySpec("track/timestamp_offsets", "track", ("T", "Vtx", 3), "float32", "metres",
              "per-timestamp vertex offsets (only with track.timestamp_detail)", required=False),
    ArraySpec("track/tracked_vertices", "track", ("T", "Vtx", 3), "float32", "metres",
              "the fitted mesh of every timestamp, world space", required=False),
    ArraySpec("track/canonical_vertices", "track", ("Vtx", 3), "float32", "metres",
              "the subject's canonical mesh (what canonical labels lie on or near)", required=False),
    ArraySpec("track/faces", "track", ("F", 3), "int32", "index", "triangles of both meshes", required=False,
              accepts=("int64",)),
)
SPECS = {spec.name: spec for spec in SCHEMA}
IMAGE_ARRAYS = {s.name: s.dtype for s in SCHEMA if s.kind == "image"}
CAMERA_ARRAYS = {s.name: s.shape[2:] for s in SCHEMA if s.kind == "camera"}
POINT_ARRAYS = tuple(s.name for s in SCHEMA if s.kind == "points")
REQUIRED_ARRAYS = tuple(s.name for s in SCHEMA if s.required)
FINITE_ARRAYS = tuple(s.name for s in SCHEMA if s.finite)
TRAINING_ARRAYS = ("rgb", "depth", "canonical", "mask")  # what the loader reads unless asked for more


def schema_shapes(t: int, v: int, h: int, w: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array: (shape, dtype)} of a subject's image and camera arrays: T timestamps, V views, H x W."""
    dims = {"T": t, "V": v, "H": h, "W": w}
    return {s.name: (s.expected_shape(dims), s.dtype) for s in SCHEMA if s.kind in ("image", "camera")}


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
    confidence: np.ndarray  # (T, V, H, W) uint8 levels of label confidence (facecanon_data.confidence)
    K: np.ndarray  # (T, V, 3, 3)
    world_2_cam: np.ndarray  # (T, V, 4, 4)
    track: dict[str, np.ndarray] = field(default_factory=dict)
    points_xyz: list[np.ndarray] = field(default_factory=list)  # T arrays (P_t, 3)
    points_canonical: list[np.ndarray] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # subject-level label figures (render's, e.g. label_epe)

    def validate(self) -> None:
        t, v, h, w = self.depth.shape
        expect = {"rgb": (t, v, h, w, 3), "canonical": (t, v, h, w, 3), "mask": (t, v, h, w),
                  "region": (t, v, h, w), "confidence": (t, v, h, w), "K": (t, v, 3, 3), "world_2_cam": (t, v, 4, 4)}
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


def file_digest(path: Path, block: int = 2**20) -> str:
    """64-bit BLAKE2b of a file, read in blocks (memory independent of its size). Not crc32c: every chunk
    file ends in its own crc32c, and a CRC over a message followed by its CRC is the same constant for
    every message, so a whole-file crc32c could not tell two chunk files apart."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _file_manifest(group_dir: Path) -> dict[str, list]:
    """{relative path: [bytes, blake2b-64 hex]} of every file of a subject group but its own ``zarr.json``."""
    out = {}
    for path in sorted(group_dir.rglob("*")):
        rel = path.relative_to(group_dir).as_posix()
        if path.is_file() and rel != "zarr.json":
            out[rel] = [path.stat().st_size, file_digest(path)]
    return out


def _array_names(group_dir: Path) -> list[str]:
    """Every array of a subject group, as ``name`` or ``group/name``."""
    return sorted(p.parent.relative_to(group_dir).as_posix() for p in group_dir.rglob("zarr.json")
                  if p.parent != group_dir and json.loads(p.read_text()).get("node_type") == "array")


def _chunk_manifest(group_dir: Path) -> dict[str, list[int]]:
    """{array: [crc32c of each stored chunk, in C order of the chunk grid]}: ties every chunk's content
    to its array and position (a chunk's own checksum does not: two chunks swapped both verify)."""
    from .chunk_reader import ArrayReader

    out = {}
    for name in _array_names(group_dir):
        reader = ArrayReader(group_dir / name)
        out[name] = [reader.stored_checksum(tuple(int(c) for c in coords)) for coords in np.ndindex(*reader.grid)]
    return out


def metadata_digest(attrs: dict) -> str:
    """sha256 of a subject's attributes, the ``integrity.digest`` itself left out: serials, timestamps,
    provenance and the whole manifest are covered, so an edit of any of them is found."""
    import hashlib

    body = {k: v for k, v in attrs.items() if k != "integrity"}
    body["integrity"] = {k: v for k, v in (attrs.get("integrity") or {}).items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- commit ----------------------------------------------------------------------------------------
#
# A writer works in its own *slot* of ``.staging``: ``{stem}/`` (the new group), ``{stem}.lock`` (held
# with flock while the writer lives), and, only during a two-step commit, ``{stem}.commit`` (the
# journal) and ``{stem}.old{n}/`` (the replaced subject). Recovery (:func:`recover_staging`, run when a
# store is opened) takes each slot whose lock nobody holds: with a journal it finishes the commit (or
# puts the old subject back when the new one is gone), then removes whatever the slot still holds.

_COMMIT_HOOK = None  # tests: called between the two renames of a two-step commit (to SIGKILL there)
_RENAME_EXCHANGE = 2
_exchange_supported = True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or the filesystem cannot (the caller then commits in two journaled steps)."""
    global _exchange_supported
    import ctypes
    import sys

    if not _exchange_supported or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        _exchange_supported = False
        return False
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        _exchange_supported = False
        return False
    raise OSError(err, os.strerror(err), str(b))


def _lock(path: Path, blocking: bool) -> int | None:
    """An flock'ed descriptor of ``path`` (created when missing), or None when another process holds it
    (non-blocking). Retries when the file was replaced or removed between open and lock."""
    import fcntl

    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class _Slot:
    """One writer's place in ``.staging`` (see the comment above), locked for the writer's lifetime."""

    def __init__(self, store: Path, subject: str):
        self.staging = store / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.subject = subject
        self.stem = f"{subject}-{uuid.uuid4().hex[:12]}"
        self.fd = _lock(self.staging / f"{self.stem}.lock", blocking=True)
        self.dir = self.staging / self.stem
        self.journal = self.staging / f"{self.stem}.commit"

    def aside(self, n: int) -> Path:
        return self.staging / f"{self.stem}.old{n}"

    def release(self) -> None:
        _clear_slot(self.staging, self.stem)
        os.close(self.fd)


def _slot_entries(staging: Path, stem: str) -> list[Path]:
    return [p for p in staging.iterdir() if p.name.split(".", 1)[0] == stem]


def _clear_slot(staging: Path, stem: str) -> None:
    """Remove a slot's group, replaced subjects and journal; the lock file last."""
    for p in sorted(_slot_entries(staging, stem), key=lambda p: p.suffix == ".lock"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _commit(slot: _Slot, final: Path) -> None:
    """Make ``slot.dir`` the committed ``final``. A first commit is one rename. A replacement is one
    atomic exchange where the filesystem offers it, else two renames under a journal, so an interruption
    between them is finished by the next open (:func:`recover_staging`). With concurrent writers of one
    subject, each retries until its own commit lands; the last one wins, whole."""
    for attempt in range(1000):
        try:
            os.rename(slot.dir, final)  # nothing committed yet: one atomic rename
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            if _exchange(slot.dir, final):  # slot.dir now holds the replaced subject; the slot removes it
                return
        except FileNotFoundError:  # another writer moved it meanwhile
            continue
        tmp = slot.staging / f"{slot.stem}.commit-tmp"
        tmp.write_text(json.dumps({"subject": slot.subject, "final": str(final)}))
        os.replace(tmp, slot.journal)  # the journal exists before the subject leaves subjects/
        try:
            os.rename(final, slot.aside(attempt))
        except FileNotFoundError:  # another writer moved it aside first
            slot.journal.unlink(missing_ok=True)
            continue
        if _COMMIT_HOOK is not None:
            _COMMIT_HOOK()
        try:
            os.rename(slot.dir, final)
        except OSError as exc:  # another writer committed into the gap: theirs stays, ours retries
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        slot.journal.unlink(missing_ok=True)
        return
    raise StoreError(f"{final}: could not commit subject {slot.subject} (another writer kept replacing it)")


def recover_staging(store: str | Path) -> list[str]:
    """Finish or roll back every interrupted commit of ``store`` and remove what dead writers left in
    ``.staging`` (slots whose lock no live process holds). Returns what was done, one line each.
    A store that cannot be written (read-only) is left as it is."""
    staging = Path(store) / ".staging"
    done: list[str] = []
    try:
        stems = sorted({p.name.split(".", 1)[0] for p in staging.iterdir()}) if staging.is_dir() else []
    except OSError:
        return done
    for stem in stems:
        if not stem:
            continue
        try:
            fd = _lock(staging / f"{stem}.lock", blocking=False)
        except OSError:  # read-only or no locks on this filesystem: leave it
            return done
        if fd is None:  # a live writer
            continue
        try:
            journal = staging / f"{stem}.commit"
            if journal.is_file():
                done += _finish_commit(staging, stem, journal)
            _clear_slot(staging, stem)
            done.append(f"{staging / stem}: removed what an interrupted writer left")
        except OSError:
            pass
        finally:
            os.close(fd)
    return done


def _finish_commit(staging: Path, stem: str, journal: Path) -> list[str]:
    try:
        record = json.loads(journal.read_text())
        final = Path(record["final"])
    except (ValueError, KeyError, TypeError):
        return [f"{journal}: unreadable commit journal ignored"]
    if final.exists():
        return []
    new = staging / stem
    olds = sorted((p for p in _slot_entries(staging, stem) if ".old" in p.name), key=lambda p: p.stat().st_mtime)
    if new.is_dir():
        os.rename(new, final)
        return [f"{final}: interrupted commit finished"]
    if olds:
        os.rename(olds[-1], final)
        return [f"{final}: interrupted commit rolled back"]
    return []


def write_subject(store: str | Path, data: SubjectData) -> Path:
    """Write one subject atomically into ``store`` (created when missing). Returns its final path."""
    import zarr

    data.validate()
    store = Path(store)
    ensure_store(store)
    final = store / "subjects" / data.subject
    if final.is_symlink():
        raise StoreError(f"{final}: is a symbolic link; a store's subjects are plain folders (remove the link)")
    slot = _Slot(store, data.subject)
    try:
        g = zarr.open_group(str(slot.dir), mode="w", zarr_format=3)
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
                        "timestamps": _jsonable(data.timestamps), "quality": _jsonable(data.quality),
                        "provenance": {**_jsonable(data.provenance), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                        "integrity": {"files": _file_manifest(slot.dir),
                                      "chunks": _chunk_manifest(slot.dir)}})
        attrs = json.loads((slot.dir / "zarr.json").read_text())["attributes"]  # exactly what a reader parses
        g.attrs.update({"integrity": {**attrs["integrity"], "digest": metadata_digest(attrs)}})
        final.parent.mkdir(parents=True, exist_ok=True)
        _commit(slot, final)
        return final
    finally:
        slot.release()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def ensure_store(store: Path) -> None:
    """Create the root group once (idempotent; safe with concurrent writers), and recover what
    interrupted writers left in ``.staging``."""
    import zarr

    root = store / "zarr.json"
    if not root.is_file():
        if store.exists() and not store.is_dir():
            raise StoreError(f"{store}: exists and is not a folder, so it cannot hold a store")
        store.mkdir(parents=True, exist_ok=True)
        tmp = store / f".zarr.json.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                   "attributes": {"schema_version": SCHEMA_VERSION}}))
        os.replace(tmp, root)
        zarr.open_group(str(store), mode="r")  # the root parses
    (store / "subjects").mkdir(exist_ok=True)
    recover_staging(store)


def subjects(store: str | Path) -> list[str]:
    """Committed subjects (never those still in ``.staging``); an interrupted commit is finished first."""
    folder = Path(store) / "subjects"
    if (Path(store) / ".staging").is_dir():
        recover_staging(store)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())


def open_subject(store: str | Path, subject: str):
    """A committed subject as a read-only zarr group, after :func:`subject_attrs` checked its metadata."""
    import zarr

    subject_attrs(store, subject)
    return zarr.open_group(str(Path(store) / "subjects" / subject), mode="r")


MAX_GROUP_METADATA_BYTES = 64 * 2**20  # a subject's zarr.json (its manifest lists every file and chunk)


def subject_attrs(store: str | Path, subject: str) -> dict:
    """A committed subject's attributes, after checking its schema version and that they are the ones
    written (the integrity digest covers serials, timestamps, provenance and the manifest)."""
    path = Path(store) / "subjects" / subject / "zarr.json"
    if not path.is_file() and (Path(store) / ".staging").is_dir():
        recover_staging(store)  # an interrupted commit of this subject is finished (or rolled back)
    try:
        if path.stat().st_size > MAX_GROUP_METADATA_BYTES:
            raise StoreError(f"{path}: {path.stat().st_size} bytes, larger than any group metadata this "
                             f"store writes ({MAX_GROUP_METADATA_BYTES} bytes)")
        attrs = json.loads(path.read_text())["attributes"]
    except FileNotFoundError:
        raise StoreError(f"{path.parent}: subject not in the store") from None
    except IsADirectoryError:
        raise StoreError(f"{path}: a folder where the subject's metadata file belongs") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise StoreError(f"{path}: malformed group metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(attrs, dict):
        raise StoreError(f"{path}: malformed group metadata (attributes are not an object)")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path.parent}: schema_version {attrs.get('schema_version')}, this version reads "
                         f"{SCHEMA_VERSION} (rebuild it with `facecanon-data build` or `write`)")
    integrity = attrs.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("files"), dict) \
            or not isinstance(integrity.get("chunks"), dict):
        raise StoreError(f"{path}: no integrity manifest in the subject's attributes")
    if integrity.get("digest") != metadata_digest(attrs):
        raise StoreError(f"{path}: the subject's attributes were altered after writing (serials, timestamps, "
                         "provenance or the integrity manifest no longer match its digest)")
    serials, timestamps = attrs.get("serials"), attrs.get("timestamps")
    if not (isinstance(serials, list) and all(isinstance(x, str) for x in serials)
            and isinstance(timestamps, list) and all(isinstance(x, dict) for x in timestamps)):
        raise StoreError(f"{path}: serials must be a list of strings and timestamps a list of objects")
    missing = [n for n in REQUIRED_ARRAYS if f"{n}/zarr.json" not in integrity["files"]]
    if missing:
        raise StoreError(f"{path.parent}: required array(s) {', '.join(missing)} are not in the subject")
    return attrs


def subject_readers(store: str | Path, subject: str, names=tuple(IMAGE_ARRAYS) + tuple(CAMERA_ARRAYS)):
    """{array name: :class:`~facecanon_data.chunk_reader.ArrayReader`} of a committed subject, each array
    checked before it is read: its metadata file against the manifest's checksum, its dtype and shape
    against the schema, and every chunk it reads against the manifest's checksum for that array and
    position (besides the chunk's own). Errors name the subject, array and chunk."""
    from .chunk_reader import ArrayReader

    attrs = subject_attrs(store, subject)
    folder = Path(store) / "subjects" / subject
    integrity = attrs["integrity"]
    out = {}
    for n in names:
        meta = folder / n / "zarr.json"
        size, digest = integrity["files"].get(f"{n}/zarr.json", (None, None))
        try:
            altered = meta.is_file() and file_digest(meta) != digest
        except OSError as exc:
            raise StoreError(f"{meta}: unreadable ({exc.strerror})") from None
        if altered:
            raise StoreError(f"subject {subject}, array {n}: {meta} was altered after writing (its digest differs "
                             "from the integrity manifest)")
        reader = ArrayReader(folder / n, label=f"subject {subject}, array {n}",
                             expected_checksums=integrity["chunks"].get(n))
        out[n] = reader
    shapes = schema_shapes(len(attrs["timestamps"]), len(attrs["serials"]), *out[next(iter(out))].shape[2:4]) \
        if out and next(iter(out)) in IMAGE_ARRAYS else None
    for n, reader in out.items():
        want = shapes.get(n) if shapes else None
        if want is not None and (tuple(reader.shape), str(reader.dtype)) != want:
            raise StoreError(f"subject {subject}, array {n}: {tuple(reader.shape)} {reader.dtype}, the schema "
                             f"says {want[0]} {want[1]}")
    return out


# ---------------------------------------------------------------------------------------------
# index


INDEX_COLUMNS = {  # column: (type, meaning); one row per view-sample
    "subject": ("string", "subject id (the group under subjects/)"),
    "sequence": ("string", "capture sequence"),
    "frame": ("int64", "frame number in the sequence"),
    "serial": ("string", "camera id"),
    "t": ("int64", "timestamp index into the subject's arrays"),
    "v": ("int64", "view index into the subject's arrays"),
    "reason": ("string", "why the timestamp was kept: expression / pose pick or first:N"),
    "valid_fraction": ("double", "fraction of the view's pixels with labels"),
    "cd_l1_mm": ("double", "the timestamp's tracking error (CD-L1, head points), mm"),
    "landmark_px": ("double", "the timestamp's landmark reprojection error, pixels"),
    "height": ("int64", "stored image height, pixels"),
    "width": ("int64", "stored image width, pixels"),
}


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
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)  # a failed write (full disk) leaves the previous index, whole
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_index(store: str | Path):
    """``index.parquet`` as a pyarrow table; a missing, unreadable or foreign index is a :class:`StoreError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(store) / "index.parquet"
    if not path.is_file():
        raise StoreError(f"{path}: no index (run `facecanon-data index {store}`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: unreadable ({exc}); rebuild it with `facecanon-data index {store}`") from None
    missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise StoreError(f"{path}: lacks the column(s) {', '.join(missing)}; rebuild it with "
                         f"`facecanon-data index {store}`")
    return table


def validate_store(store: str | Path, quick: bool = False, sample: int = 8) -> list[str]:
    """Problems found (empty list = valid): schema, every file against the subject's integrity manifest,
    every array's dtype and shape against the schema, every chunk decoded and checksum-verified (rgb and
    mask included), NaN/inf and negative depth, point offsets, and the index against the arrays.

    The subject's attributes are checked against their digest (serials, timestamps, the manifest), the
    required arrays against the schema, every file's digest against the manifest, and every chunk against
    the checksum the manifest records for its array and position (so swapped chunks are found).
    ``quick``: files by size (metadata still by checksum) and ``sample`` seeded chunks per image array
    instead of all (the camera, track and point arrays are always read whole).
    """
    problems: list[str] = []
    store = Path(store)
    if not (store / "zarr.json").is_file():
        return [f"{store}: not a facecanon-data store (no zarr.json)"]
    recover_staging(store)
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


def _validate_subject(store: Path, pid: str, quick: bool, sample: int) -> tuple[list[str], set]:
    from .chunk_reader import ArrayReader, ChunkError

    path = store / "subjects" / pid
    try:
        attrs = subject_attrs(store, pid)
    except StoreError as exc:
        return [str(exc)], set()
    problems: list[str] = []
    manifest = attrs["integrity"]["files"]
    chunk_sums = attrs["integrity"]["chunks"]
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
        elif (not quick or f.name == "zarr.json") and file_digest(f) != digest:
            problems.append(f"{f}: content altered (its digest differs from the manifest)")

    def reader(name: str):
        try:
            return ArrayReader(path / name, label=f"subject {pid}, array {name}", expected_checksums=chunk_sums.get(name))
        except ChunkError as exc:
            problems.append(str(exc))
            return None

    depth = reader("depth")
    if depth is None or len(depth.shape) != 4:
        problems.append(f"{path}/depth: missing or not (T, V, H, W)")
        return problems, set()
    t, v, h, w = depth.shape
    schema = schema_shapes(t, v, h, w)
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
            if name in FINITE_ARRAYS and not np.isfinite(chunk.astype(np.float32)).all():
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
            spec = SPECS.get(name)
            if spec is None:
                problems.append(f"{path}/{name}: an array the schema does not know")
                continue
            if not spec.fits(tuple(arr.shape), str(arr.dtype), {"T": t}):
                problems.append(f"{path}/{name}: {tuple(arr.shape)} {arr.dtype} does not fit the schema "
                                f"({spec.shape_text()} {spec.dtype})")
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
