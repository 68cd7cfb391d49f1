"""Restricted unpickling for FLAME's pickles.

FLAME 2020 ``generic_model.pkl`` is a Python 2 pickle holding ``chumpy`` arrays, ``scipy.sparse``
matrices and numpy arrays; ``FLAME_masks.pkl`` holds numpy arrays. chumpy itself no longer imports on
numpy >= 1.24, and a pickle may name any callable. So we never let pickle import anything: a fixed
allow-list maps the globals these files legitimately use to safe constructors, chumpy objects become
inert state holders converted to numpy afterwards, and every other global raises before it can run.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from ..errors import InputError, InputFileNotFound


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """Raised when a pickle names a global outside the allow-list, or asks for more memory than it can hold."""


# A pickled array carries its data, so no legitimate array is larger than the file; sparse matrices
# are densified by the caller under the FLAME family's bounds (``flame.assets.MAX_JOINTS``, ``MAX_VERTICES``).
_SLACK_BYTES = 1 << 20


class _ChumpyPlaceholder:
    """Stands in for ``chumpy.ch.Ch`` (and subclasses); keeps only the pickled state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self) -> np.ndarray:
        state = self.state
        if isinstance(state, dict):
            for key in ("x", "a", "_x"):
                if key in state and isinstance(state[key], np.ndarray):
                    return np.asarray(state[key])
            arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
            if len(arrays) == 1:
                return np.asarray(arrays[0])
        raise pickle.UnpicklingError("chumpy object without a recognizable array in its state")


def _object_new(cls: type, *args: Any) -> Any:
    """``copy_reg._reconstructor`` restricted to our placeholder and plain ``object``."""
    return cls.__new__(cls)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copy_reg._reconstructor`` (protocols 0 and 1) for exactly the allow-listed classes: chumpy
    placeholders and scipy's sparse matrices, created bare (``object.__new__``); their state is then set
    by pickle's BUILD as plain attributes. Anything else is refused."""
    if cls is _ChumpyPlaceholder:
        return _ChumpyPlaceholder()
    import scipy.sparse as sp

    if cls in tuple(getattr(sp, n) for n in _SPARSE_NAMES) and base is object and state is None:
        return object.__new__(cls)
    raise UnsafePickleError(f"copy_reg._reconstructor for {cls!r} (base {base!r}) is not allowed")


def _sparse_class(name: str) -> type:
    import scipy.sparse as sp

    return getattr(sp, name)


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
# numpy's array constructors: numpy._core since numpy 2 (numpy.core warns there), numpy.core before it
_MULTIARRAY = importlib.import_module("numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2
                                      else "numpy.core.multiarray")
_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix"}
_SPARSE_MODULES = {"scipy.sparse.csc", "scipy.sparse.csr", "scipy.sparse.coo", "scipy.sparse._csc",
                   "scipy.sparse._csr", "scipy.sparse._coo", "scipy.sparse"}


# Containers chumpy's state uses; constructing them runs no user code.
_SAFE_BUILTINS = {"object": object, "set": set, "frozenset": frozenset, "slice": slice}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy arrays, scipy sparse matrices and chumpy arrays.

    ``max_array_bytes``: the largest array it may allocate (the caller passes the file size plus slack).
    """

    def __init__(self, file, *, max_array_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.max_array_bytes = max_array_bytes

    def _bounded_reconstruct(self, cls: type, shape: Any, dtype: Any) -> np.ndarray:
        """``numpy.core.multiarray._reconstruct``, refusing shapes larger than the file could fill."""
        if cls == self._bounded_ndarray:  # the pickle's ``numpy.ndarray`` global, passed as the class
            cls = np.ndarray
        if cls is not np.ndarray:
            raise UnsafePickleError(f"array reconstruction of {cls!r} is not allowed")
        try:
            dims = [int(x) for x in (shape if isinstance(shape, (tuple, list)) else (shape,))]
            nbytes = int(np.prod(dims, dtype=object)) * np.dtype(dtype).itemsize
        except (TypeError, ValueError) as exc:
            raise UnsafePickleError(f"array reconstruction with shape {shape!r}, dtype {dtype!r} ({exc})") from None
        if any(x < 0 for x in dims) or nbytes > self.max_array_bytes:
            raise UnsafePickleError(f"an array of shape {tuple(dims)} ({nbytes} bytes) is larger than the file "
                                    "could hold")
        return _MULTIARRAY._reconstruct(cls, tuple(dims), dtype)

    def _bounded_ndarray(self, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
        """``numpy.ndarray(shape, dtype)`` as a pickle's REDUCE calls it, refused before allocating when it
        asks for more than the file could fill (the constructor allocates at once, data or not)."""
        if args or kwargs:
            raise UnsafePickleError("numpy.ndarray with a buffer, offset or strides is not allowed")
        return self._bounded_reconstruct(np.ndarray, shape, dtype)

    def _bounded_bytes(self, *args: Any) -> bytes:
        if args and isinstance(args[0], int) and not 0 <= args[0] <= self.max_array_bytes:
            raise UnsafePickleError(f"bytes({args[0]}) is larger than the file could hold")
        return bytes(*args)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            if name == "_reconstruct":
                return self._bounded_reconstruct
            if name == "scalar":
                return _MULTIARRAY.scalar
            if name == "ndarray":
                return self._bounded_ndarray
            return getattr(np, name)
        if module in _SPARSE_MODULES and name in _SPARSE_NAMES:
            return _sparse_class(name)
        if module.startswith("chumpy"):
            return _ChumpyPlaceholder
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _reconstructor
        if module in ("__builtin__", "builtins") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module in ("__builtin__", "builtins") and name == "bytes":  # protocol 2 writes b"" as bytes()
            return self._bounded_bytes
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles store bytes this way
            import codecs

            return codecs.encode
        raise UnsafePickleError(f"refusing to load global {module}.{name}")


def _to_plain(value: Any) -> Any:
    """Replace chumpy placeholders by numpy arrays, recursively through dicts/lists."""
    if isinstance(value, _ChumpyPlaceholder):
        return value.to_numpy()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    return value


def safe_load_pickle(path: str | Path) -> Any:
    """Load a FLAME-family pickle without executing code from it.

    Raises ``FileNotFoundError`` for a missing file and ``UnsafePickleError`` (naming the file and the
    refused global) for anything outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: no such file")
    data = path.read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1",
                                  max_array_bytes=len(data) + _SLACK_BYTES).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except MemoryError:
        raise UnsafePickleError(f"{path}: asks for more memory than this machine has") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise pickle.UnpicklingError(f"{path}: not a readable FLAME pickle ({exc})") from None
    return _to_plain(obj)
