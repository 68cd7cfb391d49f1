"""synth -> NeRSembleSource round trip, ground-truth consistency, FaceMesh on the frontal camera."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facecanon_data.cameras import FRONTAL_SERIAL, NERSEMBLE_SERIALS
from facecanon_data.sources import CaptureFileError, NeRSembleSource


@pytest.fixture(scope="module")
def source(synth_capture):
    out = synth_capture["out"]
    return NeRSembleSource(out / "capture", out / "ground_truth")


def test_layout_counts_and_cameras(source, synth_capture):
    cfg = synth_capture["cfg"]
    assert source.subjects() == ["900"]
    assert source.sequences("900") == ["EXP-1-head", "EXP-2-eyes"]
    assert set(source.serials("900")) == set(NERSEMBLE_SERIALS) and len(source.serials("900")) == 16
    assert source.num_frames("900", "EXP-1-head") == 8
    cams = source.cameras("900", downscale=cfg.capture.downscale)
    front = cams[FRONTAL_SERIAL]
    assert (front.width, front.height) == (416, 608) and front.width >= 400
    assert front.K[0, 0] == pytest.approx(cfg.synth.focal / 2)
    # The frontal camera looks straight at the face: its centre is on the +z axis.
    c = front.center
    assert abs(c[0]) < 1e-6 and c[2] > 0.9
    # Cameras are about 1 m from the head.
    dists = [np.linalg.norm(cam.center) for cam in cams.values()]
    assert 0.9 < min(dists) and max(dists) < 1.2
    assert not list((synth_capture["out"] / "capture").glob(".*partial*"))


def test_sequential_and_timestamp_reads_agree(source):
    seq = "EXP-2-eyes"
    by_camera = dict(source.frames("900", seq, FRONTAL_SERIAL, indices=[1, 5, 6], downscale=2))
    assert sorted(by_camera) == [1, 5, 6]
    ts = source.timestamp("900", seq, 5, downscale=2)
    assert set(ts) == set(source.serials("900"))
    np.testing.assert_array_equal(ts[FRONTAL_SERIAL], by_camera[5])
    assert ts[FRONTAL_SERIAL].shape == (608, 416, 3) and ts[FRONTAL_SERIAL].dtype == np.uint8


def test_ground_truth_mesh_projects_into_masks_and_onto_depth(source):
    gt = source.ground_truth("900")
    assert gt is not None
    cams = source.cameras("900", downscale=2)
    boundary = np.zeros(len(gt.canonical_vertices()), bool)
    edges = np.sort(gt.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    unique, count = np.unique(edges, axis=0, return_counts=True)
    boundary[unique[count == 1].ravel()] = True  # an edge of one triangle only
    assert 0 < boundary.sum() < 0.05 * len(boundary)
    checked = 0
    for serial in (FRONTAL_SERIAL, "222200042", "221501007"):
        frame = gt.frame("EXP-1-head", 3)
        maps = gt.view_maps("EXP-1-head", 3, serial, downscale=2)
        cam = cams[serial]
        uv, z = cam.project(frame["vertices"].astype(np.float64))
        px = np.floor(uv + 0.5).astype(int)
        inside = (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height)
        assert inside.all()
        in_mask = maps["foreground"][px[:, 1], px[:, 0]]
        assert in_mask.mean() > 0.97
        # The rest sit on the silhouette: in the 8-neighbourhood of the subject.
        import scipy.ndimage as ndi

        near = ndi.binary_dilation(maps["foreground"], structure=np.ones((3, 3)))[px[:, 1], px[:, 0]]
        assert near.all()
        # Hair, torso and teeth may hide head-model vertices, never stand behind them.
        depth = np.where(maps["foreground"], maps["depth"], np.inf)
        d = depth[px[:, 1], px[:, 0]]
        # Away from depth discontinuities (3x3 depth range < 5 mm), no vertex lies in front of the
        # rendered surface, and the visible ones lie on it; the tolerance is the sampling error of a
        # half-pixel offset, bounded by the local depth range, plus 0.5 mm. Vertices on the mesh's own
        # boundary (the lips' edge at the mouth cut) are silhouettes in every view, whose pixel may
        # look past them into the cavity, so they are left out.
        with np.errstate(invalid="ignore"):
            local = (ndi.maximum_filter(depth, 3) - ndi.minimum_filter(depth, 3))[px[:, 1], px[:, 0]]
        smooth = (local < 0.005) & ~boundary
        tol = 0.0005 + local[smooth]
        assert smooth.mean() > 0.75
        assert (d[smooth] <= z[smooth] + tol).all()
        assert (np.abs(d[smooth] - z[smooth]) < tol).mean() > 0.1  # a side view sees ~15 %
        checked += 1
    assert checked == 3


def test_layout_mirrors_nersemble_v2_plates_not_mattes(source, synth_capture):
    """No alpha_maps/ by default; one BACKGROUND still per camera, read at the frames' size and not
    listed as a performance sequence."""
    subject = synth_capture["out"] / "capture" / "900"
    assert not list(subject.glob("sequences/*/alpha_maps"))
    stills = sorted(p.name for p in (subject / "sequences" / "BACKGROUND").iterdir())
    assert stills == sorted(f"image_{s}.jpg" for s in NERSEMBLE_SERIALS)
    assert "BACKGROUND" not in source.sequences("900")
    plates = source.background_plates("900", downscale=2)
    assert set(plates) == set(NERSEMBLE_SERIALS) and plates[FRONTAL_SERIAL].shape == (608, 416, 3)
    assert source.timestamp_masks("900", "EXP-1-head", [0]) is None


def test_foreground_from_plates_matches_ground_truth(source):
    """The reconstruct default on a capture without mattes: IoU >= 0.95 against the ground-truth
    foreground on the frontal camera and on the most oblique ones (both sides, above and below)."""
    from facecanon_data.config import ForegroundConfig
    from facecanon_data.foreground import foreground_from_plate, mask_iou

    gt = source.ground_truth("900")
    plates = source.background_plates("900", downscale=2)
    views = source.timestamp("900", "EXP-1-head", 5, downscale=2)
    for serial in (FRONTAL_SERIAL, "222200042", "222200048", "222200043", "221501007"):
        mask = foreground_from_plate(views[serial], plates[serial], ForegroundConfig())
        truth = gt.view_maps("EXP-1-head", 5, serial, downscale=2)["foreground"]
        assert mask_iou(mask, truth) >= 0.95, serial
    # Deterministic whatever ran before on the thread (GrabCut's k-means draws from OpenCV's RNG).
    import cv2

    cv2.randu(np.zeros((8, 8)), 0, 1)
    again = foreground_from_plate(views[serial], plates[serial], ForegroundConfig())
    np.testing.assert_array_equal(again, mask)


def test_ground_truth_parts_hair_torso_and_canonical(source):
    """The ground truth covers the whole subject: hair 1-4 cm off the scalp and inside the head mask,
    the torso foreground but not head (no canonical), the canonical map within the canonical scene."""
    gt = source.ground_truth("900")
    names = gt.part_names
    assert names == ("head", "hair", "teeth", "tongue", "torso")
    vertices, faces, part, canonical = gt.scene("EXP-2-eyes", 4)
    from facecanon_data.meshes import point_to_mesh_distance

    hair = vertices[part == names.index("hair")]
    off = point_to_mesh_distance(vertices[: len(gt.canonical_vertices())], gt.faces, hair) * 1000
    assert 10 <= off.max() <= 40 and np.median(off) > 3
    lower_view = gt.view_maps("EXP-2-eyes", 4, "222200049", downscale=2)  # a camera of the lower row
    torso = lower_view["part"] == names.index("torso")
    assert torso.sum() > 2000 and not (lower_view["mask"] & torso).any() and lower_view["foreground"][torso].all()
    assert (lower_view["part"] == names.index("hair")).sum() > 500
    maps = gt.view_maps("EXP-2-eyes", 4, FRONTAL_SERIAL, downscale=2)
    canon = maps["canonical"][maps["mask"]]
    head_canonical = canonical[part != names.index("torso")]
    lo, hi = head_canonical.min(0) - 1e-4, head_canonical.max(0) + 1e-4
    assert ((canon >= lo) & (canon <= hi)).all()
    assert np.abs(maps["canonical"][~maps["mask"]]).max() == 0


def test_facemesh_finds_the_face_in_frontal_frames(synth_capture):
    report = synth_capture["report"]
    assert report.facemesh_frames == 16
    assert report.facemesh_detection_rate >= 0.95


def test_synth_json_records_config_and_hash(synth_capture):
    meta = json.loads((synth_capture["out"] / "synth.json").read_text())
    assert meta["config_hash"] == synth_capture["cfg"].hash()
    assert meta["report"]["images_written"] == 2 * 8 * 16
    import cv2

    sheet = cv2.imread(str(synth_capture["out"] / "preview.png"))
    assert sheet.shape[1] == 8 * 160 and sheet.shape[0] > 4 * 200  # 2 sequence rows + 2 camera rows


def test_errors_name_the_file(tmp_path, source, synth_capture):
    with pytest.raises(CaptureFileError, match="capture root not found"):
        NeRSembleSource(tmp_path / "missing")
    bad = tmp_path / "root" / "901" / "calibration"
    bad.mkdir(parents=True)
    (bad / "camera_params.json").write_text("{not json")
    src = NeRSembleSource(tmp_path / "root")
    with pytest.raises(CaptureFileError, match=r"901/calibration/camera_params.json: not valid JSON"):
        src.serials("901")
    with pytest.raises(CaptureFileError, match=r"EXP-9-jaw-2/images/cam_\d+.mp4: video file not found"):
        next(source.frames("900", "EXP-9-jaw-2", FRONTAL_SERIAL))
    with pytest.raises(ValueError, match="3-digit"):
        source.sequences("../900")


# ---------------------------------------------------------------------------------------------
# calibration and video checks at open: every mismatch an error naming the file


def _subject_copy(synth_capture, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(synth_capture["out"] / "capture" / "900", root / "900")
    return root, root / "900" / "calibration" / "camera_params.json"


def _edit_calibration(path, edit):
    params = json.loads(path.read_text())
    edit(params)
    path.write_text(json.dumps(params))


def _nan_translation(p):
    p["world_2_cam"]["222200044"][0][3] = float("nan")


def _reflection(p):
    p["world_2_cam"]["222200044"][0] = [-x for x in p["world_2_cam"]["222200044"][0]]


def _bad_focal(p):
    p["intrinsics"][1][1] = -5.0


def _nan_k(p):
    p["intrinsics"][0][2] = float("nan")


def _no_frontal(p):
    del p["world_2_cam"][FRONTAL_SERIAL]


def _centre_off(p):
    p["intrinsics"][0][2] = 5000.0


def _w2c_as_list(p):
    p["world_2_cam"] = list(p["world_2_cam"].values())


@pytest.mark.parametrize("edit, message", [
    (_nan_translation, "world_2_cam of camera 222200044 is not finite"),
    (_reflection, "world_2_cam of camera 222200044 is a reflection"),
    (_bad_focal, "intrinsics must be finite with positive focal lengths"),
    (_nan_k, "intrinsics must be finite with positive focal lengths"),
    (_no_frontal, f"no calibration for camera\\(s\\) {FRONTAL_SERIAL} whose videos are in"),
    (_centre_off, "principal point \\(5000, .*\\) is far from the centre of the 832x1216 frames"),
    (_w2c_as_list, "expected 'world_2_cam' as an object \\{serial: 4x4 matrix\\}"),
])
def test_bad_calibrations_are_refused_naming_the_file(synth_capture, tmp_path, edit, message):
    root, calib = _subject_copy(synth_capture, tmp_path)
    _edit_calibration(calib, edit)
    with pytest.raises(CaptureFileError, match=f"900/calibration/camera_params.json: .*{message}"):
        NeRSembleSource(root).cameras("900")


def _rewrite_video(path, frames: int, size: tuple[int, int]):
    from facecanon_data.sources.video import VideoWriter

    writer = VideoWriter(path, size[0], size[1], 25.0)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 40 + i, np.uint8))
    writer.close()


def test_cameras_disagreeing_in_size_or_frame_count_are_named(synth_capture, tmp_path):
    root, _ = _subject_copy(synth_capture, tmp_path)
    video = root / "900" / "sequences" / "EXP-2-eyes" / "images" / "cam_222200046.mp4"
    _rewrite_video(video, 8, (416, 608))
    src = NeRSembleSource(root)
    with pytest.raises(CaptureFileError, match=r"cam_222200046.mp4: 416x608 frames, but cam_\d+.mp4 and 14 other "
                                               r"camera\(s\) have 832x1216"):
        src.num_frames("900", "EXP-2-eyes")
    assert src.num_frames("900", "EXP-1-head") == 8  # the other sequence is unaffected
    _rewrite_video(video, 5, (832, 1216))
    src = NeRSembleSource(root)
    with pytest.raises(CaptureFileError, match=r"cam_222200046.mp4: 5 frames, but cam_\d+.mp4 and 14 other "
                                               r"camera\(s\) have 8"):
        next(src.timestamps("900", "EXP-2-eyes", [6]))
    _rewrite_video(video, 8, (832, 1216))
    first = root / "900" / "sequences" / "EXP-2-eyes" / "images" / f"cam_{src.serials('900')[0]}.mp4"
    _rewrite_video(first, 8, (416, 608))  # the first camera read is the odd one: it is named, not K
    src = NeRSembleSource(root)
    with pytest.raises(CaptureFileError, match=rf"{first.name}: 416x608 frames, but cam_\d+.mp4 and 14 other"):
        src.num_frames("900", "EXP-2-eyes")


def _truncate_frontal(root):
    video = root / "900" / "sequences" / "EXP-2-eyes" / "images" / f"cam_{FRONTAL_SERIAL}.mp4"
    video.write_bytes(video.read_bytes()[:2000])
    return f"EXP-2-eyes/images/cam_{FRONTAL_SERIAL}.mp4: "


def _remove_video(root):  # from every sequence: no timestamp has all views (one sequence: see below)
    for seq in ("EXP-1-head", "EXP-2-eyes"):
        (root / "900" / "sequences" / seq / "images" / "cam_222200042.mp4").unlink()
    return "EXP-1-head/images/cam_222200042.mp4: video file not found, and every sequence of subject 900 lacks"


def _malformed_calibration(root):
    (root / "900" / "calibration" / "camera_params.json").write_text('{"world_2_cam": ')
    return "900/calibration/camera_params.json: not valid JSON"


@pytest.mark.parametrize("damage", [_truncate_frontal, _remove_video, _malformed_calibration])
def test_every_stage_command_exits_2_naming_the_damaged_file(synth_capture, tmp_path, damage):
    """The path a user takes: each stage subcommand of the chain on a damaged capture."""
    from typer.testing import CliRunner

    from facecanon_data.cli import app
    from facecanon_data.stages.chain import CHAIN

    root, _ = _subject_copy(synth_capture, tmp_path)
    message = damage(root)
    runner = CliRunner()
    for stage in CHAIN:
        args = [stage.name, "--root", str(root), "--work", str(tmp_path / "w")]
        args += ["--out", str(tmp_path / "store")] if stage.needs_store else []
        r = runner.invoke(app, args)
        output = r.output + (r.stderr if r.stderr_bytes is not None else "")
        assert r.exit_code == 2, (stage.name, output[-1500:], r.exception)
        assert message in output and "Traceback" not in output, (stage.name, output[-1500:])
    assert not (tmp_path / "w").exists() and not (tmp_path / "store").exists()


def test_stage_commands_exit_2_naming_the_calibration(synth_capture, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "facecanon-data"
    root, calib = _subject_copy(synth_capture, tmp_path)
    _edit_calibration(calib, _reflection)
    r = subprocess.run([str(exe), "reconstruct", "--timestamps", "EXP-1-head:0", "--root", str(root), "--work",
                        str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    assert "camera_params.json: world_2_cam of camera 222200044 is a reflection" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_downscaled_release_with_full_size_intrinsics_is_refused(synth_capture, tmp_path):
    """Videos at half size under a calibration made for the full size: K would be scaled wrong."""
    root, _ = _subject_copy(synth_capture, tmp_path)
    for video in (root / "900" / "sequences" / "EXP-1-head" / "images").glob("cam_*.mp4"):
        _rewrite_video(video, 8, (416, 608))
    with pytest.raises(CaptureFileError, match=r"camera_params.json: principal point \(416, 608\) is far from the "
                                               r"centre of the 416x608 frames .* were the videos resized\?"):
        NeRSembleSource(root).cameras("900", "EXP-1-head")


def test_real_size_capture_is_colour_corrected_after_the_resize(synth_capture, tmp_path, monkeypatch):
    """A capture shaped like the real release (2200x3208 frames, a colour calibration): every reader
    corrects the frames at the size asked for, never the full-size frame, and the table path (a camera
    read over many frames) and the arithmetic path (a few timestamps) give the same pixels."""
    import cv2

    from facecanon_data.sources import color
    from facecanon_data.synthetic.real_size import REAL_SIZE, write_real_size_frontal_capture

    synthetic = NeRSembleSource(synth_capture["out"] / "capture")
    root = write_real_size_frontal_capture(synthetic, "900", FRONTAL_SERIAL, tmp_path / "real", frames_per_sequence=12)
    real = NeRSembleSource(root)
    assert real.image_size("900") == REAL_SIZE and real.num_frames("900", "EXP-1-head") == 12
    assert real.serials("900") == [FRONTAL_SERIAL]
    ccm = np.asarray(json.loads((root / "900" / "calibration" / "color_calibration.json").read_text())[FRONTAL_SERIAL])
    arithmetic = color.apply_color_correction
    seen = []
    monkeypatch.setattr(color, "apply_color_correction",
                        lambda image, ccm: seen.append(image.shape) or arithmetic(image, ccm))
    [(_, few)] = real.frames("900", "EXP-1-head", FRONTAL_SERIAL, [3], downscale=4)
    assert seen == [(802, 550, 3)] and few.shape == (802, 550, 3)  # corrected at quarter size, arithmetically
    seen.clear()
    monkeypatch.setattr(color.ColorTable, "BUILD_EQUIVALENT_FRAMES", 1)  # 12 frames now take the table
    many = dict(real.frames("900", "EXP-1-head", FRONTAL_SERIAL, None, downscale=4))
    assert len(seen) == 256  # the table's build (one call per blue level), no per-frame correction
    assert np.array_equal(many[3], few)
    [(_, plain)] = NeRSembleSource(root, color_correction=False).frames("900", "EXP-1-head", FRONTAL_SERIAL, [3],
                                                                        downscale=4)
    assert np.array_equal(few, arithmetic(plain, ccm)) and np.abs(few.astype(int) - plain).mean() > 2
    # Correcting after the resize is within rounding of correcting the full-size frame first.
    [(_, full)] = NeRSembleSource(root, color_correction=False).frames("900", "EXP-1-head", FRONTAL_SERIAL, [3])
    before = cv2.resize(arithmetic(full, ccm), (550, 802), interpolation=cv2.INTER_AREA)
    diff = np.abs(before.astype(int) - few)
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 2


def test_a_sequence_missing_a_camera_is_skipped_with_its_reason(synth_capture, tmp_path):
    """Real releases miss a camera in a sequence now and then: `select` lists the cameras present, skips
    that sequence with the reason recorded, and selects from the others; asking `reconstruct` for one of
    its timestamps fails naming the missing video."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "facecanon-data"
    root, _ = _subject_copy(synth_capture, tmp_path)
    (root / "900" / "sequences" / "EXP-2-eyes" / "images" / "cam_222200042.mp4").unlink()
    src = NeRSembleSource(root)
    assert src.missing_cameras("900", "EXP-2-eyes") == ["222200042"] and src.missing_cameras("900", "EXP-1-head") == []
    src.check_subject("900")  # one complete sequence is enough
    r = subprocess.run([str(exe), "select", "--root", str(root), "--work", str(tmp_path / "w"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["skipped_sequences"] == {"EXP-2-eyes": "no video for camera(s) 222200042 "
                                                          "(cam_222200042.mp4 missing)"}
    assert figures["frames_processed"] == 8
    import pyarrow.parquet as pq

    selection = pq.read_table(tmp_path / "w" / "900" / "select" / "selection.parquet").to_pydict()
    assert set(selection["sequence"]) == {"EXP-1-head"} and len(selection["sequence"]) >= 3
    marker = json.loads((tmp_path / "w" / "900" / "select" / "_DONE.json").read_text())
    assert marker["figures"]["skipped_sequences"] == figures["skipped_sequences"]
    r = subprocess.run([str(exe), "reconstruct", "--timestamps", "EXP-2-eyes:3", "--root", str(root), "--work",
                        str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "EXP-2-eyes/images/cam_222200042.mp4: video file not found" in r.stderr, r.stderr


def test_alpha_maps_option_writes_mattes_that_reconstruct_prefers(tmp_path):
    """`synth --alpha-maps`: mattes equal to the ground-truth foreground, used instead of the plates."""
    import subprocess
    import sys
    from pathlib import Path

    from facecanon_data.config import load_pipeline
    from facecanon_data.paths import default_pipeline
    from facecanon_data.stages.reconstruct import ForegroundMasks

    exe = Path(sys.executable).parent / "facecanon-data"
    r = subprocess.run([str(exe), "synth", "--out", str(tmp_path), "--frames", "2", "--sequences", "1",
                        "--no-verify", "--alpha-maps"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    source = NeRSembleSource(tmp_path / "capture", tmp_path / "ground_truth")
    alpha = dict(source.masks("900", "EXP-1-head", FRONTAL_SERIAL, [1], downscale=2))[1] > 0.5
    truth = source.ground_truth("900").view_maps("EXP-1-head", 1, FRONTAL_SERIAL, downscale=2)["foreground"]
    assert (alpha == truth).mean() > 0.99
    cfg = load_pipeline(default_pipeline())
    kind, masks = ForegroundMasks(source, "900", cfg.reconstruct, 2).of("EXP-1-head", [1])[1]
    assert kind == "mattes" and set(masks) == set(NERSEMBLE_SERIALS)


def test_ground_truth_sequence_with_an_array_not_per_frame_is_named(tmp_path):
    from facecanon_data.errors import InputError
    from facecanon_data.sources.ground_truth import SyntheticGroundTruth

    np.savez(tmp_path / "subject.npz", faces=np.zeros((2, 3), np.int64))
    vertices = np.zeros((4, 5, 3), np.float32)
    np.savez(tmp_path / "EXP-1-head.npz", vertices=vertices, expression=np.zeros((4, 10)))
    gt = SyntheticGroundTruth(tmp_path, cameras={})
    assert gt.frame("EXP-1-head", 3)["expression"].shape == (10,)
    np.savez(tmp_path / "EXP-2-eyes.npz", vertices=vertices, expression=np.zeros((4, 10)), faces=np.zeros((7, 3)))
    with pytest.raises(InputError, match=r"EXP-2-eyes\.npz: array 'faces' of shape \(7, 3\) is not per frame"):
        gt.frame("EXP-2-eyes", 0)


# ---------------------------------------------------------------------------------------------
# files a hostile or unlucky user hands over: one line naming the file, before any stage runs


def _nested(path):
    path.write_text("[" * 200_000 + "]" * 200_000)
    return "not a calibration \\(JSON nested too deeply"


def _oversized(path):
    with open(path, "r+b") as f:  # sparse: 300 MB on paper, nothing on disk
        f.truncate(300 * 2**20)
    return "314572800 bytes, larger than any calibration"


@pytest.mark.parametrize("damage", [_nested, _oversized])
def test_hostile_calibration_files_are_refused_naming_them(synth_capture, tmp_path, damage):
    root, calib = _subject_copy(synth_capture, tmp_path)
    message = damage(calib)
    with pytest.raises(CaptureFileError, match=f"900/calibration/camera_params.json: {message}"):
        NeRSembleSource(root).check_subject("900")


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "expected a JSON object at the top level, got a list"),
    ('{"222200037": [["a", "b"], ["c", "d"], ["e", "f"]]}', "CCM of camera 222200037 is not a matrix of numbers"),
    ('{"222200037": [[NaN, 0, 0], [0, 1, 0], [0, 0, 1]]}', "CCM of camera 222200037 holds NaN or inf"),
])
def test_a_malformed_colour_calibration_is_named_before_any_frame_is_read(synth_capture, tmp_path, content, message):
    root, calib = _subject_copy(synth_capture, tmp_path)
    (calib.parent / "color_calibration.json").write_text(content)
    with pytest.raises(CaptureFileError, match=f"900/calibration/color_calibration.json: {message}"):
        NeRSembleSource(root).check_subject("900")


def test_one_missing_background_plate_fails_naming_it(synth_capture, tmp_path):
    root, _ = _subject_copy(synth_capture, tmp_path)
    plate = root / "900" / "sequences" / "BACKGROUND" / "image_222200044.jpg"
    plate.unlink()
    src = NeRSembleSource(root)
    with pytest.raises(CaptureFileError, match=r"BACKGROUND/image_222200044.jpg: background plate missing \(1 of 16"):
        src.check_subject("900")
    with pytest.raises(CaptureFileError, match="image_222200044.jpg: background plate missing"):
        src.background_plates("900", 2)
    for p in plate.parent.glob("image_*.jpg"):  # none at all: no plates, no error (mattes or nothing)
        p.unlink()
    NeRSembleSource(root).check_subject("900")
    assert NeRSembleSource(root).background_plates("900", 2) is None
