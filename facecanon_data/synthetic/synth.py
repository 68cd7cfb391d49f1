"""``facecanon-data synth``: render synthetic subjects in NeRSemble v2's layout, ground truth aside.

Output (``out``):
  ``capture/{pid}/calibration/camera_params.json``, ``capture/{pid}/sequences/{SEQ}/images/cam_{serial}.mp4``
  (+ ``alpha_maps/`` when enabled) — read unchanged by :class:`NeRSembleSource`;
  ``ground_truth/{pid}/subject.npz`` and ``ground_truth/{pid}/{SEQ}.npz`` (see ``ground_truth.py``);
  ``synth.json`` — the configuration, seed and summary; ``preview.png`` — a contact sheet to look at.

Each subject is written into a hidden staging folder and renamed into place when complete (its ground
truth first, its capture folder last), so an interrupted run never leaves a half-written subject that a
reader could mistake for a whole one. A subject folder that already exists is never replaced.
Subject ids are 900, 901, ... (never a real NeRSemble id). Each subject is drawn from its own random
stream, seeded by (seed, subject id): rendering 902 alone gives the same 902 as rendering 900-902.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cameras import Camera
from ..config import PipelineConfig, SynthConfig
from .performance import SEQUENCE_NAMES, random_identity, random_performance
from .rig import nersemble_like_rig
from ..errors import InputError

log = logging.getLogger(__name__)
FIRST_SYNTHETIC_ID = 900


class SynthError(InputError, ValueError):
    """A synthetic subject cannot be rendered where asked (bad id, or its folder already exists)."""


def default_subject_ids(count: int) -> list[str]:
    """The ids ``synth --subjects N`` renders: 900, 901, ..., 900 + N - 1."""
    return [f"{FIRST_SYNTHETIC_ID + i:03d}" for i in range(count)]


def subject_rng(seed: int, subject: str) -> np.random.Generator:
    """The random stream of one subject: depends on (seed, id) only, never on the other subjects."""
    return np.random.default_rng([int(seed), int(subject)])


@dataclass
class SynthReport:
    out: str
    subjects: list[str]
    sequences: list[str]
    frames_per_sequence: int
    cameras: int
    full_resolution: tuple[int, int]
    working_resolution: tuple[int, int]
    images_written: int
    seconds: float
    facemesh_detection_rate: float | None = None
    facemesh_frames: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# render workers (one process per core; each renders whole videos, one writer per file)

_WORKER: dict = {}


def _init_worker(asset_dir: str) -> None:
    from skimage import data

    from ..flame.synthetic_head import model_files
    from .render import SubjectRenderer

    with np.load(model_files(asset_dir).texture) as z:
        texture = {k: z[k] for k in z.files}
    _WORKER["renderer"] = SubjectRenderer(texture, data.astronaut())


def _appearance(path: str):
    """The subject's appearance file, loaded once per worker and subject."""
    from .render import SubjectAppearance

    if _WORKER.get("look_path") != path:
        with np.load(path) as z:
            _WORKER["look"] = SubjectAppearance(**{k: z[k] for k in z.files})
        _WORKER["look_path"] = path
    return _WORKER["look"]


def _render_video(task: dict) -> int:
    """Render one camera of one sequence into its mp4 (and alpha mp4): the subject over the studio
    plate, through the camera's response and sensor noise."""
    from ..sources.video import VideoWriter
    from .studio import expose

    renderer = _WORKER["renderer"]
    cam: Camera = task["camera"]
    look = _appearance(task["appearance_file"])
    plate = np.load(task["plate_file"])
    noise_rng = np.random.default_rng(task["noise_seed"])
    vertices = np.load(task["vertices_file"], mmap_mode="r")
    writers = [VideoWriter(task["video"], cam.width, cam.height, task["fps"])]
    if task["alpha"]:
        writers.append(VideoWriter(task["alpha"], cam.width, cam.height, task["fps"]))
    try:
        for t in range(len(vertices)):
            out = renderer.render(np.asarray(vertices[t]), cam, look, plate)
            writers[0].write(expose(out.rgb, task["response"], noise_rng, task["noise"]))
            if task["alpha"]:
                writers[1].write(np.repeat((out.mask * 255).astype(np.uint8)[..., None], 3, -1))
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.close()
    return len(vertices)


# ---------------------------------------------------------------------------------------------


def synthesize(cfg: PipelineConfig, out: str | Path | None = None, verify: bool = True,
               progress=None, subject_ids: list[str] | None = None) -> SynthReport:
    """Render synthetic subjects into ``out`` (default ``cfg.synth.out``); see module docstring.

    Args:
        subject_ids: which ids to render (3-digit, >= 900); default ``cfg.synth.subjects`` ids from 900.
            None of them may exist yet under ``out/capture`` or ``out/ground_truth``.
    """
    from ..flame.assets import load_assets
    from ..flame.lbs import FlameLayer
    from ..paths import expand

    s: SynthConfig = cfg.synth
    out = Path(out or s.out)
    if s.sequences > len(SEQUENCE_NAMES):
        raise ValueError(f"--sequences at most {len(SEQUENCE_NAMES)} (NeRSemble's performance sequences)")
    work_w, work_h = s.width // cfg.capture.downscale, s.height // cfg.capture.downscale
    if work_w < 400:
        log.warning("working resolution %dx%d is narrower than 400 px", work_w, work_h)
    t0 = time.time()
    assets = load_assets(cfg.flame)
    model = assets.model
    layer = FlameLayer(model)
    cameras = nersemble_like_rig(s.width, s.height, s.focal, s.camera_distance)
    capture_root, gt_root = out / "capture", out / "ground_truth"
    from ..flame.synthetic_head import model_files
    from .studio import build_studio, render_plate

    with np.load(model_files(expand(cfg.flame.synthetic_dir)).texture) as z:
        texture = {k: z[k] for k in z.files}
    capture_root.mkdir(parents=True, exist_ok=True)
    gt_root.mkdir(parents=True, exist_ok=True)
    sequences = list(SEQUENCE_NAMES[: s.sequences])
    subjects = list(subject_ids) if subject_ids is not None else default_subject_ids(s.subjects)
    _check_new_subjects(subjects, capture_root, gt_root)
    workers = s.workers or max(1, min(os.cpu_count() or 1, 16))
    total_videos = len(subjects) * len(sequences) * len(cameras)
    done_videos = 0
    images = 0
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # torch/open3d state in the parent must not leak into workers
    studio = build_studio()
    plate_dir = out / f".plates.{os.getpid()}"  # the empty studio per camera, shared by the subjects
    plate_dir.mkdir(parents=True, exist_ok=True)
    plates = {}
    try:
        for cam in cameras:
            plates[cam.serial] = plate_dir / f"{cam.serial}.npy"
            np.save(plates[cam.serial], render_plate(studio, cam))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(expand(cfg.flame.synthetic_dir)),)) as pool:
            for pid in subjects:
                rng = subject_rng(s.seed, pid)
                stage_cap = capture_root / f".{pid}.partial"
                stage_gt = gt_root / f".{pid}.partial"
                for d in (stage_cap, stage_gt):
                    shutil.rmtree(d, ignore_errors=True)
                    d.mkdir(parents=True)
                tasks = _subject_tasks(pid, rng, s, layer, assets, texture, plates, cameras, sequences,
                                       stage_cap, stage_gt)
                for n in pool.map(_render_video, tasks):
                    images += n
                    done_videos += 1
                    if progress:
                        progress(done_videos, total_videos)
                for f in [*stage_gt.glob(".*.vertices.npy"), stage_gt / ".appearance.npz"]:
                    f.unlink()
                # Ground truth first, capture last: a capture folder is only ever seen complete with its truth.
                # os.rename never replaces a non-empty folder, so a subject that appeared meanwhile is kept.
                for final, stage in ((gt_root / pid, stage_gt), (capture_root / pid, stage_cap)):
                    os.rename(stage, final)
    finally:
        shutil.rmtree(plate_dir, ignore_errors=True)
    report = SynthReport(out=str(out), subjects=subjects, sequences=sequences, frames_per_sequence=s.frames,
                         cameras=len(cameras), full_resolution=(s.width, s.height),
                         working_resolution=(work_w, work_h), images_written=images, seconds=0.0)
    from ..sources import NeRSembleSource

    source = NeRSembleSource(capture_root)
    write_preview(source, subjects[0], out / "preview.png", cfg.capture.frontal_serial)
    if verify:
        rate, n = facemesh_detection_rate(source, subjects, cfg.capture.frontal_serial, cfg.capture.downscale)
        report.facemesh_detection_rate, report.facemesh_frames = rate, n
    report.seconds = round(time.time() - t0, 1)
    (out / "synth.json").write_text(json.dumps({"config": cfg.to_dict(), "config_hash": cfg.hash(),
                                                "report": report.__dict__}, indent=2))
    return report


def _subject_tasks(pid: str, rng: np.random.Generator, s: SynthConfig, layer, assets, texture: dict,
                   plates: dict[str, Path], cameras: list[Camera], sequences: list[str], stage_cap: Path,
                   stage_gt: Path) -> list[dict]:
    """Draw one subject (identity, extras, performances), write its ground truth and BACKGROUND plates
    into the staging folders, and return the render tasks of its videos (one per sequence and camera)."""
    import cv2
    import torch

    from ..flame.lbs import FlameParams
    from ..flame.synthetic_head import EXPRESSION_NAMES
    from .scene import PARTS, assemble_frames, build_subject_extras, expression_detail_weights
    from .studio import camera_response, expose

    model = assets.model
    ident = random_identity(rng, model.v_template, model.num_shape)

    def canonical_of(offsets):
        p = FlameParams.zeros(1, model.num_shape, model.num_expression)
        p.shape, p.offsets = torch.as_tensor(ident.shape), torch.as_tensor(offsets)
        with torch.no_grad():
            return layer.canonical_vertices(p).numpy().astype(np.float32)

    extras = build_subject_extras(rng, model.v_template, canonical_of(ident.offsets), model.faces, assets.masks,
                                  texture["hair_weight"], detail_mm=s.detail_mm)
    offsets = (ident.offsets + extras.detail).astype(np.float32)  # the identity: smooth bumps + detail
    canonical = canonical_of(offsets)
    response = camera_response(rng, len(cameras))
    calib_digest = _write_calibration(stage_cap / "calibration", cameras)
    _write_color_calibration(stage_cap / "calibration", cameras, response)
    still = stage_cap / "sequences" / "BACKGROUND"  # NeRSemble v2's empty-rig stills
    still.mkdir(parents=True)
    for k, cam in enumerate(cameras):
        img = expose(np.load(plates[cam.serial]), response[k], rng, s.sensor_noise)
        cv2.imwrite(str(still / f"image_{cam.serial}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
    scene = None
    tasks = []
    for si, seq in enumerate(sequences):
        perf = random_performance(rng, s.frames, model.num_expression, head_sequence=(si == 0),
                                  max_yaw_deg=s.max_yaw_deg)
        weights = expression_detail_weights(rng, perf.expression, EXPRESSION_NAMES.index("brow_raise"))
        frame_offsets = offsets[None] + np.einsum("tk,kvc->tvc", weights, extras.expression_fields)
        p = FlameParams.from_numpy({**perf.as_dict(), "shape": ident.shape, "offsets": frame_offsets})
        with torch.no_grad():
            verts, transforms = (x.numpy() for x in layer.posed_with_transforms(p))
        scene = assemble_frames(extras, verts, transforms, model.faces, canonical)
        np.savez(stage_gt / f"{seq}.npz", vertices=verts.astype(np.float32), scene_vertices=scene.vertices,
                 detail_weights=weights, **perf.as_dict())
        vfile = stage_gt / f".{seq}.vertices.npy"
        np.save(vfile, scene.vertices)
        seq_dir = stage_cap / "sequences" / seq
        for k, cam in enumerate(cameras):
            tasks.append({"camera": cam, "vertices_file": str(vfile), "fps": s.fps,
                          "appearance_file": str(stage_gt / ".appearance.npz"), "plate_file": str(plates[cam.serial]),
                          "response": response[k], "noise": s.sensor_noise,
                          "noise_seed": [int(s.seed), int(pid), si, k],
                          "video": str(seq_dir / "images" / f"cam_{cam.serial}.mp4"),
                          "alpha": str(seq_dir / "alpha_maps" / f"cam_{cam.serial}.mp4") if s.alpha_maps else ""})
    texture_pos = np.concatenate([model.v_template, canonical[extras.hair_index], extras.rigid_rest]).astype(np.float32)
    np.savez(stage_gt / ".appearance.npz", faces=scene.faces, part=scene.part, texture_pos=texture_pos,
             hair_rgb=extras.hair_rgb, cloth_rgb=extras.cloth_rgb)
    np.savez(stage_gt / "subject.npz", shape=ident.shape, offsets=offsets, canonical_vertices=canonical,
             faces=model.faces, model_digest=np.array(model.digest), calibration_digest=np.array(calib_digest),
             seed=np.array(s.seed), scene_faces=scene.faces, scene_part=scene.part,
             scene_canonical=scene.canonical, part_names=np.array(PARTS), fringe=np.array(extras.fringe))
    return tasks


def _check_new_subjects(subjects: list[str], capture_root: Path, gt_root: Path) -> None:
    """Refuse ids that are not synthetic, listed twice, or whose capture or ground truth already exists."""
    if len(set(subjects)) != len(subjects):
        raise SynthError(f"subject ids listed twice: {subjects}")
    for pid in subjects:
        if not (len(pid) == 3 and pid.isdigit() and int(pid) >= FIRST_SYNTHETIC_ID):
            raise SynthError(f"{pid!r} is not a synthetic subject id (3 digits, {FIRST_SYNTHETIC_ID} or more)")
        for folder in (capture_root / pid, gt_root / pid):
            if folder.exists():
                raise SynthError(f"{folder}: already exists; synth never replaces a subject "
                                 "(remove the folder to render it again, or choose another --out)")


def _write_color_calibration(folder: Path, cameras: list[Camera], response: np.ndarray) -> None:
    """``color_calibration.json`` as NeRSemble v2 ships it: per serial the (3, terms) polynomial
    correction that undoes that camera's simulated response (:func:`studio.response_correction`)."""
    from .studio import response_correction

    table = {cam.serial: np.round(response_correction(response[k]), 8).tolist() for k, cam in enumerate(cameras)}
    (folder / "color_calibration.json").write_text(json.dumps(table))


def _write_calibration(folder: Path, cameras: list[Camera]) -> str:
    """Write camera_params.json; returns its content digest (ground truth records it)."""
    from ..sources.ground_truth import file_digest

    folder.mkdir(parents=True, exist_ok=True)
    params = {"world_2_cam": {c.serial: c.world_2_cam.tolist() for c in cameras},
              "intrinsics": cameras[0].K.tolist()}
    path = folder / "camera_params.json"
    path.write_text(json.dumps(params, indent=1))
    return file_digest(path)


def facemesh_detection_rate(source, subjects: list[str], serial: str, downscale: float) -> tuple[float, int]:
    """Fraction of frontal-camera frames (all sequences) in which FaceMesh finds a face."""
    from ..facemesh import FaceMeshDetector

    found = total = 0
    with FaceMeshDetector(static_image_mode=True) as det:
        for pid in subjects:
            for seq in source.sequences(pid):
                for _, img in source.frames(pid, seq, serial, downscale=downscale):
                    total += 1
                    found += det.detect(img) is not None
    return (found / total if total else 0.0), total


def write_preview(source, subject: str, path: Path, frontal: str, thumb_width: int = 160) -> None:
    """Contact sheet: the frontal camera over time (a row per sequence) and all cameras at frame 0."""
    import cv2

    def thumb(img):
        h = int(round(img.shape[0] * thumb_width / img.shape[1]))
        return cv2.resize(img, (thumb_width, h), interpolation=cv2.INTER_AREA)

    rows = []
    for seq in source.sequences(subject):
        n = source.num_frames(subject, seq)
        picks = sorted(set(np.linspace(0, n - 1, min(n, 8)).round().astype(int)))
        rows.append([thumb(img) for _, img in source.frames(subject, seq, frontal, picks)])
    views = source.timestamp(subject, source.sequences(subject)[0], 0)
    cams = [thumb(views[s]) for s in source.serials(subject)]
    rows += [cams[:8], cams[8:]]
    width = max(len(r) for r in rows)
    blank = np.zeros_like(rows[0][0])
    sheet = np.concatenate([np.concatenate(r + [blank] * (width - len(r)), 1) for r in rows], 0)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
