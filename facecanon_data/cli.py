"""``facecanon-data``: the command line. It parses, configures logging, and delegates; nothing else.

Contract for every stage subcommand: ``--root DIR`` (capture root, default from the pipeline),
``--subject ID``, ``--work DIR``, ``--pipeline TOML`` (default ``pipelines/synthetic.toml``) and
``--json`` (one JSON object with the stage's figures as the last line of stdout; logs go to stderr).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build depth + FLAME canonical-map training data from multi-view face captures.")

PipelineOpt = typer.Option(None, "--pipeline", help="Pipeline TOML (default: pipelines/synthetic.toml).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object with the figures as the last stdout line.")


@app.callback()
def _group() -> None:
    """Build depth + FLAME canonical-map training data from multi-view face captures."""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _load(pipeline: Optional[Path], overrides: dict | None = None):
    from .config import ConfigError, load_pipeline
    from .paths import default_pipeline

    try:
        return load_pipeline(pipeline or default_pipeline(), overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(fn, *args, **kwargs):
    """Run a stage; bad input (missing or malformed files, configuration) becomes a clean error exit."""
    from .features import ModelFileError
    from .flame.assets import AssetError
    from .sources import CaptureFileError

    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, CaptureFileError, ValueError, RuntimeError, AssetError, ModelFileError) as exc:
        _fail(str(exc))


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        typer.echo(human)


@app.command()
def synth(
    out: Path = typer.Option(None, "--out", help="Output folder: writes OUT/capture (NeRSemble v2 layout), "
                             "OUT/ground_truth and OUT/synth.json. Default: the pipeline's synth.out."),
    subjects: int = typer.Option(None, "--subjects", min=1, help="Number of subjects (ids 900, 901, ...)."),
    sequences: int = typer.Option(None, "--sequences", min=1, max=13,
                                  help="Sequences per subject, named like NeRSemble's (EXP-1-head first)."),
    frames: int = typer.Option(None, "--frames", min=1, help="Frames per sequence."),
    seed: int = typer.Option(None, "--seed", help="Random seed; the output is deterministic for a seed."),
    workers: int = typer.Option(None, "--workers", min=0, help="Render processes (0 = one per core)."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Run FaceMesh on every frontal-camera frame and report the detection rate."),
    pipeline: Optional[Path] = PipelineOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Render synthetic subjects with ground truth, in NeRSemble v2's on-disk layout."""
    _setup_logging()
    overrides = {k: v for k, v in dict(subjects=subjects, sequences=sequences, frames=frames, seed=seed,
                                       workers=workers).items() if v is not None}
    if out is not None:
        overrides["out"] = str(out)
    cfg = _load(pipeline, {"synth": overrides})
    from rich.progress import Progress

    from .synthetic.synth import SynthError, synthesize

    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("rendering videos", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            report = synthesize(cfg, verify=verify, progress=progress)
        except SynthError as exc:
            _fail(str(exc))
    result = dataclasses.asdict(report)
    rate = report.facemesh_detection_rate
    human = (f"wrote {len(report.subjects)} subject(s) {', '.join(report.subjects)} x {len(report.sequences)} "
             f"sequence(s) x {report.frames_per_sequence} frames x {report.cameras} cameras "
             f"= {report.images_written} images at {report.full_resolution[0]}x{report.full_resolution[1]} "
             f"(working {report.working_resolution[0]}x{report.working_resolution[1]}) into {report.out} "
             f"in {report.seconds:.0f} s")
    if rate is not None:
        human += f"\nFaceMesh found a face in {rate:.1%} of {report.facemesh_frames} frontal-camera frames"
    _emit(result, as_json, human)


RootOpt = typer.Option(None, "--root", help="Capture root (NeRSemble v2 layout). Default: the pipeline's capture.root.")
SubjectOpt = typer.Option(None, "--subject", help="Subject id, e.g. 900. Default: the capture's only subject.")
WorkOpt = typer.Option(None, "--work", help="Work folder for stage outputs ({work}/{subject}/{stage}). Default: the pipeline's work.")


def _open(cfg, root, subject):
    """Capture source and subject id for a stage command, with clear errors."""
    from .sources import CaptureFileError, open_source

    try:
        source = open_source(cfg.capture, root)
        if subject is None:
            subjects = source.subjects()
            if len(subjects) != 1:
                _fail(f"{source.root}: --subject is required (subjects: {', '.join(subjects) or 'none'})")
            subject = subjects[0]
        source.subject_dir(subject)
    except (CaptureFileError, ValueError) as exc:
        _fail(str(exc))
    return source, subject


@app.command("select")
def select_cmd(root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt, work: Optional[Path] = WorkOpt,
               pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Pick timestamps: MediaPipe on the frontal camera, farthest-point sampling on expression + pose."""
    _setup_logging()
    cfg = _load(pipeline)
    source, subject = _open(cfg, root, subject)
    from rich.progress import Progress

    from .stages.select import run_select

    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(f"select {subject}: MediaPipe on {cfg.capture.frontal_serial}", total=None)
        result = _guarded(run_select, source, subject, cfg, work or cfg.work,
                          progress=lambda d, t: bar.update(task, completed=d, total=t))
    fig = result.figures()
    human = (f"subject {subject}: {result.selected_expression} expression + {result.selected_pose} pose timestamps "
             f"from {result.frames_processed} frames ({result.backend}, face found in "
             f"{result.frontal_detect_rate:.1%}, {result.frames_per_second:.0f} frames/s)")
    if result.gt_coverage_gain is not None:
        human += (f"\nground truth: expression picks cover the expression space {result.gt_coverage_gain:.2f}x "
                  f"(p95) / {result.gt_coverage_gain_mean:.2f}x (mean) better than uniform-in-time picks; "
                  f"all picks {result.gt_coverage_gain_all:.2f}x / {result.gt_coverage_gain_all_mean:.2f}x")
    _emit(fig, as_json, human)


@app.command("reconstruct")
def reconstruct_cmd(root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt, work: Optional[Path] = WorkOpt,
                    timestamps: Optional[str] = typer.Option(
                        None, "--timestamps", help="SEQ:FRAME[,SEQ:FRAME...] instead of the select stage's picks."),
                    pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """COLMAP with the calibrated cameras on each selected timestamp; keep those with all views registered."""
    _setup_logging()
    cfg = _load(pipeline)
    source, subject = _open(cfg, root, subject)
    from rich.progress import Progress

    from .stages.reconstruct import parse_timestamps, run_reconstruct

    picks = _guarded(parse_timestamps, timestamps) if timestamps else None
    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(f"reconstruct {subject}", total=None)
        result = _guarded(run_reconstruct, source, subject, cfg, work or cfg.work, timestamps=picks,
                          progress=lambda d, t: bar.update(task, completed=d, total=t))
    human = (f"subject {subject}: kept {result.timestamps_kept}/{result.timestamps_total} timestamps "
             f"(every view registered; min views registered {result.views_registered_min}), "
             f"median {result.points_median:.0f} points, {'dense' if result.dense else 'sparse'}, "
             f"{result.seconds_per_timestamp:.1f} s per timestamp")
    if result.gt_point_error_median_mm is not None:
        human += f"\nground truth: median point-to-mesh error {result.gt_point_error_median_mm:.3f} mm"
    for key, why in result.dropped.items():
        human += f"\ndropped {key}: {why}"
    _emit(result.figures(), as_json, human)


@app.command("track")
def track_cmd(root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt, work: Optional[Path] = WorkOpt,
              device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the pipeline's track.device, auto)."),
              pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Fit FLAME to all kept timestamps jointly (one shape + static offsets), drop outlier timestamps."""
    _setup_logging()
    cfg = _load(pipeline)
    if device not in (None, "cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got {device!r}")
    source, subject = _open(cfg, root, subject)
    from .stages.track import run_track

    result = _guarded(run_track, source, subject, cfg, work or cfg.work, device=device,
                      progress=lambda m: logging.getLogger("facecanon_data.track").info(m))
    human = (f"subject {subject}: tracked {result.timestamps_kept}/{result.timestamps_in} timestamps on {result.device} "
             f"in {result.seconds:.0f} s; CD-L1 median {result.cd_l1_mm_median:.2f} mm, landmarks "
             f"{result.landmark_px_median:.2f} px; {result.outliers_removed} outlier(s) removed")
    for key, why in result.outliers.items():
        human += f"\n  removed {key}: {why}"
    if result.gt_vertex_error_mm_mean is not None:
        human += f"\nground truth: mean face-vertex error {result.gt_vertex_error_mm_mean:.2f} mm"
    _emit(result.figures(), as_json, human)


@app.command("canonicalize")
def canonicalize_cmd(root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt, work: Optional[Path] = WorkOpt,
                     pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Carry every reconstructed point into canonical space by its nearest tracked-surface deformation."""
    _setup_logging()
    cfg = _load(pipeline)
    source, subject = _open(cfg, root, subject)
    from .stages.canonicalize import run_canonicalize

    result = _guarded(run_canonicalize, source, subject, cfg, work or cfg.work)
    human = (f"subject {subject}: {result.points_total} points of {result.timestamps} timestamps canonicalized, "
             f"median distance to the tracked surface {result.distance_mm_median:.2f} mm, "
             f"{result.points_far} far (> {cfg.canonicalize.max_distance_mm} mm, {result.far_policy})")
    _emit(dataclasses.asdict(result), as_json, human)


@app.command("render")
def render_cmd(root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt, work: Optional[Path] = WorkOpt,
               pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Per-view depth, canonical and validity maps, with label-quality figures."""
    _setup_logging()
    cfg = _load(pipeline)
    source, subject = _open(cfg, root, subject)
    from .stages.render import run_render

    result = _guarded(run_render, source, subject, cfg, work or cfg.work)
    human = (f"subject {subject}: {result.timestamps} timestamps x {result.views} views rendered "
             f"({result.ms_per_view:.0f} ms per view), valid fraction {result.valid_fraction:.2%} of the head, "
             f"cross-view canonical disagreement {result.cross_view_canonical_mm:.2f} mm "
             f"({result.cross_view_pairs} pairs), {result.canonical_dtype} storage error "
             f"{result.canonical_storage_error_mm:.3f} mm")
    if result.gt_canonical_error_mm is not None:
        human += (f"\nground truth: canonical error median {result.gt_canonical_error_mm:.2f} mm "
                  f"(p90 {result.gt_canonical_error_mm_p90:.2f}), depth AbsRel median {result.gt_depth_absrel:.5f}")
    _emit(result.figures(), as_json, human)


@app.command("write")
def write_cmd(store: Path = typer.Option(..., "--out", help="Store folder (created when missing)."),
              subject: Optional[str] = SubjectOpt, work: Optional[Path] = WorkOpt, root: Optional[Path] = RootOpt,
              index: bool = typer.Option(True, "--index/--no-index", help="Rebuild index.parquet afterwards."),
              pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Commit a subject's stage outputs to the store (atomically, one writer per subject)."""
    _setup_logging()
    cfg = _load(pipeline)
    _, subject = _open(cfg, root, subject)
    from .stages.write import run_write
    from .store import StoreError, build_index

    try:
        result = run_write(subject, cfg, work or cfg.work, store)
        if index:
            build_index(store)
    except (FileNotFoundError, ValueError, StoreError) as exc:
        _fail(str(exc))
    _emit(result, as_json, f"subject {subject}: {result['timestamps']} timestamps x {result['views']} views "
                            f"committed to {result['path']}")


@app.command("index")
def index_cmd(store: Path = typer.Argument(..., help="Store folder."), as_json: bool = JsonOpt) -> None:
    """Rebuild STORE/index.parquet (one row per view-sample) from the committed subjects."""
    _setup_logging()
    from .store import StoreError, build_index, read_index, subjects

    if not (store / "zarr.json").is_file():
        _fail(f"{store}: not a facecanon-data store (no zarr.json)")
    try:
        path = build_index(store)
    except StoreError as exc:
        _fail(str(exc))
    n = read_index(store).num_rows
    _emit({"index": str(path), "rows": n, "subjects": subjects(store)}, as_json,
          f"{path}: {n} view-samples of {len(subjects(store))} subject(s)")


@app.command("validate")
def validate_cmd(store: Path = typer.Argument(..., help="Store folder."),
                 quick: bool = typer.Option(False, "--quick", help="Decode 8 seeded chunks per image array instead of "
                                            "every chunk (file sizes and metadata checksums are checked either way)."),
                 as_json: bool = JsonOpt) -> None:
    """Check every file against the integrity manifest, every chunk's checksum, schema dtypes and shapes,
    NaNs, and index vs arrays; exit 1 listing the problems."""
    _setup_logging()
    from .store import subjects, validate_store

    problems = validate_store(store, quick=quick)
    mode = "quick: every file, sampled chunks" if quick else "full: every file and chunk verified"
    result = {"store": str(store), "valid": not problems, "mode": "quick" if quick else "full",
              "subjects": subjects(store), "problems": problems}
    _emit(result, as_json, "\n".join(problems) if problems else
          f"{store}: valid ({len(result['subjects'])} subjects; {mode})")
    if problems:
        raise typer.Exit(1)


@app.command("build")
def build_cmd(subjects_file: Path = typer.Option(..., "--subjects", help="Manifest: one subject id per line, "
                                                 "optional sequences after it, '#' comments."),
              root: Optional[Path] = typer.Option(None, "--root", help="Capture root (default: the pipeline's; "
                                                  "for NeRSemble also $NERSEMBLE_ROOT)."),
              out: Optional[Path] = typer.Option(None, "--out", help="Store folder (default: the pipeline's store)."),
              work: Optional[Path] = WorkOpt,
              pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Pipeline TOML (default: "
                                                      "synthetic.toml for manifests/synthetic.txt, else nersemble.toml)."),
              cluster: str = typer.Option("local", "--cluster", help="local | tcp://host:port | slurm (jobs from "
                                          "the pipeline's [slurm] table)"),
              subject: Optional[str] = typer.Option(None, "--subject", help="Run only this subject, in this process "
                                                    "(one subject per batch job)."),
              force: list[str] = typer.Option([], "--force", help="Redo a stage even if it completed: select, "
                                              "reconstruct, track, canonicalize, render, write (repeatable)."),
              workers: int = typer.Option(0, "--workers", min=0, help="Local cluster worker processes (0 = one per core)."),
              threads: Optional[int] = typer.Option(None, "--threads", min=0, help="Threads per stage (COLMAP, torch); "
                                                    "1 makes runs bit-reproducible. Default: the pipeline's."),
              as_json: bool = JsonOpt) -> None:
    """Run the whole chain for the subjects of a manifest into a store (resumable, fault-isolated)."""
    import os

    _setup_logging()
    from .manifest import ManifestError, read_manifest
    from .orchestration.build import STAGES, SourceSpec
    from .paths import PROJECT_ROOT, expand

    try:
        entries = read_manifest(subjects_file)  # refuses bad ids before any work
    except ManifestError as exc:
        _fail(str(exc))
    bad = [f for f in force if f not in STAGES]
    if bad:
        _fail(f"--force takes stage names {', '.join(STAGES)}; got {bad}")
    synthetic = all(int(e.subject) >= 900 for e in entries)
    default = PROJECT_ROOT / "pipelines" / ("synthetic.toml" if synthetic else "nersemble.toml")
    cfg = _load(pipeline or default, {"threads": threads} if threads is not None else None)
    from .sources import capture_roots

    env_root = os.environ.get("NERSEMBLE_ROOT") if cfg.name != "synthetic" else None
    cap, gt_path = capture_roots(cfg.capture, root or env_root)
    root_dir, gt = str(cap), (str(gt_path) if gt_path else None)
    store = str(out or expand(cfg.store))
    work_dir = str(work or expand(cfg.work))
    from rich.console import Console
    from rich.table import Table

    from .orchestration.run import build, ensure_synthetic_capture

    names = [e.subject for e in entries]
    if subject is not None and subject not in names:
        _fail(f"{subjects_file}: subject {subject} is not in the manifest")
    try:
        if cfg.flame.kind == "synthetic" and synthetic:  # render what is missing, whatever the configured paths
            rendered_gt = ensure_synthetic_capture(cfg, root_dir, [subject] if subject else names)
            gt = gt if gt and Path(gt).is_dir() else rendered_gt
        spec = SourceSpec(root_dir, gt, cfg.capture.color_correction)
        spec.open()  # the capture root exists
        from .progress import RichBuildProgress

        with RichBuildProgress(_stderr_console()) as progress:
            outcomes = build(entries, cfg, spec, work_dir, store, cluster, subject, tuple(force),
                             progress=progress, workers=workers)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    table = Table(title=f"build: {sum(o.ok for o in outcomes)} ok, {sum(not o.ok for o in outcomes)} failed -> {store}")
    for col in ("subject", "status", "timestamps kept/selected", "dropped", "seconds per stage"):
        table.add_column(col)
    for o in outcomes:
        status = "ok" if o.ok else f"FAILED in {o.failed_stage}: {o.reason}"
        secs = " ".join(f"{k} {v:.0f}" for k, v in o.seconds.items())
        table.add_row(o.subject, status, f"{o.timestamps_kept}/{o.timestamps_selected}",
                      "; ".join(f"{k}: {v}" for k, v in o.dropped.items()) or "-", secs)
    (_stderr_console() if as_json else Console()).print(table)  # stdout stays one JSON line with --json
    result = {"store": store, "subjects": [dataclasses.asdict(o) for o in outcomes],
              "ok": sum(o.ok for o in outcomes), "failed": sum(not o.ok for o in outcomes)}
    if as_json:
        typer.echo(json.dumps(result, default=str))
    if result["failed"]:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(store: Path = typer.Argument(..., help="Store folder."),
               html_out: Optional[Path] = typer.Option(None, "--html", help="Where to write the HTML report "
                                                       "(default STORE/report.html)."),
               as_json: bool = JsonOpt) -> None:
    """Per-subject quality of a store (selection, tracking, label quality, ground-truth errors) + HTML."""
    _setup_logging()
    from rich.table import Table

    from .report import FIGURES, build_report, write_html

    if not (store / "zarr.json").is_file():
        _fail(f"{store}: not a facecanon-data store (no zarr.json)")
    report = build_report(store)
    page = write_html(store, report, html_out or store / "report.html")
    report["html"] = str(page)
    if as_json:
        typer.echo(json.dumps(report, default=str))
        return
    table = Table(title=f"{store}: {len(report['subjects'])} subjects, {report['views']} view-samples (medians)")
    for col in ["subject", "timestamps (expr/pose)"] + [label for _, label in FIGURES]:
        table.add_column(col)
    for r in report["subjects"]:
        table.add_row(r["subject"], f"{r['timestamps']} ({r['reasons']['expression']}/{r['reasons']['pose']})",
                      *["-" if r[k] is None else f"{r[k]:.4g}" for k, _ in FIGURES])
    from rich.console import Console

    Console().print(table)
    typer.echo(f"report: {page}")


@app.command("manifest")
def manifest_cmd(root: Optional[Path] = typer.Option(None, "--root", help="NeRSemble download (folders {pid:03d})."),
                 metadata: Optional[Path] = typer.Option(None, "--metadata", help="Or NeRSemble's metadata_sequences.csv "
                                                         "(the participant list, no download needed)."),
                 out: Path = typer.Option(Path("manifests/nersemble.txt"), "--out", help="Manifest to write.")) -> None:
    """Regenerate the training manifest (the paper's test subjects left out)."""
    from .manifest import ManifestError, write_training_manifest
    from .sources import CaptureFileError

    if (root is None) == (metadata is None):
        _fail("give exactly one of --root DIR and --metadata CSV")
    try:
        subjects = write_training_manifest(root, out, metadata)
    except (CaptureFileError, ManifestError) as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {len(subjects)} training subjects")


TrainConfigOpt = typer.Option(None, "--config", help="Trainer TOML (default: pipelines/train_tiny.toml).")


def _load_config(loader, path: Optional[Path], default: str, *args):
    """``loader(path or pipelines/DEFAULT, *args)``; a configuration error becomes a clean exit."""
    from .config import ConfigError
    from .paths import PROJECT_ROOT

    try:
        return loader(path or PROJECT_ROOT / "pipelines" / default, *args)
    except ConfigError as exc:
        _fail(str(exc))


def _require_store(store: Path) -> None:
    if not (store / "index.parquet").is_file():
        _fail(f"{store}: not a facecanon-data store (no index.parquet); build one with `facecanon-data build`")


@app.command("train")
def train_cmd(store: Path = typer.Option(..., "--store", help="Dataset store to train from."),
              config: Optional[Path] = TrainConfigOpt,
              out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's out)."),
              steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Override optim.max_steps."),
              resume: bool = typer.Option(True, "--resume/--restart", help="Continue from OUT/last.pt when present."),
              as_json: bool = JsonOpt) -> None:
    """Train the depth + ray + canonical predictor on a store (DDP when launched by torchrun)."""
    _setup_logging()
    _require_store(store)
    from .training.config import load_train_config

    cfg = _load_config(load_train_config, config, "train_tiny.toml", {"optim": {"max_steps": steps}} if steps else None)
    from .training.trainer import train

    result = _guarded(train, cfg, store, out or None, resume=resume)
    _emit(result, as_json, "\n".join(f"{k}: {v}" for k, v in result.items()))


@app.command("evaluate")
def evaluate_cmd(checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by `train`."),
                 store: Path = typer.Option(..., "--store", help="Store holding the evaluation subjects."),
                 protocol: Optional[Path] = typer.Option(None, "--protocol", help="Evaluation TOML (default: "
                                                         "pipelines/eval_synthetic.toml; the paper's NeRSemble test "
                                                         "protocol is pipelines/eval_nersemble_test.toml)."),
                 untrained: bool = typer.Option(False, "--untrained", help="Evaluate the checkpoint's architecture "
                                                "freshly initialized (the baseline)."),
                 as_json: bool = JsonOpt) -> None:
    """Depth AbsRel / RMSE and canonical-space correspondence EPE on held-out subjects (Sec. 4.2)."""
    _setup_logging()
    _require_store(store)
    from .training.config import load_eval_config

    ev = _load_config(load_eval_config, protocol, "eval_synthetic.toml")
    from .training.evaluate import evaluate_model
    from .training.trainer import model_from_checkpoint, select_device

    device = select_device("auto")
    model, _ = _guarded(model_from_checkpoint, checkpoint, device, untrained)
    result = _guarded(evaluate_model, model, str(store), ev, str(device))
    result = {"checkpoint": str(checkpoint), "untrained": untrained, "protocol": ev.name, **result}
    human = "\n".join(f"{k}: {v}" for k, v in result.items() if k != "margins")
    human += "\n" + "\n".join(f"margin {m}: EPE {v['epe_px']:.2f} px, <3px {v['under_3px']:.2f}, "
                                f"<5px {v['under_5px']:.2f}, <10px {v['under_10px']:.2f} ({v['pairs']} pairs)"
                                for m, v in result["margins"].items())
    _emit(result, as_json, human)


@app.command("visualize")
def visualize_cmd(checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by `train`."),
                  store: Path = typer.Option(..., "--store", help="Dataset store."),
                  subject: str = typer.Option(..., "--subject", help="Subject id in the store."),
                  out: Path = typer.Option(Path("viz"), "--out", help="Folder for the PNGs."),
                  timestamp: int = typer.Option(0, "--timestamp", min=0, help="Kept-timestamp index."),
                  views: int = typer.Option(4, "--views", min=2, max=16, help="Views processed together."),
                  untrained: bool = typer.Option(False, "--untrained", help="The architecture freshly initialized.")
                  ) -> None:
    """PNGs of inputs, predicted / stored depth and canonical maps, and predicted correspondences."""
    _setup_logging()
    _require_store(store)
    from .training.trainer import model_from_checkpoint, select_device
    from .training.visualize import visualize

    device = select_device("auto")
    model, cfg = _guarded(model_from_checkpoint, checkpoint, device, untrained)
    res = tuple(cfg.data.resolutions[0])
    paths = _guarded(visualize, model, str(store), out, subject, cfg.loss.canonical_scale, res, views, timestamp,
                     str(device))
    typer.echo("\n".join(str(p) for p in paths))


@app.command("bench")
def bench_cmd(name: str = typer.Argument(..., help="Benchmark to run: select, reconstruct, track, transfer, loader, "
                                          "build, train."),
              root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt,
              store: Optional[Path] = typer.Option(None, "--store", help="Store folder (bench loader)."),
              pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Run a benchmark: the target and its named baseline measured in the same run, and their ratio."""
    _setup_logging()
    cfg = _load(pipeline)
    benches = {"select": "bench_select", "reconstruct": "bench_reconstruct", "track": "bench_track",
               "transfer": "bench_transfer", "loader": "bench_loader", "build": "bench_build", "train": "bench_train"}
    if name not in benches:
        _fail(f"unknown benchmark {name!r} (available: {', '.join(benches)})")
    from . import bench

    if name == "track":  # generates its observations from the head model: no capture needed
        result = bench.bench_track(None, subject or "SYN", cfg)
    elif name == "transfer":
        result = bench.bench_transfer(cfg)
    elif name == "build":
        result = bench.bench_build(cfg)
    elif name == "train":
        result = _guarded(bench.bench_train, cfg)
    elif name == "loader":
        if store is None:
            _fail("bench loader needs --store STORE (e.g. one written by `facecanon-data write`)")
        result = bench.bench_loader(store)
    else:
        source, subject = _open(cfg, root, subject)
        result = getattr(bench, benches[name])(source, subject, cfg)
    human = "\n".join(f"{k}: {v}" for k, v in result.items())
    _emit(result, as_json, human)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
