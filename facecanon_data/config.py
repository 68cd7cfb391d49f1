"""Typed pipeline configuration, loaded from ``pipelines/*.toml``.

Every default lives here, in the dataclasses; a TOML file only overrides. Unknown tables or keys and
wrongly typed values are errors that name the file and the key. Paths may use ``{project}`` for the
repository root; other relative paths are relative to the current directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .cameras import FRONTAL_SERIAL
from .errors import InputError


class ConfigError(InputError, ValueError):
    """A pipeline file is unreadable or has an unknown / mistyped key; names the file and key."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING):
    """A configuration field with its help text (``docs/configuration.md`` is generated from it):
    ``opt(4, "what it does")``, or ``opt(factory=list, help=...)`` for a mutable default."""
    if not help:
        raise TypeError("every configuration field states its help")
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class CaptureConfig:
    """Where the capture is and how images are read."""

    root: str = opt("synth-out/capture", "NeRSemble v2 root ({pid}/calibration, {pid}/sequences)")
    ground_truth: str = opt("", "synthetic ground-truth folder; empty for real captures")
    downscale: int = opt(4, "working resolution = full / downscale (the paper: 4)")
    color_correction: bool = opt(True, "apply color_calibration.json where present")
    frontal_serial: str = opt(
        FRONTAL_SERIAL,
        "the camera select reads and the evaluation pairs frames of (NeRSemble v2: 222200037)")


@dataclass
class FlameConfig:
    """The head model. ``kind = "synthetic"`` generates the project's own head on first use."""

    kind: str = opt("synthetic", "'synthetic' | 'flame'")
    model: str = opt("", "FLAME: generic_model.pkl / flame2023.pkl")
    masks: str = opt("", "FLAME: FLAME_masks.pkl")
    embedding: str = opt("", "FLAME: mediapipe_landmark_embedding.npz")
    synthetic_dir: str = opt("{project}/flame_assets/synthetic", "where the generated synthetic head lives")


@dataclass
class SynthConfig:
    """The embedded synthetic capture (``facecanon-data synth``)."""

    out: str = opt("synth-out", "writes {out}/capture and {out}/ground_truth")
    subjects: int = opt(1, "subjects rendered")
    sequences: int = opt(2, "performance sequences per subject")
    frames: int = opt(30, "frames per sequence")
    seed: int = opt(0, "random seed (identical seeds give identical outputs)")
    width: int = opt(832, "full-resolution image size; the working size is width / capture.downscale")
    height: int = opt(1216, "full-resolution image height in pixels")
    focal: float = opt(2900.0, "pixels at full resolution")
    camera_distance: float = opt(1.05, "meters")
    max_yaw_deg: float = opt(40.0, "the rig's outermost cameras, degrees left and right of frontal")
    fps: float = opt(25.0, "frame rate of the rendered sequences")
    alpha_maps: bool = opt(False, "also write foreground mattes (NeRSemble v2 ships BACKGROUND plates instead)")
    detail_mm: float = opt(
        0.8,
        "identity detail off the model: amplitude along the normals, 1-2.5 cm wavelength")
    sensor_noise: float = opt(0.006, "Gaussian sensor noise, std in [0, 1] units (1.5 of 255)")
    workers: int = opt(0, "render processes; 0 = one per core")


@dataclass
class SelectConfig:
    """Stage ``select``: MediaPipe features on the frontal camera, farthest-point timestamp selection."""

    timestamps: str = opt(
        "select",
        "'select': farthest-point picks (training subjects, the paper's Sec. 3.3); 'first:N': the first N "
        "consecutive frames of every sequence, no MediaPipe (test subjects: the paper evaluates the first 40)")
    num_expression: int = opt(40, "picks on the expression features (the paper: 40)")
    num_pose: int = opt(10, "further picks on the pose features, disjoint from the above (the paper: 10)")
    frame_stride: int = opt(1, "process every n-th frame of each sequence")
    include_sequences: list[str] = opt(factory=list, help="empty = all performance sequences")
    exclude_sequences: list[str] = opt(
        factory=lambda: ["BACKGROUND"], help="sequences never selected from (NeRSemble's background plates)")
    face_landmarker_task: str = opt(
        "",
        "MediaPipe Tasks FaceLandmarker model (blendshapes backend). Empty: $FACECANON_FACE_LANDMARKER, and if"
        " that is unset too, the offline FaceMesh backend.")
    expression_dim: int = opt(16, "FaceMesh backend: PCA dimension of the aligned landmark residuals")
    min_detection_confidence: float = opt(0.5, "MediaPipe's detection threshold; frames below it are skipped")
    downscale: int = opt(0, "resolution MediaPipe sees; 0 = capture.downscale")
    queue_frames: int = opt(16, "decoded frames buffered ahead of the detector")


@dataclass
class ForegroundConfig:
    """Foreground from the BACKGROUND plates when a capture has no mattes (``foreground.py``)."""

    blur_sigma_px: float = opt(1.0, "fine-scale blur of image and plate before differencing")
    coarse_sigma_px: float = opt(3.0, "weak evidence: the difference of images blurred this much")
    noise_quantile: float = opt(0.3, "pixels below this quantile of the difference are surely studio")
    low_sigmas: float = opt(
        1.5, "weak difference (coarse scale), in noise levels: a region of it is kept where it holds a strong one")
    high_sigmas: float = opt(10.0, "strong difference (fine scale), in noise levels: seeds the kept regions")
    low_floor: float = opt(0.02, "absolute floors (fraction of full scale) for very clean plates")
    high_floor: float = opt(0.06, "absolute floor of the strong difference (fraction of full scale)")
    close_px: int = opt(5, "closing kernel size")
    min_component_fraction: float = opt(0.1, "of the largest component's area")
    refine: str = opt("grabcut", "'none' | 'grabcut' | 'trim': the boundary refined in a band (foreground.py)")
    refine_band_px: int = opt(6, "the band's half-width, either refinement")
    grabcut_iterations: int = opt(3, "refine = 'grabcut': OpenCV GrabCut iterations")
    trim_sigmas: float = opt(3.0, "refine = 'trim': fine-scale difference kept in the boundary band")


@dataclass
class MvsConfig:
    """``reconstruct.dense = "torch"``: multi-view stereo with the known cameras in torch (``mvs.py``).
    Measured on the synthetic capture (docs/pipeline.md, stage reconstruct)."""

    device: str = opt("auto", "'auto' (cuda when available), 'cpu', 'cuda'")
    source_views: int = opt(4, "per reference view, the best by co-observed sparse points and angle")
    angle_deg: float = opt(20.0, "preferred triangulation angle when choosing them")
    planes: int = opt(64, "coarse plane sweep, uniform in inverse depth over the sparse points' range")
    coarse_scale: int = opt(4, "the sweep runs at 1 / this of the working resolution")
    coarse_window_radius: int = opt(3, "NCC window (2r+1)^2 of the sweep")
    refine_scales: list[int] = opt(factory=lambda: [2, 1], help="one refinement per entry, at 1 / scale")
    window_radius: int = opt(3, "NCC window of the refinements")
    refine_hypotheses: int = opt(7, "per-pixel depths tried per refinement (+-1.5 current steps)")
    depth_margin_m: float = opt(0.02, "the depth range: the sparse points' widened by this")
    min_ncc: float = opt(0.3, "a depth is kept where its aggregated NCC reaches this ...")
    min_consistent_views: int = opt(1, "... and this many other views' depth maps agree with it ...")
    max_reprojection_px: float = opt(1.0, "... reprojecting within this many pixels ...")
    max_relative_depth: float = opt(0.005, "... and this relative depth")
    fusion_voxel_m: float = opt(0.0007, "fused points merged per cell of this size (~1 pixel at 1 m)")


@dataclass
class ReconstructConfig:
    """Stage ``reconstruct``: COLMAP with the calibrated cameras, per selected timestamp."""

    downscale: int = opt(0, "working resolution = full / downscale; 0 = capture.downscale (the paper: 4)")
    use_masks: bool = opt(
        True,
        "pass the foreground to COLMAP: mattes (alpha maps) when the capture has them, else segmented from its "
        "BACKGROUND plates ([reconstruct.foreground]), else none")
    foreground: ForegroundConfig = field(default_factory=ForegroundConfig)
    max_num_features: int = opt(8192, "SIFT features per image at most (COLMAP)")
    peak_threshold: float = opt(0.004, "below COLMAP's 0.0067: skin is low-contrast, we want its features")
    guided_matching: bool = opt(
        False,
        "Re-match under the verified two-view geometry: 24 % more points, but on the harder capture twice the "
        "COLMAP time and less accurate points (docs/pipeline.md, 'The embedded synthetic capture'), so off.")
    ignore_two_view_tracks: bool = opt(True, "points seen by two views only are the least reliable")
    min_observations_per_view: int = opt(50, "a view counts as registered with this many triangulated ...")
    max_mean_reprojection_error_px: float = opt(1.0, "... observations at least, under this mean error (px)")
    outlier_neighbors: int = opt(16, "open3d statistical outlier removal")
    outlier_std_ratio: float = opt(2.5, "open3d statistical outlier removal: standard deviations kept")
    head_box_half_size_m: float = opt(0.25, "crop to a cube around the cameras' common focus")
    dense: str = opt(
        "auto",
        "dense backend: 'colmap' (PatchMatch stereo, CUDA builds only), 'torch' ([reconstruct.mvs], any "
        "device), 'none' (sparse points only), 'auto': colmap where pycolmap has CUDA and a device exists, else "
        "torch")
    mvs: MvsConfig = field(default_factory=MvsConfig)
    patch_match_window_radius: int = opt(
        5,
        "COLMAP PatchMatch window radius. The PatchMatch / fusion settings are tuned for faces and hair "
        "(docs/pipeline.md): a lower NCC filter and fewer required views keep hair, which is low-textured and "
        "seen by few cameras at a time")
    patch_match_num_iterations: int = opt(5, "COLMAP PatchMatch iterations")
    patch_match_filter_min_ncc: float = opt(0.05, "COLMAP PatchMatch filter: minimum NCC of a kept depth")
    patch_match_geom_consistency: bool = opt(True, "COLMAP PatchMatch geometric consistency pass")
    fusion_min_num_pixels: int = opt(3, "COLMAP fusion: views a fused point must come from at least")
    fusion_max_reproj_error: float = opt(2.0, "COLMAP fusion: reprojection error in pixels at most")
    fusion_max_depth_error: float = opt(0.01, "COLMAP fusion: relative depth error at most")
    fusion_max_normal_error: float = opt(15.0, "COLMAP fusion: normal disagreement in degrees at most")
    dense_timeout_s: int = opt(1200, "COLMAP PatchMatch child process: seconds before it is killed (timestamp dropped)")
    keep_database: bool = opt(False, "the COLMAP database (descriptors) is large; the sparse model is kept")


@dataclass
class TrackConfig:
    """Stage ``track``: joint multi-view FLAME fitting of all kept timestamps of a subject.

    Weights balance residuals in their natural units: landmarks in pixels of the working resolution,
    points in millimetres; priors are on unit-variance coefficients and on radians.
    """

    device: str = opt("auto", "'auto' (cuda when available), 'cpu', 'cuda'")
    num_shape: int = opt(
        300,
        "identity coefficients fitted (capped at the model's). FLAME's whole basis, as public trackers fit it: "
        "what a smaller basis cannot express would end up in the labels; `bench track` measured its cost "
        "against 100 / 50 on CPU: 1.00-1.04x the time, peak memory within 8 MiB")
    num_expression: int = opt(100, "expression coefficients fitted (capped at the model's)")
    iterations: list[int] = opt(
        factory=lambda: [150, 200, 400, 400],
        help="steps of the four tracking stages: rigid, +shape/expression, +points, +offsets")
    learning_rate: float = opt(0.01, "Adam step size of every tracking stage")
    early_stop_rel: float = opt(
        1e-5,
        "stop a stage when the loss changes less than this (relative) over 10 steps")
    landmark_weight: float = opt(1.0, "per px^2 of robust (Huber) reprojection error")
    landmark_huber_px: float = opt(3.0, "Huber threshold of the landmark residual, pixels")
    landmark_weight_with_points: float = opt(
        0.05,
        "landmark weight once the points join (stages 3-4): landmarks only guide, FaceMesh's detections carry "
        "biases of a few pixels (mm at 1 m), the reconstructed points are sub-millimetre")
    point_weight: float = opt(4.0, "per mm^2 of robust point-to-surface distance")
    point_huber_mm: float = opt(1.0, "Huber threshold of the point-to-surface residual, mm")
    max_points_per_timestamp: int = opt(
        5000,
        "dense clouds (~400k points per timestamp) are fitted through a seeded subset of this many "
        "(sampling.bounded_subset; the store keeps the same subset), sparse ones (~2-3k) whole; with the "
        "scalp's one-sided term 20000 and 5000 measure the same (docs/pipeline.md, stage track)")
    point_max_distance_mm: float = opt(
        10.0, "final gate: points farther from the mesh are not the head (hair, shoulders)")
    point_gate_start_mm: float = opt(
        10.0,
        "the gate in the first points stage, tightened to point_max_distance_mm by the end, so far regions are "
        "pulled in first (30 measured worse on the harder capture: hair pulls the scalp out)")
    refresh_every: int = opt(20, "closest-point correspondences recomputed every n steps")
    shape_prior: float = opt(0.02, "per unit-variance identity coefficient, squared")
    expression_prior: float = opt(0.02, "per unit-variance expression coefficient, squared")
    expression_mean_prior: float = opt(
        1.0,
        "prior on each expression coefficient's mean over the subject's timestamps (performances are mostly "
        "near-neutral): identity the shape basis lacks cannot hide in a constant expression; 0 / 0.3 / 1 / 3 "
        "measured canonical error 2.68 / 2.35 / 2.29 / 2.25 mm over all head pixels (docs/pipeline.md)")
    jaw_prior: float = opt(1.0, "per rad^2 of jaw rotation")
    neck_prior: float = opt(0.1, "per rad^2 of neck rotation")
    eye_prior: float = opt(1.0, "per rad^2 of eyeball rotation")
    offset_l2: float = opt(20.0, "per mm^2 (mean over vertices): static offsets stay small ...")
    offset_laplacian: float = opt(2000.0, "... and smooth (uniform graph Laplacian, sparse)")
    offset_coarse_basis: int = opt(
        0,
        "eigenfunctions of a coarse static offset field fitted first (with the points), regularised by "
        "smoothness, hardly by size (0: none; 32-64 measured worse, docs/pipeline.md)")
    offset_coarse_laplacian: float = opt(200.0, "per mm^2 of the field's Laplacian (mean over vertices)")
    offset_coarse_l2: float = opt(0.1, "per mm^2: only pins the field's mean, which the pose also expresses")
    timestamp_detail: bool = opt(
        False,
        "per-timestamp offsets for expression detail the basis lacks, small and smooth; the posed meshes (and so "
        "canonicalize) include them, the canonical mesh does not (measured: docs/pipeline.md, stage track)")
    timestamp_detail_l2: float = opt(200.0, "per mm^2 (mean over vertices and timestamps)")
    timestamp_detail_laplacian: float = opt(20000.0, "per mm^2 of the Laplacian")
    covered_masks: list[str] = opt(
        factory=lambda: ["scalp"],
        help="Regions a volume the model lacks may cover from outside (hair over the scalp): points matched there "
        "pull the surface only inward (a one-sided term), so hair cannot inflate the skull and, through the "
        "shape, shift the face in canonical space (measured: docs/pipeline.md, stage track). [] = two-sided "
        "everywhere.")
    offset_free_masks: list[str] = opt(
        factory=lambda: ["left_eyeball", "right_eyeball"],
        help="FLAME_masks.pkl keys (or a union: eyeballs, ears) held at zero offset: the eyeballs keep their shape")
    stats_exclude_masks: list[str] = opt(
        factory=lambda: ["neck"],
        help="Fit statistics (CD-L1, the outlier rule) count only head points: those whose nearest mesh point is "
        "outside these masks (FLAME_masks.pkl keys or unions) and within stats_max_distance_mm. Points that "
        "snap to the neck (torso, collar, clothing) or lie far off (studio) are excluded and counted.")
    stats_max_distance_mm: float = opt(30.0, "far beyond any fit error; a bad fit still scores badly")
    outlier_mad_k: float = opt(3.5, "drop timestamps beyond median + k * MAD of CD-L1 or landmark error")
    outlier_mad_floor: float = opt(0.2, "MAD at least this fraction of the median: good fits cluster tightly")
    canonical: str = opt(
        "subject",
        "'subject': shape + offsets; 'template': mean shape (shared by all subjects)")


TRANSFER_MODES = ("translate", "local_frame")  # canonicalize.transfer (see stages/canonicalize.py)
DENSE_BACKENDS = ("auto", "colmap", "torch", "none")  # reconstruct.dense


@dataclass
class CanonicalizeConfig:
    """Stage ``canonicalize``: nearest-surface deformation transfer into FLAME's canonical space."""

    max_distance_mm: float = opt(10.0, "points farther from the tracked surface are flagged 'far' ...")
    far_points: str = opt("keep", "... and kept (flagged) or dropped: 'keep' | 'drop'")
    body_masks: list[str] = opt(
        factory=lambda: ["neck"],
        help="Head versus torso: a point whose nearest tracked surface point lies in these regions (where clothing "
        "meets the head model) and that is farther than body_max_distance_mm from it is body (collar, "
        "shoulders, chest), never labelled. Hair stands off the scalp, not the neck, and is kept.")
    body_max_distance_mm: float = opt(4.0, "see body_masks: farther than this from those regions is body")
    transfer: str = opt(
        "local_frame",
        "A point's offset from its nearest surface point: carried as is ('translate') or rotated with the "
        "nearest triangle into canonical orientation ('local_frame'); render measures both against ground "
        "truth.")


@dataclass
class RenderConfig:
    """Stage ``render``: per-view depth, canonical and validity maps."""

    splat_radius_px: int = opt(0, "sparse points cover (2r+1)^2 pixels; 0 = the pixel they project to")
    canonical_dtype: str = opt("float16", "storage dtype of canonical maps (error reported per run)")
    consistency_depth_mm: float = opt(3.0, "depth agreement for 'two views see the same surface point'")
    cross_view_pixels_per_view: int = opt(
        2000,
        "cross_view_canonical_mm reprojects each view's valid pixels into every other view (O(V^2) passes): a "
        "seeded sample of this many per view bounds it on dense maps (sparse ones have fewer: all used).")
    label_margins: list[int] = opt(
        factory=lambda: [2, 8],
        help="with ground truth: the label correspondence error of frontal-camera frame pairs this many frames "
             "apart (the paper's Tab. 2 margins; docs/pipeline.md, label_epe)")
    label_margins_average: list[int] = opt(factory=lambda: [1, 10], help="[first, last] margins averaged ('1-10')")
    label_match_mm: float = opt(2.0, "the evaluator's acceptance radius of a label match")
    label_max_pairs: int = opt(8, "frame pairs measured per margin (a seeded sample where more exist)")
    label_max_queries: int = opt(1000, "query pixels per image pair (a seeded sample)")
    label_cross_view_cameras: int = opt(2, "cross-view pairs: the frontal camera with this many nearest cameras")
    canonical_from: str = opt(
        "tracked_surface_near",
        "what a labelled pixel's canonical label comes from: 'tracked_surface_near', where the reconstructed point "
        "it shows lies within canonical_from_near_mm of the tracked mesh, the canonical point of the mesh where "
        "the pixel's ray meets it (no reconstruction noise), else the point's; 'points', always the "
        "canonicalized point (the paper's recipe). docs/pipeline.md, error_sources")
    canonical_from_near_mm: float = opt(2.0, "'tracked_surface_near': the distance to the tracked mesh that counts as near")
    confidence_surface_mm: float = opt(
        2.0, "label confidence (docs/store.md, confidence): a point this far from the tracked surface keeps "
             "exp(-1/2) of it")
    confidence_cross_view_mm: float = opt(
        2.0, "label confidence: a label disagreeing this much (mean canonical distance) with the labels its "
             "neighbour views store for the same surface point keeps exp(-1/2) of it")
    confidence_cross_view_cameras: int = opt(2, "label confidence: each view is checked against this many nearest cameras")
    confidence_observers: int = opt(3, "label confidence: a point observed by fewer cameras keeps that fraction of it")


@dataclass
class SlurmConfig:
    """``build --cluster slurm``: dask-jobqueue jobs. CPU jobs run select / reconstruct / render / write;
    separate GPU jobs (``--gres=gpu:N``, Dask resource ``GPU=N``) run track. Not part of the config hash:
    where a stage runs does not change its outputs."""

    queue: str = opt("", "partition of the CPU jobs ('' = the cluster's default)")
    account: str = opt("", "SLURM account charged ('' = the user's default)")
    walltime: str = opt("04:00:00", "per job, HH:MM:SS")
    cores: int = opt(8, "per CPU job")
    memory: str = opt("32GB", "per CPU job")
    processes: int = opt(2, "Dask worker processes per CPU job")
    cpu_jobs: int = opt(4, "CPU jobs submitted")
    gpu_queue: str = opt("", "partition of the GPU jobs ('' = queue)")
    gpu_jobs: int = opt(1, "GPU jobs submitted (they run track)")
    gpus_per_job: int = opt(1, "GPUs per GPU job")
    gpu_cores: int = opt(8, "CPU cores per GPU job")
    gpu_memory: str = opt("64GB", "memory per GPU job")
    job_extra_directives: list[str] = opt(factory=list, help="extra '#SBATCH' lines for every job")
    prologue: list[str] = opt(factory=list, help="shell lines before the worker starts (module load, venv)")
    interface: str = opt("", "network interface of the workers and scheduler (e.g. 'ib0'); '' = default")
    log_directory: str = opt("slurm-logs", "where the jobs' logs go")
    wait_for_workers: int = opt(0, "start scheduling once this many workers have joined (0 = at once: tasks "
                                   "start as workers join); at most the workers the jobs start")
    wait_timeout_s: float = opt(1800.0, "how long `build` waits for `wait_for_workers` before it stops, naming "
                                        "the jobs' log folder")


@dataclass
class PipelineConfig:
    name: str = opt("synthetic", "name of the pipeline, recorded in the store's provenance")
    work: str = opt("work", "per-subject stage outputs: {work}/{subject}/{stage}/")
    store: str = opt("store", "the dataset store `build` writes")
    threads: int = opt(0, "threads per stage (COLMAP, torch); 0 = the libraries' default (all cores)")
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    flame: FlameConfig = field(default_factory=FlameConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    canonicalize: CanonicalizeConfig = field(default_factory=CanonicalizeConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    source_file: str = ""  # where it was loaded from (not part of the hash)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d

    def section_hash(self, *sections: str) -> str:
        """Hash of some sections only: a stage's outputs depend on its inputs' sections, not all."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in sections}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def hash(self) -> str:
        """Content hash of the effective configuration (recorded in every artifact)."""
        d = self.to_dict()
        d.pop("slurm")  # where stages run does not change what they produce
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if typ == list[list[int]]:
        if not (isinstance(value, list) and all(isinstance(v, list) for v in value)):
            raise ConfigError(f"{where}: expected a list of integer lists, got {value!r}")
        return [_coerce(v, list[int], where) for v in value]
    if typ == list[float]:
        if not (isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if typ == list[int]:
        if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
        return list(value)
    if typ == list[str]:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fill(obj: Any, table: dict[str, Any], where: str) -> None:
    hints = get_type_hints(type(obj))
    for key, value in table.items():
        if key not in hints or key == "source_file":
            known = ", ".join(k for k in hints if k != "source_file")
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table")
            _fill(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def load_toml_config(path: str | Path, cfg: Any, overrides: dict[str, Any] | None = None) -> Any:
    """Fill the dataclass ``cfg`` (holding the defaults) from a TOML file, then from ``overrides``."""
    from .paths import expand

    path = expand(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    _fill(cfg, table, str(path))
    if overrides:
        _fill(cfg, overrides, f"{path} (command-line overrides)")
    cfg.source_file = str(path)
    return cfg


def getattr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline TOML over the defaults; ``overrides`` is a nested dict applied last."""
    cfg = load_toml_config(path, PipelineConfig(), overrides)
    _validate(cfg, cfg.source_file)
    return cfg


def first_frames(mode: str) -> int | None:
    """``select.timestamps``: None for ``"select"`` (farthest-point picks), N for ``"first:N"`` (N >= 1);
    ValueError for anything else."""
    if mode == "select":
        return None
    head, _, count = mode.partition(":")
    if head == "first" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ValueError(f"{mode!r} is neither 'select' nor 'first:N' with N >= 1")


MAX_DOWNSCALE = 64  # a working image of a 2200 x 3208 frame still 34 x 50 pixels
MAX_THREADS = 1024
MAX_EXPRESSION_DIM = 478 * 3  # the FaceMesh backend's descriptor: PCA of 478 3-D landmark residuals


def _non_finite(obj, prefix: str = ""):
    """Dotted key of the first float field (or list item) of a config tree that is NaN or inf, else None."""
    import math

    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found = _non_finite(value, key + ".")
            if found:
                return found
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, float) and not math.isfinite(item):
                return key
    return None


def _validate(cfg: PipelineConfig, where: str) -> None:
    bad = _non_finite(cfg)
    if bad:
        raise ConfigError(f"{where}: {bad} must be a finite number, got {getattr_path(cfg, bad)}")
    if not 1 <= cfg.capture.downscale <= MAX_DOWNSCALE:
        raise ConfigError(f"{where}: capture.downscale must lie in 1..{MAX_DOWNSCALE}, got {cfg.capture.downscale}")
    for name, value, top in (("select.downscale", cfg.select.downscale, MAX_DOWNSCALE),
                             ("reconstruct.downscale", cfg.reconstruct.downscale, MAX_DOWNSCALE),
                             ("threads", cfg.threads, MAX_THREADS)):
        if not 0 <= value <= top:
            raise ConfigError(f"{where}: {name} must lie in 0..{top} (0 = the default), got {value}")
    if not 1 <= cfg.select.expression_dim <= MAX_EXPRESSION_DIM:
        raise ConfigError(f"{where}: select.expression_dim must lie in 1..{MAX_EXPRESSION_DIM}, got "
                          f"{cfg.select.expression_dim}")
    if not cfg.track.learning_rate > 0:
        raise ConfigError(f"{where}: track.learning_rate must be > 0, got {cfg.track.learning_rate}")
    try:
        first_frames(cfg.select.timestamps)
    except ValueError as exc:
        raise ConfigError(f"{where}: select.timestamps: {exc}") from None
    if cfg.select.queue_frames < 1:
        raise ConfigError(f"{where}: select.queue_frames must be >= 1, got {cfg.select.queue_frames}")
    if cfg.flame.kind not in ("synthetic", "flame"):
        raise ConfigError(f"{where}: flame.kind must be 'synthetic' or 'flame', got {cfg.flame.kind!r}")
    s = cfg.synth
    for name in ("subjects", "sequences", "frames", "width", "height"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{where}: synth.{name} must be >= 1")
    sel = cfg.select
    if sel.num_expression < 0 or sel.num_pose < 0 or sel.frame_stride < 1 or sel.expression_dim < 1:
        raise ConfigError(f"{where}: select counts must be >= 0, frame_stride and expression_dim >= 1")
    if cfg.track.device not in ("auto", "cpu", "cuda") or cfg.track.canonical not in ("subject", "template"):
        raise ConfigError(f"{where}: track.device must be auto|cpu|cuda and track.canonical subject|template")
    if len(cfg.track.iterations) != 4 or min(cfg.track.iterations) < 0:
        raise ConfigError(f"{where}: track.iterations needs 4 non-negative counts (rigid, +shape/expr, +points, +offsets)")
    if cfg.canonicalize.far_points not in ("keep", "drop"):
        raise ConfigError(f"{where}: canonicalize.far_points must be 'keep' or 'drop'")
    if cfg.canonicalize.transfer not in TRANSFER_MODES:
        raise ConfigError(f"{where}: canonicalize.transfer must be one of {', '.join(TRANSFER_MODES)}")
    if cfg.render.canonical_dtype not in ("float16", "float32"):
        raise ConfigError(f"{where}: render.canonical_dtype must be float16 or float32")
    r = cfg.render
    if any(m < 1 for m in r.label_margins) or (r.label_margins_average and (
            len(r.label_margins_average) != 2 or not 1 <= r.label_margins_average[0] <= r.label_margins_average[1])):
        raise ConfigError(f"{where}: render.label_margins must be frame counts >= 1 and render.label_margins_average "
                          "[first, last] with 1 <= first <= last, or []")
    if r.canonical_from not in ("points", "tracked_surface_near") or r.canonical_from_near_mm <= 0:
        raise ConfigError(f"{where}: render.canonical_from must be 'points' or 'tracked_surface_near' and "
                          f"render.canonical_from_near_mm positive, got {r.canonical_from!r}, {r.canonical_from_near_mm}")
    if r.confidence_surface_mm <= 0 or r.confidence_cross_view_mm <= 0 or r.confidence_observers < 1 \
            or r.confidence_cross_view_cameras < 1:
        raise ConfigError(f"{where}: render.confidence_surface_mm and confidence_cross_view_mm must be positive, "
                          "confidence_observers and confidence_cross_view_cameras at least 1")
    if r.label_match_mm <= 0 or r.label_max_pairs < 1 or r.label_max_queries < 1 or r.label_cross_view_cameras < 0:
        raise ConfigError(f"{where}: render.label_match_mm, label_max_pairs and label_max_queries must be positive, "
                          "label_cross_view_cameras >= 0")
    if cfg.reconstruct.dense not in DENSE_BACKENDS:
        hint = {"never": " ('never' is now 'none')", "always": " ('always' is now 'colmap')"}.get(cfg.reconstruct.dense, "")
        raise ConfigError(f"{where}: reconstruct.dense must be one of {', '.join(DENSE_BACKENDS)}, got "
                          f"{cfg.reconstruct.dense!r}{hint}")
    m = cfg.reconstruct.mvs
    if m.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: reconstruct.mvs.device must be auto|cpu|cuda")
    if m.source_views < 1 or m.planes < 2 or m.coarse_scale < 1 or m.refine_hypotheses < 3 or min(m.refine_scales, default=1) < 1:
        raise ConfigError(f"{where}: reconstruct.mvs needs source_views >= 1, planes >= 2, coarse_scale >= 1, "
                          f"refine_hypotheses >= 3 and refine_scales >= 1")
    sl = cfg.slurm
    most = sl.cpu_jobs * sl.processes + sl.gpu_jobs
    if not 0 <= sl.wait_for_workers <= most:
        raise ConfigError(f"{where}: slurm.wait_for_workers must lie in 0..{most} (the workers cpu_jobs x processes + "
                          f"gpu_jobs start), got {sl.wait_for_workers}")
    if not sl.wait_timeout_s > 0:
        raise ConfigError(f"{where}: slurm.wait_timeout_s must be > 0, got {sl.wait_timeout_s}")
    if s.width % 2 or s.height % 2:
        raise ConfigError(f"{where}: synth.width and synth.height must be even (video encoding)")
