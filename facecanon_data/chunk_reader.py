"""Verified reads of single chunks of the store's Zarr v3 arrays.

The store is written with zarr-python; this module reads it back one chunk at a time, because that is
what the loader does per view and zarr-python's per-call machinery (an event-loop round trip, codec
pipeline set-up, a shard-index read per call) costs more than decoding the chunk itself (measured in
``bench loader``). It understands exactly the encodings the store writes — ``bytes`` (little endian)
→ ``zstd`` → ``crc32c``, optionally inside ``sharding_indexed`` with a ``bytes`` + ``crc32c`` index at the
end of the shard — and refuses anything else by name. Every read is checked:

- a shard or chunk file that is missing, a chunk absent from its shard's index, a truncated shard,
  or a checksum that does not match raises :class:`ChunkError` naming the array, the chunk and the file;
- a chunk is never replaced by the fill value (zarr-python's behaviour for missing chunks).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from .errors import InputError

_EMPTY = np.uint64(2**64 - 1)  # a shard-index entry of a chunk that is not stored
_SUPPORTED_INNER = ("bytes", "zstd", "crc32c")


class ChunkError(InputError, ValueError):
    """A chunk of the store is missing, truncated or altered; the message names array, chunk and file."""


@lru_cache(maxsize=1)
def _zstd():
    from numcodecs import Zstd

    return Zstd()


def crc32c(data) -> int:
    import google_crc32c  # zarr's own crc32c dependency

    return int(google_crc32c.value(data))


@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]  # (...)        the whole array
    dtype: np.dtype
    chunk_shape: tuple[int, ...]  # one (inner) chunk
    shard_shape: tuple[int, ...] | None  # None: not sharded
    codecs: tuple[str, ...]  # inner codec names, in encoding order


def _codec_names(codecs: list[dict], where: str) -> tuple[str, ...]:
    names = []
    for c in codecs:
        name = c.get("name")
        conf = c.get("configuration") or {}
        if name not in _SUPPORTED_INNER:
            raise ChunkError(f"{where}: codec {name!r} is not one this store writes ({', '.join(_SUPPORTED_INNER)})")
        if name == "bytes" and conf.get("endian", "little") != "little":
            raise ChunkError(f"{where}: big-endian arrays are not written by this store")
        if name == "zstd" and conf.get("checksum"):
            raise ChunkError(f"{where}: zstd with its own checksum is not written by this store")
        names.append(name)
    if not names or names[0] != "bytes":
        raise ChunkError(f"{where}: expected a 'bytes' codec first, got {names}")
    return tuple(names)


def read_layout(array_dir: Path) -> _Layout:
    """The layout of one array from its ``zarr.json`` (errors name the file)."""
    meta_path = array_dir / "zarr.json"
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(int(s) for s in meta["shape"])
        dtype = np.dtype(meta["data_type"])
        grid = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
    except FileNotFoundError:
        raise ChunkError(f"{meta_path}: array metadata missing") from None
    except IsADirectoryError:
        raise ChunkError(f"{meta_path}: a folder where the array metadata file belongs") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ChunkError(f"{meta_path}: malformed array metadata ({exc})") from None
    if meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/":
        raise ChunkError(f"{meta_path}: only '/'-separated chunk keys are written by this store")
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0]["configuration"]
        index = [c.get("name") for c in conf.get("index_codecs", [])]
        if index != ["bytes", "crc32c"] or conf.get("index_location", "end") != "end":
            raise ChunkError(f"{meta_path}: shard index {index} at {conf.get('index_location')!r} is not the "
                             "store's (bytes + crc32c at the end)")
        return _Layout(shape, dtype, tuple(int(s) for s in conf["chunk_shape"]), grid,
                       _codec_names(conf["codecs"], str(meta_path)))
    return _Layout(shape, dtype, grid, None, _codec_names(codecs, str(meta_path)))


def _read_tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        return os.pread(f.fileno(), min(n, size), max(size - n, 0))


class ArrayReader:
    """Reads single chunks of one stored array, verifying each one.

    Args:
        array_dir: the array's folder (holding ``zarr.json`` and ``c/...``).
        label: how errors name the array, e.g. ``"subject 900, array rgb"``.
        expected_checksums: the crc32c each chunk must carry, in C order of the chunk grid (the store's
            integrity manifest): ties a chunk's content to its position, which its own checksum does not.
    """

    def __init__(self, array_dir: str | Path, label: str | None = None, expected_checksums: list[int] | None = None):
        self.dir = Path(array_dir)
        self.label = label or str(self.dir)
        self.layout = read_layout(self.dir)
        self.grid = tuple(-(-s // c) for s, c in zip(self.layout.shape, self.layout.chunk_shape))  # chunks per axis
        if expected_checksums is not None and len(expected_checksums) != int(np.prod(self.grid)):
            raise ChunkError(f"{self.label}: the integrity manifest lists {len(expected_checksums)} chunks, the "
                             f"array's metadata a grid of {int(np.prod(self.grid))}")
        self.expected = expected_checksums
        self._index: dict[tuple[int, ...], np.ndarray] = {}  # shard coords -> (n, 2) uint64 offsets, sizes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    def _key_path(self, coords: tuple[int, ...]) -> Path:
        return self.dir.joinpath("c", *[str(c) for c in coords]) if coords else self.dir / "c"

    def _shard_index(self, shard: tuple[int, ...], path: Path, per_shard: tuple[int, ...]) -> np.ndarray:
        index = self._index.get(shard)
        if index is not None:
            return index
        n = int(np.prod(per_shard))
        size = n * 16 + 4
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                file_size = f.tell()
                if file_size < size:
                    raise ChunkError(f"{self.label}: shard {path} is truncated ({file_size} bytes, index alone is {size})")
                f.seek(file_size - size)
                raw = f.read(size)
        except FileNotFoundError:
            raise ChunkError(f"{self.label}: shard {path} is missing") from None
        except IsADirectoryError:
            raise ChunkError(f"{self.label}: shard {path} is a folder, not a file") from None
        if crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ChunkError(f"{self.label}: shard {path} has a corrupt index (checksum mismatch)")
        index = np.frombuffer(raw[:-4], "<u8").reshape(n, 2)
        ends = index[:, 0] + index[:, 1]
        stored = index[:, 0] != _EMPTY
        if stored.any() and ends[stored].max() > file_size - size:
            raise ChunkError(f"{self.label}: shard {path} is truncated (a chunk ends past its data)")
        self._index[shard] = index
        return index

    def _encoded(self, coords: tuple[int, ...], tail: int | None = None) -> tuple[bytes, Path]:
        """The stored bytes of one chunk (only its last ``tail`` bytes when given) and its file."""
        lay = self.layout
        if lay.shard_shape is None:
            path = self._key_path(coords)
            try:
                return (path.read_bytes() if tail is None else _read_tail(path, tail)), path
            except FileNotFoundError:
                raise ChunkError(f"{self.label}: chunk {coords} is missing ({path})") from None
            except IsADirectoryError:
                raise ChunkError(f"{self.label}: chunk {coords} is a folder, not a file ({path})") from None
        per_shard = tuple(s // c for s, c in zip(lay.shard_shape, lay.chunk_shape))
        shard = tuple(c // p for c, p in zip(coords, per_shard))
        local = tuple(c % p for c, p in zip(coords, per_shard))
        path = self._key_path(shard)
        index = self._shard_index(shard, path, per_shard)
        offset, nbytes = index[int(np.ravel_multi_index(local, per_shard))]
        if offset == _EMPTY:
            raise ChunkError(f"{self.label}: chunk {coords} is missing from shard {path}")
        if tail is not None:
            offset, nbytes = offset + max(int(nbytes) - tail, 0), min(int(nbytes), tail)
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), int(nbytes), int(offset))
        if len(data) != nbytes:
            raise ChunkError(f"{self.label}: chunk {coords} of shard {path} is truncated")
        return data, path

    def stored_checksum(self, coords: tuple[int, ...]) -> int:
        """The crc32c a stored chunk carries (its last 4 bytes), read without the rest of the chunk."""
        self._check_coords(coords)
        data, _ = self._encoded(coords, tail=4)
        return int.from_bytes(data[-4:], "little")

    def _check_coords(self, coords: tuple[int, ...]) -> None:
        if len(coords) != len(self.grid) or any(not 0 <= c < g for c, g in zip(coords, self.grid)):
            raise IndexError(f"{self.label}: chunk {coords} outside the chunk grid {self.grid}")

    def read_chunk(self, coords: tuple[int, ...]) -> np.ndarray:
        """One chunk, ``chunk_shape`` (clipped at the array's edge), in the array's dtype."""
        self._check_coords(coords)
        data, path = self._encoded(coords)
        if self.expected is not None:
            stored = int.from_bytes(data[-4:], "little") if len(data) >= 4 else None
            if stored != self.expected[int(np.ravel_multi_index(coords, self.grid))]:
                raise ChunkError(f"{self.label}: chunk {coords} in {path} is not the chunk written at that position "
                                 "(its checksum differs from the integrity manifest)")
        lay = self.layout
        count = int(np.prod(lay.chunk_shape))
        out = np.empty(count, lay.dtype)  # writable, decoded into directly
        for name in reversed(lay.codecs[1:]):
            if name == "crc32c":
                if len(data) < 4 or crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
                    raise ChunkError(f"{self.label}: chunk {coords} in {path} is altered (checksum mismatch)")
                data = data[:-4]
            elif name == "zstd":
                try:
                    _zstd().decode(data, out=out.view(np.uint8))
                except (RuntimeError, ValueError) as exc:
                    raise ChunkError(f"{self.label}: chunk {coords} in {path} does not decompress to "
                                     f"{out.nbytes} bytes ({exc})") from None
                data = None
        if data is not None:  # stored without compression
            if len(data) != out.nbytes:
                raise ChunkError(f"{self.label}: chunk {coords} in {path} has {len(data)} bytes, expected {out.nbytes}")
            out.view(np.uint8)[:] = np.frombuffer(data, np.uint8)
        out = out.reshape(lay.chunk_shape)
        edge = tuple(slice(0, min(c, s - i * c)) for i, c, s in zip(coords, lay.chunk_shape, lay.shape))
        return out[edge]

    def read_all(self) -> np.ndarray:
        """The whole array, chunk by chunk (every chunk verified)."""
        out = np.empty(self.layout.shape, self.layout.dtype)
        for coords in np.ndindex(*self.grid):
            sl = tuple(slice(i * c, i * c + c) for i, c in zip(coords, self.layout.chunk_shape))
            out[sl] = self.read_chunk(tuple(int(c) for c in coords))
        return out
