"""Stage track: gradients, recovery of known parameters, outlier removal, sparse Laplacian."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from facecanon_data.config import load_pipeline
from facecanon_data.paths import default_pipeline
from facecanon_data.stages.track import _Fitter, run_track, smooth_basis, uniform_laplacian
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


def test_smooth_basis_is_smooth_and_coarse_offsets_fold_into_the_offsets(cfg, observed, head_assets):
    m = head_assets.model
    basis = smooth_basis(m.num_vertices, m.faces, 32)
    assert basis.shape == (m.num_vertices, 32)
    np.testing.assert_allclose(np.sqrt((basis ** 2).mean(0)), 1.0, rtol=1e-3)
    lap = uniform_laplacian(m.num_vertices, m.faces).to_dense().numpy()
    noise = np.random.default_rng(0).normal(size=(m.num_vertices, 32)).astype(np.float32)
    roughness = lambda f: np.abs(lap @ f).mean()  # noqa: E731
    assert roughness(basis) < 0.02 * roughness(noise)
    # The coarse field moves the mesh like offsets do, and folding it into the offsets changes nothing.
    track_cfg = dataclasses.replace(cfg.track, offset_coarse_basis=16)
    f = _Fitter(head_assets, observed[0][:2], track_cfg, "cpu")
    f.coarse += torch.linspace(-0.004, 0.004, 48).reshape(16, 3)
    before = f.vertices()
    assert (before - _Fitter(head_assets, observed[0][:2], cfg.track, "cpu").vertices()).abs().max() > 1e-3
    f.fold_coarse_offsets()
    assert f.coarse.abs().max() == 0
    torch.testing.assert_close(f.vertices(), before, atol=1e-6, rtol=0)


def test_timestamp_detail_moves_its_timestamp_only_and_stays_out_of_the_canonical_mesh(cfg, observed, head_assets):
    from facecanon_data.stages.track import _canonical

    track_cfg = dataclasses.replace(cfg.track, timestamp_detail=True)
    f = _Fitter(head_assets, observed[0][:2], track_cfg, "cpu")
    canonical, before = _canonical(f, track_cfg).clone(), f.vertices().clone()
    face = torch.as_tensor(head_assets.masks["face"])
    f.detail[1, face, 2] += 0.002  # 2 mm out of the face, timestamp 1 only
    after = f.vertices()
    torch.testing.assert_close(after[0], before[0])
    moved = (after[1] - before[1]).norm(dim=-1)
    assert moved[face].mean() > 0.0015 and moved[~torch.isin(torch.arange(len(moved)), face)].max() < 1e-6
    torch.testing.assert_close(_canonical(f, track_cfg), canonical)


def test_point_gate_anneals_from_generous_to_tight(cfg, observed, head_assets):
    track_cfg = dataclasses.replace(cfg.track, point_gate_start_mm=30.0, point_max_distance_mm=10.0)
    f = _Fitter(head_assets, observed[0][:1], track_cfg, "cpu")
    gates = [f.point_gate_mm(2, step, 100) for step in range(100)]
    assert gates[0] == pytest.approx(30.0) and gates[-1] == pytest.approx(10.0)
    assert all(a >= b for a, b in zip(gates, gates[1:]))
    assert f.point_gate_mm(3, 0, 100) == pytest.approx(10.0)  # the offsets stage starts tight
    # Beyond the tight gate only points nearest the head count: a point 20 mm off the neck does not.
    neck = head_assets.mask("neck")
    with torch.no_grad():
        v = f.vertices()[0].numpy()
    from facecanon_data.synthetic.procedural import vertex_normals

    normals = vertex_normals(v, head_assets.model.faces)
    front_of_neck = neck[np.argmax(v[neck, 2])]  # where a collar stands off the skin
    face = head_assets.mask("face")
    cheek = face[np.argmax(v[face, 0])]
    points = np.stack([v[front_of_neck] + 0.02 * normals[front_of_neck], v[cheek] + 0.02 * normals[cheek]])
    f.points = [torch.as_tensor(points, dtype=torch.float32)]
    f.refresh_correspondences(torch.as_tensor(v[None]), 30.0)
    assert f.corr[0][0].tolist() == [1]  # the point off the cheek is pulled in, the one off the neck is not
    f.refresh_correspondences(torch.as_tensor(v[None]))  # tight: neither
    assert len(f.corr[0][0]) == 0


def test_points_over_the_scalp_pull_only_inward(cfg, observed, head_assets):
    """Hair stands outside the scalp: there a point counts only when it lies inside the surface, while
    a point off the forehead counts; with ``covered_masks = []`` all three count."""
    from facecanon_data.synthetic.procedural import vertex_normals

    f = _Fitter(head_assets, observed[0][:1], cfg.track, "cpu")
    with torch.no_grad():
        v = f.vertices()[0].numpy()
    normals = vertex_normals(v, head_assets.model.faces)
    scalp, face = head_assets.mask("scalp"), head_assets.mask("face")
    # The crown, and the middle of the forehead
    mid = face[np.abs(v[face, 0] - np.median(v[face, 0])) < 0.01]
    top, forehead = scalp[np.argmax(v[scalp, 1])], mid[np.argmax(v[mid, 1])]
    offsets = [(top, 0.003), (top, -0.0015), (forehead, 0.003)]  # m along the outward normal
    points = np.stack([v[i] + d * normals[i] for i, d in offsets])
    for covered, expected_mm in ((["scalp"], [1.5, 3]), ([], [3, 1.5, 3])):
        f.covered_vertices[:] = np.isin(np.arange(len(v)), head_assets.mask("scalp")) if covered else False
        f.points = [torch.as_tensor(points, dtype=torch.float32)]
        f.refresh_correspondences(torch.as_tensor(v[None]))
        assert f.corr[0][0].tolist() == [0, 1, 2]  # all within the gate; the sign decides, not the gate
        res = f.point_residual_mm(torch.as_tensor(v[None]))[0].numpy()
        np.testing.assert_allclose(res, expected_mm, atol=0.2)
    # The statistics follow the fit: the point off the crown is not head (CD-L1 and the excluded share),
    # while the scalp's own figure still shows it.
    f.covered_vertices[:] = np.isin(np.arange(len(v)), head_assets.mask("scalp"))
    errs = f.errors()
    assert errs.cd_l1_mm[0] == pytest.approx((1.5 + 3.0) / 2, abs=0.2)
    assert errs.excluded[0] == pytest.approx(1 / 3)
    assert errs.by_region["scalp"][0] == pytest.approx((3.0 + 1.5) / 2, abs=0.2)


def test_gradients_reach_every_optimized_group(cfg, observed, head_assets):
    obs, _ = observed
    f = _Fitter(head_assets, obs[:3], dataclasses.replace(cfg.track, offset_coarse_basis=8, timestamp_detail=True),
                "cpu")
    f.params.offsets += 1e-4  # off the L2/Laplacian minimum so their gradient is non-zero too
    f.coarse += 1e-4
    f.detail += 1e-4
    groups = f.groups(3)
    for g in groups:
        for t in g["params"]:
            t.requires_grad_(True)
    with torch.no_grad():
        f.refresh_correspondences(f.vertices())
    f.loss(f.vertices(), 3).backward()
    names = {id(getattr(f.params, k)): k for k in ("global_rot", "translation", "shape", "expression", "jaw",
                                                   "neck", "left_eye", "right_eye", "offsets")}
    names[id(f.coarse)], names[id(f.detail)] = "coarse", "detail"
    for g in groups:
        for t in g["params"]:
            assert t.grad is not None and t.grad.abs().sum() > 0, names[id(t)]


@pytest.mark.stage
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
        jaw, shape, expression = z["jaw"][:, 0], z["shape"], z["expression"]
    np.testing.assert_allclose(jaw, gt["params"]["jaw"][:, 0], atol=0.03)  # radians
    # FLAME's whole basis is fitted (the default); the synthetic head's zero columns stay exactly zero.
    assert shape.shape == (300,) and expression.shape == (8, 100)
    m = head_assets.model
    unused_shape = np.linalg.norm(m.shapedirs, axis=(0, 1)) == 0
    unused_expression = np.linalg.norm(m.exprdirs, axis=(0, 1)) == 0
    assert unused_shape.sum() >= 280 and (shape[unused_shape] == 0).all()
    assert unused_expression.sum() >= 80 and (expression[:, unused_expression] == 0).all()
    assert result.cd_l1_mm_median < 0.6
    # By region: the face fits as well as the head overall; every region the masks name is reported.
    assert set(result.cd_l1_mm_by_region) <= {"face", "scalp", "ears", "neck"}
    assert result.cd_l1_mm_by_region["face"] < 0.6
    # expression_bias is the largest |mean over timestamps| of a fitted coefficient; on a head of the
    # model's own space it is no larger than the performance's own (nothing of the identity leaks in).
    assert result.expression_bias == pytest.approx(np.abs(expression.mean(0)).max(), abs=1e-4)
    assert result.expression_bias <= np.abs(gt["params"]["expression"].mean(0)).max() + 0.1
    for name in ("errors.parquet", "errors.png", "overlay.png", "residual.png", "params.npz"):
        assert (tmp_path / "999" / "track" / name).is_file()


def _torso_points(vertices: np.ndarray, neck: np.ndarray, count: int, rng) -> np.ndarray:
    """(count, 3) points on a front-facing torso below the neck (collar to shoulders), meters."""
    y0, xc, zc = vertices[neck, 1].min(), vertices[neck, 0].mean(), vertices[neck, 2].mean()
    y = rng.uniform(y0 - 0.12, y0 + 0.01, count)
    r = np.interp(y, [y0 - 0.12, y0 - 0.04, y0 + 0.01], [0.16, 0.09, 0.06])
    theta = rng.uniform(-np.pi / 2, np.pi / 2, count)
    return np.stack([xc + r * np.sin(theta), y, zc + 0.7 * r * np.cos(theta)], 1)


@pytest.mark.stage
def test_corrupted_timestamp_is_removed_as_outlier_and_torso_points_do_not_count(cfg, observed, head_assets,
                                                                                 tmp_path):
    """Timestamp 5 is corrupted (6 mm noise): the only outlier. Timestamps 1 and 3 also see a torso
    (40 % and 20 % more points, as real captures do): those points snap to the neck or lie far off, are
    excluded from CD-L1 and the outlier rule, and the fraction excluded is reported."""
    obs, gt = observed
    rng = np.random.default_rng(0)
    neck = head_assets.mask("neck")
    bad = obs[5]
    changed = []
    for i, o in enumerate(obs):
        points = o.points
        if o is bad:
            points = points + rng.normal(0, 0.006, points.shape)
        elif i in (1, 3):
            extra = _torso_points(gt["vertices"][i], neck, int(len(points) * (0.4 if i == 1 else 0.2)), rng)
            points = np.concatenate([points, extra])
        changed.append(type(o)(o.sequence, o.frame, points, o.cameras, o.landmarks))
    result = run_track(None, "998", cfg, tmp_path, device="cpu", observations=changed)
    assert list(result.outliers) == [bad.key] and "CD-L1" in result.outliers[bad.key]
    rows = {(r["sequence"], r["frame"]): r for r in result.per_timestamp}
    row = [rows[(o.sequence, o.frame)] for o in obs]
    assert len(rows) == len(obs)
    base = np.median([row[i]["points_excluded_fraction"] for i in range(len(obs)) if i not in (1, 3, 5)])
    for i, torso in ((1, 0.4), (3, 0.2)):  # the torso's share of the points, all of it excluded
        expected = (base + torso) / (1 + torso)
        assert abs(row[i]["points_excluded_fraction"] - expected) < 0.03, (i, row[i], expected)
        assert row[i]["cd_l1_mm"] < 0.6
    assert 0 < result.points_excluded_fraction < 0.5
    assert result.timestamps_kept == 7 and result.outliers_removed == 1


class _GroundTruth:
    """What ``_ground_truth_errors`` reads of a ground truth: faces, per-frame and canonical vertices."""

    def __init__(self, faces, vertices, canonical=None):
        self.faces, self._vertices, self._canonical = faces, vertices, canonical

    def frame(self, sequence, frame):
        return {"vertices": self._vertices[frame]}

    def canonical_vertices(self):
        return self._canonical


def test_vertex_error_only_with_the_model_topology_surface_error_always(observed, head_assets):
    from facecanon_data.stages.track import TrackResult, _ground_truth_errors

    obs, gt = observed
    true = gt["vertices"][:3].astype(np.float32)
    keys = [type(o)("SEQ", i, o.points, o.cameras, o.landmarks) for i, o in enumerate(obs[:3])]
    tracked = true + np.array([0, 0, 0.001], np.float32)  # every vertex 1 mm off along z

    rest = head_assets.model.v_template.astype(np.float32)

    def errors(faces, vertices, canonical=None):
        r = TrackResult("s", 3, 3, 0, 0.0, 0.0, 0.0, 0.0, "cpu")
        _ground_truth_errors(r, _GroundTruth(faces, vertices, rest), head_assets, keys, tracked, canonical)
        return r

    faces = head_assets.model.faces
    same = errors(faces, true)
    assert abs(same.gt_vertex_error_mm_mean - 1.0) < 1e-3
    assert 0.05 < same.gt_surface_error_mm_mean <= 1.0 + 1e-3  # a shift partly along the surface
    assert same.gt_canonical_vertex_error_mm_mean is None  # no canonical mesh given
    # A canonical head 2 mm forward of the true one: the posed error cannot show it, this figure does.
    shifted = errors(faces, true, rest + np.array([0, 0, 0.002], np.float32))
    assert abs(shifted.gt_canonical_vertex_error_mm_mean - 2.0) < 1e-3
    # The same surface with its vertices numbered otherwise (another mesh): vertex ids no longer name
    # the same points, so the vertex error is absent; the distance to the surface is unchanged.
    perm = np.random.default_rng(0).permutation(true.shape[1])
    other = errors(np.argsort(perm)[faces], true[:, perm])
    assert other.gt_vertex_error_mm_mean is None
    assert errors(np.argsort(perm)[faces], true[:, perm], rest).gt_canonical_vertex_error_mm_mean is None
    assert abs(other.gt_surface_error_mm_mean - same.gt_surface_error_mm_mean) < 1e-3
