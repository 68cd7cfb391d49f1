"""Triangle-mesh connectivity shared by the head model, the tracker and the synthetic builder."""
from __future__ import annotations

import numpy as np


def adjacency(num_vertices: int, faces: np.ndarray):
    """Symmetric (V, V) scipy CSR matrix with 1 where two vertices share an edge."""
    import scipy.sparse as sp

    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(num_vertices,) * 2).tocsr()
    a.data[:] = 1.0
    return a
