"""The restricted unpickler: FLAME-style pickles load, anything that would run code is refused."""
from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp

from facecanon_data.flame.assets import load_flame_model
from facecanon_data.flame.safe_pickle import UnsafePickleError, safe_load_pickle


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Exploit(marker)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="evil.pkl.*posix.system|evil.pkl.*os.system"):
        safe_load_pickle(path)


def test_refuses_builtins_eval(tmp_path):
    path = tmp_path / "eval.pkl"
    # GLOBAL builtins.eval, then call it: a classic payload built by hand.
    path.write_bytes(b"cbuiltins\neval\n(V__import__('os').getcwd()\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_load_pickle(path)


def _fake_chumpy_module():
    """A stand-in ``chumpy.ch.Ch`` class so we can write a pickle shaped like FLAME 2020's."""
    chumpy = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    ch.Ch = Ch
    chumpy.ch = ch
    return chumpy, ch


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_loads_chumpy_and_sparse_flame_layout(tmp_path, monkeypatch, protocol):
    chumpy, ch = _fake_chumpy_module()
    monkeypatch.setitem(sys.modules, "chumpy", chumpy)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch)
    rng = np.random.default_rng(0)
    v, f = rng.normal(size=(6, 3)), np.array([[0, 1, 2], [2, 3, 4], [3, 4, 5]])
    weights = np.abs(rng.normal(size=(6, 5)))
    weights /= weights.sum(1, keepdims=True)
    raw = {"v_template": ch.Ch(v), "f": f.astype(np.uint32), "shapedirs": ch.Ch(rng.normal(size=(6, 3, 400))),
           "posedirs": rng.normal(size=(6, 3, 36)), "J_regressor": sp.csc_matrix(np.full((5, 6), 1 / 6)),
           "weights": ch.Ch(weights), "kintree_table": np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])}
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))  # 0 and 1: copy_reg._reconstructor for the sparse
    monkeypatch.delitem(sys.modules, "chumpy")
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    model = load_flame_model(path)
    np.testing.assert_allclose(model.v_template, v.astype(np.float32))
    np.testing.assert_allclose(model.J_regressor, np.full((5, 6), 1 / 6, np.float32))
    assert model.num_shape == 300 and model.num_expression == 100
    assert model.posedirs.shape == (36, 18) and list(model.parents) == [-1, 0, 1, 1, 1]
    assert (tmp_path / "generic_model.npz").is_file()  # cache written
    again = load_flame_model(path)  # from the cache
    np.testing.assert_array_equal(again.shapedirs, model.shapedirs)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_flame_model(tmp_path / "nope.pkl")


class _HugeArray:
    """Pickles as numpy's own array reconstruction, asking for a terabyte."""

    def __reduce__(self):
        reconstruct = np.zeros(0).__reduce__()[0]  # numpy's own, under numpy 1 and 2
        return (reconstruct, (np.ndarray, (10 ** 12,), b"b"))


def test_an_array_larger_than_the_file_is_refused_before_allocation(tmp_path):
    path = tmp_path / "huge.pkl"
    path.write_bytes(pickle.dumps({"v_template": _HugeArray()}, protocol=2))
    assert path.stat().st_size < 500
    with pytest.raises(UnsafePickleError, match=r"huge.pkl: an array of shape \(1000000000000,\).*larger than the file"):
        safe_load_pickle(path)


def test_a_sparse_regressor_beyond_the_model_family_is_refused(tmp_path):
    from facecanon_data.flame.assets import AssetError

    rng = np.random.default_rng(0)
    weights = np.full((6, 5), 0.2)
    raw = {"v_template": rng.normal(size=(6, 3)), "f": np.array([[0, 1, 2]], np.uint32),
           "shapedirs": rng.normal(size=(6, 3, 10)), "posedirs": rng.normal(size=(6, 3, 36)),
           "J_regressor": sp.csc_matrix((10 ** 6, 10 ** 7)),  # a few bytes on disk, 80 TB dense
           "weights": weights, "kintree_table": np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])}
    path = tmp_path / "sparse_bomb.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=2))
    with pytest.raises(AssetError, match=r"sparse_bomb.pkl: J_regressor has shape \(1000000, 10000000\)"):
        load_flame_model(path, cache=False)


def test_reconstructor_of_any_other_class_is_refused(tmp_path):
    # Protocol 0 by hand: copy_reg._reconstructor(set, object, None) -- a class outside the allow-list.
    path = tmp_path / "recon.pkl"
    path.write_bytes(b"ccopy_reg\n_reconstructor\n(c__builtin__\nset\nc__builtin__\nobject\nNtR.")
    with pytest.raises(UnsafePickleError, match="recon.pkl: copy_reg._reconstructor for <class 'set'>"):
        safe_load_pickle(path)


class _HugeNdarray:
    """Pickles as a REDUCE of numpy.ndarray((2**29,), float64): 4 GiB asked of the constructor."""

    def __reduce__(self):
        return (np.ndarray, ((2**29,), np.dtype("float64")))


def test_an_ndarray_constructor_asking_for_gigabytes_is_refused_before_allocation(tmp_path):
    import tracemalloc

    path = tmp_path / "reduce.pkl"
    path.write_bytes(pickle.dumps({"v_template": _HugeNdarray()}, protocol=2))
    tracemalloc.start()
    with pytest.raises(UnsafePickleError, match=r"reduce.pkl: an array of shape \(536870912,\).*larger than the file"):
        safe_load_pickle(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20, peak
