"""Properties of the FLAME forward model on the synthetic head (FLAME's exact layout)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from facecanon_data.flame.lbs import FlameLayer, FlameParams, axis_angle_to_matrix


def _zeros(model, t=1):
    return FlameParams.zeros(t, model.num_shape, model.num_expression)


def test_zero_parameters_give_template(head_assets):
    model = head_assets.model
    verts = FlameLayer(model)(_zeros(model, 3))
    assert verts.shape == (3, model.num_vertices, 3)
    np.testing.assert_allclose(verts.numpy(), np.broadcast_to(model.v_template, verts.shape), atol=1e-6)


def test_jaw_moves_only_jaw_skinned_vertices(head_assets):
    model = head_assets.model
    no_correctives = dataclasses.replace(model, posedirs=np.zeros_like(model.posedirs))
    p = _zeros(model)
    p.jaw = torch.tensor([[0.3, 0.0, 0.0]])
    moved = (FlameLayer(no_correctives)(p)[0].numpy() - model.v_template)
    moved = np.linalg.norm(moved, axis=1) > 1e-7
    jaw_skinned = model.lbs_weights[:, 2] > 0
    assert moved.sum() > 100
    assert not (moved & ~jaw_skinned).any()
    # The lower lip opens: it moves down by centimetres at 0.3 rad.
    lower_lip = 14
    assert FlameLayer(no_correctives)(p)[0, lower_lip, 1] < model.v_template[lower_lip, 1] - 0.01
    # With pose correctives, only their support is added to the moved set.
    with_corr = np.linalg.norm(FlameLayer(model)(p)[0].numpy() - model.v_template, axis=1) > 1e-7
    support = np.abs(model.posedirs).reshape(36, -1, 3).sum((0, 2)) > 0
    assert not (with_corr & ~(jaw_skinned | support)).any()


def test_global_rotation_is_rigid(head_assets):
    model = head_assets.model
    p = _zeros(model)
    p.global_rot = torch.tensor([[0.2, -0.5, 0.1]])
    p.translation = torch.tensor([[0.01, 0.02, -0.03]])
    v = FlameLayer(model)(p)[0].numpy().astype(np.float64)
    t = model.v_template.astype(np.float64)
    i, j = np.random.default_rng(0).integers(0, len(t), size=(2, 500))
    np.testing.assert_allclose(np.linalg.norm(v[i] - v[j], axis=1), np.linalg.norm(t[i] - t[j], axis=1), atol=1e-5)


def test_batch_matches_single_and_offsets_before_skinning(head_assets):
    model = head_assets.model
    layer = FlameLayer(model)
    rng = np.random.default_rng(1)
    p = _zeros(model, 2)
    p.expression[:, :5] = torch.as_tensor(rng.normal(size=(2, 5)), dtype=torch.float32)
    p.neck = torch.as_tensor(rng.normal(0, 0.2, size=(2, 3)), dtype=torch.float32)
    p.offsets = torch.zeros(model.num_vertices, 3)
    p.offsets[:, 2] = 0.001
    both = layer(p)
    for k in range(2):
        single = dataclasses.replace(p, expression=p.expression[k:k + 1], global_rot=p.global_rot[k:k + 1],
                                     neck=p.neck[k:k + 1], jaw=p.jaw[k:k + 1], left_eye=p.left_eye[k:k + 1],
                                     right_eye=p.right_eye[k:k + 1], translation=p.translation[k:k + 1])
        torch.testing.assert_close(layer(single)[0], both[k])
    # Offsets are added before skinning: with the head turned 90 degrees about y, a +z offset on
    # vertices that no joint is regressed from becomes +x.
    free = np.abs(model.J_regressor).sum(0) == 0
    q = _zeros(model)
    q.global_rot = torch.tensor([[0.0, np.pi / 2, 0.0]])
    base = layer(q)
    q.offsets = torch.zeros(model.num_vertices, 3)
    q.offsets[torch.as_tensor(free), 2] = 0.001
    delta = (layer(q) - base)[0].numpy()
    head = (model.lbs_weights[:, 1] > 0.999) & free
    np.testing.assert_allclose(delta[head], np.broadcast_to([0.001, 0, 0], delta[head].shape), atol=1e-5)


def test_rodrigues_matches_closed_form():
    r = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, np.pi / 2], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(r[0], torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(r[1], torch.eye(3))
