"""The synthetic head: FLAME layout, rig sanity, and expressions that visibly change the face."""
from __future__ import annotations

import numpy as np

from facecanon_data import facemesh_topology as fmt
from facecanon_data.flame.lbs import FlameLayer, FlameParams
from facecanon_data.flame.synthetic_head import EXPRESSION_NAMES, IDENTITY_NAMES


def _expr(model, name, amount=1.0):
    p = FlameParams.zeros(1, model.num_shape, model.num_expression)
    p.expression[0, EXPRESSION_NAMES.index(name)] = amount
    return FlameLayer(model)(p)[0].numpy()


def test_flame_layout_and_rig(head_assets):
    m = head_assets.model
    assert m.num_shape == 300 and m.num_expression == 100 and m.posedirs.shape[0] == 36
    np.testing.assert_allclose(m.lbs_weights.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(m.J_regressor.sum(1), 1, atol=1e-5)
    assert (m.J_regressor >= 0).all()
    joints = m.J_regressor @ m.v_template
    # Eyes in front of the jaw hinge, the neck below the head, the root below the neck.
    assert joints[3, 2] > joints[2, 2] and joints[4, 2] > joints[2, 2]
    assert joints[0, 1] < joints[1, 1] < joints[2, 1]
    assert joints[3, 0] > 0 > joints[4, 0]  # left eye at +x (FLAME: x to the subject's left)
    # Identity and expression components are non-zero exactly where the model defines them.
    norms = np.linalg.norm(m.shapedirs, axis=(0, 1))
    assert (norms[: len(IDENTITY_NAMES)] > 0).all() and (norms[len(IDENTITY_NAMES):] == 0).all()
    enorms = np.linalg.norm(m.exprdirs, axis=(0, 1))
    assert (enorms[: len(EXPRESSION_NAMES)] > 0).all() and (enorms[len(EXPRESSION_NAMES):] == 0).all()


def test_masks_and_embedding(head_assets):
    m, masks, emb = head_assets.model, head_assets.masks, head_assets.embedding
    from facecanon_data.flame.assets import MASK_NAMES

    assert sorted(masks) == sorted(MASK_NAMES)  # FLAME_masks.pkl's key set, no invented names
    for name in MASK_NAMES:
        assert len(masks[name]) > 0, name
    v = m.v_template
    for side, sign in (("left", 1), ("right", -1)):  # FLAME: x to the subject's left
        assert sign * v[masks[f"{side}_eyeball"], 0].mean() > 0.02 and sign * v[masks[f"{side}_ear"], 0].mean() > 0.05
    assert np.array_equal(head_assets.mask("eyeballs"), np.union1d(masks["left_eyeball"], masks["right_eyeball"]))
    assert np.array_equal(head_assets.mask("ears"), np.union1d(masks["left_ear"], masks["right_ear"]))
    # Landmark embedding: each embedded MediaPipe landmark sits on the mesh vertex of that landmark.
    pts = emb.points(m.v_template, m.faces)
    np.testing.assert_allclose(pts, m.v_template[emb.mediapipe_idx], atol=1e-7)
    assert len(emb.mediapipe_idx) > 100 and 10 not in set(emb.mediapipe_idx)  # no face contour


def test_expressions_change_the_face(head_assets):
    m = head_assets.model
    v0 = m.v_template
    closed = _expr(m, "eye_close_right")
    gap0 = np.linalg.norm(v0[159] - v0[145])
    gap = np.linalg.norm(closed[159] - closed[145])
    assert gap0 > 0.008 and gap < 0.0025  # the right upper lid comes down onto the lower lid
    assert np.linalg.norm(closed[386] - v0[386]) < 1e-4  # the left eye stays open
    smile = _expr(m, "smile")
    assert smile[61, 1] - v0[61, 1] > 0.004 and smile[291, 1] - v0[291, 1] > 0.004
    brow = _expr(m, "brow_raise")
    assert (brow[list(fmt.LEFT_EYEBROW), 1] - v0[list(fmt.LEFT_EYEBROW), 1]).min() > 0.005
    pucker = _expr(m, "pucker")
    assert pucker[0, 2] - v0[0, 2] > 0.005
    mouth = _expr(m, "mouth_open")
    assert v0[14, 1] - mouth[14, 1] > 0.005 and abs(mouth[13, 1] - v0[13, 1]) < 0.002
