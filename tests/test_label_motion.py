"""Label correspondence error against the true motion: a plane that moves a known distance, labels that
are exact (the EPE stays at the pixel-centre floor) and labels moved by a known amount (it grows by it)."""
from __future__ import annotations

import numpy as np
import pytest

from facecanon_data.cameras import Camera
from facecanon_data.label_motion import ViewLabels, ViewTruth, pair_errors, summarize
from facecanon_data.meshes import barycentric_interpolate, cast_camera_rays, raycasting_scene

H, W, F = 60, 80, 100.0  # pixels, focal length in pixels; the plane at 1 m: 1 px = 1 cm
NAMES = ("face", "hair")


def _plane(offset_x: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1.2 x 1.0 m grid at z = 1 m shifted by ``offset_x``: vertices (V, 3), faces, canonical (V, 3)."""
    ys, xs = np.mgrid[-0.5:0.5:21j, -0.6:0.6:25j]
    canonical = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], 1)
    vertices = canonical + [offset_x, 0.0, 1.0]
    idx = np.arange(xs.size).reshape(xs.shape)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
    return vertices, faces, canonical


def _view(offset_x: float, camera: Camera) -> tuple[ViewTruth, np.ndarray, np.ndarray]:
    vertices, faces, canonical = _plane(offset_x)
    depth, triangle, bary = cast_camera_rays(raycasting_scene(vertices, faces), camera)
    head = triangle >= 0
    canon = np.zeros((H, W, 3), np.float32)
    canon[head] = barycentric_interpolate(canonical.astype(np.float32), faces, triangle[head], bary[head])
    region = np.where(head, np.where(np.arange(W)[None, :] < W // 2, 0, 1), -1).astype(np.int8)
    return ViewTruth(canon, head, triangle, bary, depth, region), vertices, faces


@pytest.fixture(scope="module")
def scene():
    camera = Camera("cam", np.array([[F, 0, (W - 1) / 2], [0, F, (H - 1) / 2], [0, 0, 1.0]]), np.eye(4), W, H)
    truth_a, _, _ = _view(0.0, camera)
    truth_b, vertices_b, faces = _view(0.0437, camera)  # the skin moves 4.37 px to the right
    return camera, truth_a, truth_b, vertices_b, faces


def _labels(truth: ViewTruth, shift_px: int = 0) -> ViewLabels:
    interior = np.zeros((H, W), bool)
    interior[8:-8, 12:-12] = True  # labels away from the border, so a moved label stays in the image
    canonical = np.roll(truth.canonical, shift_px, axis=1)
    return ViewLabels(canonical, interior & truth.head, np.ones((H, W), bool))


def _epe(scene, shift_px: int) -> dict:
    camera, truth_a, truth_b, vertices_b, faces = scene
    errors = pair_errors(_labels(truth_a), _labels(truth_b, shift_px), truth_a, truth_b, vertices_b, faces, camera,
                         radius_m=0.02, max_queries=5000, rng=np.random.default_rng(0))
    return summarize([errors], NAMES, 504 / W)


def test_exact_labels_sit_on_the_floor_and_moved_labels_add_their_move(scene):
    exact = _epe(scene, 0)["head"]
    # matching to pixel centres alone: the true position is 0.37 px from a centre (a 4.37 px motion)
    assert exact["floor_epe_px"] == pytest.approx(0.37, abs=0.02)
    assert exact["label_epe_px"] == pytest.approx(exact["floor_epe_px"], abs=0.02)
    assert exact["label_cce_px"] < 0.05
    assert exact["label_error_mm"] == pytest.approx(3.7, abs=0.3)  # the 0.37 px to the centre, 1 cm per pixel
    assert exact["accepted_fraction"] > 0.9 and exact["queries"] > 1000  # B's labels end 4 px short of A's
    # labels of B drawn k px to the right of where they belong: the match moves k px from the pixel centre
    # 0.37 px left of the truth, so the EPE is |k - 0.37|
    for k in (3, -3, 6):
        assert _epe(scene, k)["head"]["label_epe_px"] == pytest.approx(abs(k - 0.37), abs=0.05), k
    moved = _epe(scene, 3)["head"]
    assert moved["floor_epe_px"] == exact["floor_epe_px"]  # the floor never reads the labels
    assert moved["label_epe_px_504"] == pytest.approx(moved["label_epe_px"] * 504 / W, rel=1e-3)
    assert moved["label_error_mm"] > 25  # 3 px at 1 cm per pixel
    by_region = _epe(scene, 3)
    assert set(by_region) == {"face", "hair", "head"}
    assert by_region["face"]["queries"] + by_region["hair"]["queries"] == by_region["head"]["queries"]


def test_occluded_or_outside_points_are_not_queried(scene):
    camera, truth_a, truth_b, vertices_b, faces = scene
    far = vertices_b + [0.5, 0.0, 0.0]  # half a metre to the right: most of A's points leave B's image
    errors = pair_errors(_labels(truth_a), _labels(truth_b), truth_a, truth_b, far, faces, camera,
                         radius_m=0.02, max_queries=5000, rng=np.random.default_rng(0))
    near = pair_errors(_labels(truth_a), _labels(truth_b), truth_a, truth_b, vertices_b, faces, camera,
                       radius_m=0.02, max_queries=5000, rng=np.random.default_rng(0))
    assert 0 < len(errors["label_epe_px"]) < 0.5 * len(near["label_epe_px"])


def test_error_sources_match_the_same_pairs_with_labels_exact_up_to_a_stage(scene):
    """Frames 0 and 2 of a sequence: the stored labels moved 3 px, one oracle exact, the other moved 1 px.
    Each source reads its own EPE on the same query pixels; the floor and the stored labels' figures are
    those of the plain measurement."""
    from types import SimpleNamespace

    from facecanon_data.label_motion import ERROR_SOURCES, LabelMotion

    camera, truth_a, truth_b, vertices_b, faces = scene
    rc = SimpleNamespace(label_margins=[2], label_margins_average=[], label_max_pairs=8, label_max_queries=5000,
                         label_match_mm=20.0, label_cross_view_cameras=0)
    motion = LabelMotion(rc, ["S/000000", "S/000002"], "cam")
    assert motion.cameras_wanted({"cam": camera}) == {"cam"}
    for frame, truth, shift in ((0, truth_a, 0), (2, truth_b, 3)):
        oracles = {"true_at_labelled_pixels": _labels(truth), "true_of_reconstructed_points": _labels(truth, shift // 3)}
        motion.keep("S", frame, "cam", camera, _labels(truth, shift), truth, oracles)
        motion.measure("S", frame, vertices_b, faces)
    figures = motion.figures(NAMES, 1.0)
    sources = figures["error_sources"]["2"]
    assert list(sources) == [name for name, _ in ERROR_SOURCES]
    head = {name: sources[name]["head"] for name in sources}
    assert head["floor"] == figures["margins"]["2"]["head"]["floor_epe_px_504"]
    assert head["stored_labels"] == figures["margins"]["2"]["head"]["label_epe_px_504"]
    assert head["true_at_labelled_pixels"] == pytest.approx(0.37, abs=0.03)  # exact labels: the floor
    assert head["true_of_reconstructed_points"] == pytest.approx(0.63, abs=0.05)  # 1 px off: |1 - 0.37|
    assert head["stored_labels"] == pytest.approx(2.63, abs=0.05)  # 3 px off
    assert motion.views == {}  # every pair measured: nothing kept
