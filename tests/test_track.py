"""Stage track: gradients, recovery of known parameters, outlier removal, sparse Laplacian."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facecanon_data.config import load_pipeline
from facecanon_data.paths import default_pipeline
from facecanon_data.stages.track import _Fitter, run_track, uniform_laplacian
from facecanon_data.synthetic.observations import synthetic_observations


@pytest.fixture(scope="module")
def cfg():
    return load_pipeline(default_pipeline(), {"track": {"iterations": [100, 150, 250, 250]}})


@pytest.fixture(scope="module")
def observed(cfg):
    return synthetic_observations(cfg, num_timestamps=8, seed=3)


def test_laplacian_is_sparse_and_annihilates_constants(head_assets):
    m = head_assets.model
    lap = uniform_laplacian(m.num_vertices, m.faces)
    assert lap.is_sparse and lap.shape == (m.num_vertices, m.num_vertices)
    assert lap._nnz() < 10 * m.num_vertices  # ~ V + 2E entries, never V x V
    ones = torch.ones(m.num_vertices, 1)
    assert torch.sparse.mm(lap, ones).abs().max() < 1e-5


def test_gradients_reach_every_optimized_group(cfg, observed, head_assets):
    obs, _ = observed
    f = _Fitter(head_assets, obs[:3], cfg.track, "cpu")
    f.params.offsets += 1e-4  # off the L2/Laplacian minimum so their gradient is non-zero too
    groups = f.groups(3)
    for g in groups:
        for t in g["params"]:
            t.requires_grad_(True)
    with torch.no_grad():
        f.refresh_correspondences(f.vertices())
    f.loss(f.vertices(), 3).backward()
    names = {id(getattr(f.params, k)): k for k in ("global_rot", "translation", "shape", "expression", "jaw",
                                                   "neck", "left_eye", "right_eye", "offsets")}
    for g in groups:
        for t in g["params"]:
            assert t.grad is not None and t.grad.abs().sum() > 0, names[id(t)]


def test_fit_from_perturbed_start_recovers_known_parameters(cfg, observed, head_assets, tmp_path):
    obs, gt = observed
    result = run_track(None, "999", cfg, tmp_path, device="cpu", observations=obs)
    assert result.outliers_removed == 0 and result.timestamps_kept == 8
    with np.load(tmp_path / "999" / "track" / "vertices.npz") as z:
        tracked = z["tracked"]
    face = head_assets.masks["face"]
    err = np.linalg.norm(tracked[:, face] - gt["vertices"][:, face], axis=-1).mean() * 1000
    assert err < 1.0, f"mean face-vertex error {err:.2f} mm"
    with np.load(tmp_path / "999" / "track" / "params.npz") as z:
        jaw = z["jaw"][:, 0]
    np.testing.assert_allclose(jaw, gt["params"]["jaw"][:, 0], atol=0.03)  # radians
    assert result.cd_l1_mm_median < 0.6
    for name in ("errors.parquet", "errors.png", "overlay.png", "params.npz"):
        assert (tmp_path / "999" / "track" / name).is_file()


def test_corrupted_timestamp_is_removed_as_outlier(cfg, observed, tmp_path):
    obs, _ = observed
    rng = np.random.default_rng(0)
    bad = obs[5]
    corrupted = [o if o is not bad else type(o)(o.sequence, o.frame, o.points + rng.normal(0, 0.006, o.points.shape),
                                                 o.cameras, o.landmarks) for o in obs]
    result = run_track(None, "998", cfg, tmp_path, device="cpu", observations=corrupted)
    assert list(result.outliers) == [bad.key] and "CD-L1" in result.outliers[bad.key]
    assert result.timestamps_kept == 7 and result.outliers_removed == 1
