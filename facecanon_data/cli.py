"""``facecanon-data``: the command line. It parses, configures logging, and delegates; nothing else.

Contract for every stage subcommand: ``--root DIR`` (capture root, default from the pipeline),
``--subject ID``, ``--work DIR``, ``--pipeline TOML`` (default ``pipelines/synthetic.toml``) and
``--json`` (one JSON object with the stage's figures as the last line of stdout; logs go to stderr).
"""
from __future__ import annotations

import dataclasses
import errno
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
    from .config import load_pipeline
    from .paths import default_pipeline

    return _guarded(load_pipeline, pipeline or default_pipeline(), overrides)


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(fn, *args, **kwargs):
    """Run ``fn``; bad input (:class:`~facecanon_data.errors.InputError`: a missing or malformed file, a
    bad setting, a stage run out of order) becomes ``error: ...`` and exit status 2. Anything else is
    a bug and keeps its traceback."""
    from .errors import InputError

    try:
        return fn(*args, **kwargs)
    except InputError as exc:
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
    alpha_maps: bool = typer.Option(None, "--alpha-maps/--no-alpha-maps",
                                    help="Also write foreground mattes (alpha_maps/). Default: the pipeline's "
                                         "synth.alpha_maps (off: NeRSemble v2 ships BACKGROUND plates instead)."),
    pipeline: Optional[Path] = PipelineOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Render synthetic subjects with ground truth, in NeRSemble v2's on-disk layout."""
    _setup_logging()
    overrides = {k: v for k, v in dict(subjects=subjects, sequences=sequences, frames=frames, seed=seed,
                                       workers=workers, alpha_maps=alpha_maps).items() if v is not None}
    if out is not None:
        overrides["out"] = str(out)
    cfg = _load(pipeline, {"synth": overrides})
    from rich.progress import Progress

    from .synthetic.synth import synthesize

    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("rendering videos", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = _guarded(synthesize, cfg, verify=verify, progress=progress)
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
    from .sources import open_source

    source = _guarded(open_source, cfg.capture, root)
    if subject is None:
        subjects = source.subjects()
        if len(subjects) != 1:
            _fail(f"{source.root}: --subject is required (subjects: {', '.join(subjects) or 'none'})")
        subject = subjects[0]
    _guarded(source.check_subject, subject)  # calibration and every video's header, before any stage runs
    return source, subject


def _stage_command(stage):
    """The subcommand of one stage of the chain: open the capture, run the stage through the runner
    (reused when its outputs are current, unless ``--force``), print its summary or figures."""
    import inspect

    def command(*, root: Optional[Path], subject: Optional[str], work: Optional[Path], pipeline: Optional[Path],
                force: bool, as_json: bool, **options) -> None:
        _setup_logging()
        cfg = _load(pipeline)
        store = options.pop("out", None)
        index = options.pop("index", False)
        source, subject = _open(cfg, root, subject)
        from rich.progress import Progress

        from .orchestration.runner import run_stage
        from .stages.contract import StageContext

        with Progress(transient=True, console=_stderr_console()) as bar:
            task = bar.add_task(f"{stage.name} {subject}", total=None)
            ctx = StageContext(open_source=lambda: source, subject=subject, cfg=cfg, work=Path(work or cfg.work),
                               store=store, options=options,
                               progress=lambda d, t: bar.update(task, completed=d, total=t))
            run = _guarded(run_stage, stage, ctx, force)
        if index:
            from .store import build_index

            _guarded(build_index, store)
        figures = {**run.figures, "stage": stage.name, "status": run.status}
        human = stage.describe(subject, run.figures)
        _emit(figures, as_json, human + ("" if run.status == "ran" else
                                         "\n(outputs current: reused; --force reruns the stage)"))

    params = [inspect.Parameter("root", inspect.Parameter.KEYWORD_ONLY, default=RootOpt, annotation=Optional[Path]),
              inspect.Parameter("subject", inspect.Parameter.KEYWORD_ONLY, default=SubjectOpt, annotation=Optional[str]),
              inspect.Parameter("work", inspect.Parameter.KEYWORD_ONLY, default=WorkOpt, annotation=Optional[Path])]
    if stage.needs_store:
        params += [inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                                     default=typer.Option(..., "--out", help="Store folder (created when missing).")),
                   inspect.Parameter("index", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                     default=typer.Option(True, "--index/--no-index",
                                                          help="Rebuild index.parquet afterwards."))]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                 default=typer.Option(None, o.flag, help=o.help)) for o in stage.options]
    params += [inspect.Parameter("pipeline", inspect.Parameter.KEYWORD_ONLY, default=PipelineOpt,
                                 annotation=Optional[Path]),
               inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(False, "--force", help="Rerun even if the outputs are current.")),
               inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=JsonOpt, annotation=bool)]

    # typer reads the parameters from the signature: the stage's own options join the common ones
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = stage.help
    command.__name__ = f"{stage.name}_cmd"
    return command


def _register_stage_commands() -> None:
    from .stages.chain import CHAIN

    for stage in CHAIN:
        app.command(stage.name, help=stage.help)(_stage_command(stage))


_register_stage_commands()


@app.command("index")
def index_cmd(store: Path = typer.Argument(..., help="Store folder."), as_json: bool = JsonOpt) -> None:
    """Rebuild STORE/index.parquet (one row per view-sample) from the committed subjects."""
    _setup_logging()
    from .store import build_index, read_index, subjects

    if not (store / "zarr.json").is_file():
        _fail(f"{store}: not a facecanon-data store (no zarr.json)")
    path = _guarded(build_index, store)
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

    problems = _guarded(validate_store, store, quick=quick)
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
              force: list[str] = typer.Option([], "--force", help="Redo a stage even if its outputs are current, and "
                                              "with it every stage downstream (repeatable; names as in `--help`)."),
              workers: int = typer.Option(0, "--workers", min=0, help="Local cluster worker processes (0 = one per core)."),
              threads: Optional[int] = typer.Option(None, "--threads", min=0, help="Threads per stage (COLMAP, torch); "
                                                    "1 makes runs bit-reproducible. Default: the pipeline's."),
              keep_work: str = typer.Option("light", "--keep-work", help="After a subject is committed: light (drop "
                                            "images, COLMAP workspaces and written maps; resumable), none (drop its "
                                            "work folder) or all."),
              as_json: bool = JsonOpt) -> None:
    """Run the whole chain for the subjects of a manifest into a store (resumable, fault-isolated)."""
    import os

    _setup_logging()
    from .manifest import read_manifest
    from .orchestration.build import SourceSpec
    from .paths import PROJECT_ROOT, expand
    from .stages.chain import STAGES
    from .stages.prune import KEEP_WORK

    if keep_work not in KEEP_WORK:
        _fail(f"--keep-work takes {' | '.join(KEEP_WORK)}; got {keep_work!r}")
    entries = _guarded(read_manifest, subjects_file)  # refuses bad ids before any work
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
    if Path(root_dir).exists() and not Path(root_dir).is_dir():  # checked before anything is rendered
        _fail(f"{root_dir}: not a folder (the capture root is a folder of subject folders)")
    store = str(out or expand(cfg.store))
    work_dir = str(work or expand(cfg.work))
    from rich.console import Console

    from .errors import InputError
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
                             progress=progress, workers=workers, keep_work=keep_work)
    except InputError as exc:
        _fail(str(exc))
    rows = []
    for o in outcomes:
        status = "ok" if o.ok else f"FAILED in {o.failed_stage}: {o.reason}"
        secs = " ".join(f"{k}{'*' if o.stages.get(k) == 'reused' else ''} {v:.0f}" for k, v in o.seconds.items())
        rows.append([o.subject, status, f"{o.timestamps_kept}/{o.timestamps_selected}",
                     "; ".join(f"{k}: {v}" for k, v in o.dropped.items()) or "-", secs])
    _print_table(f"build: {sum(o.ok for o in outcomes)} ok, {sum(not o.ok for o in outcomes)} failed -> {store}",
                 ["subject", "status", "timestamps kept/selected", "dropped", "seconds per stage (* reused)"], rows,
                 _stderr_console() if as_json else Console())  # stdout stays one JSON line with --json
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
    from .report import FIGURES, LABEL_FIGURES, build_report, write_html

    if not (store / "zarr.json").is_file():
        _fail(f"{store}: not a facecanon-data store (no zarr.json)")
    report = _guarded(build_report, store)
    page = write_html(store, report, html_out or store / "report.html")
    report["html"] = str(page)
    if as_json:
        typer.echo(json.dumps(report, default=str))
        return
    figures = list(FIGURES) + [f for f in LABEL_FIGURES if any(r.get(f[0]) is not None for r in report["subjects"])]
    rows = [[r["subject"], f"{r['timestamps']} ({r['reasons']['expression']}/{r['reasons']['pose']}"
             + (f", {r['reasons']['first']} first" if r["reasons"]["first"] else "") + ")",
             r["dense_backend"], r["color_correction"], *["-" if r.get(k) is None else f"{r[k]:.4g}" for k, _ in figures]]
            for r in report["subjects"]]
    from rich.console import Console

    _print_table(f"{store}: {len(report['subjects'])} subjects, {report['views']} view-samples (medians)",
                 ["subject", "timestamps (expr/pose)", "dense", "colour corr."] + [label for _, label in figures], rows,
                 Console())
    for name, tables in report["evaluations"].items():
        typer.echo(f"\nevaluation: {name}\n\n{tables}")
    typer.echo(f"report: {page}")


@app.command("manifest")
def manifest_cmd(root: Optional[Path] = typer.Option(None, "--root", help="NeRSemble download (folders {pid:03d})."),
                 metadata: Optional[Path] = typer.Option(None, "--metadata", help="Or NeRSemble's metadata_sequences.csv "
                                                         "(the participant list, no download needed)."),
                 out: Path = typer.Option(Path("manifests/nersemble.txt"), "--out", help="Manifest to write.")) -> None:
    """Regenerate the training manifest (the paper's test subjects left out)."""
    from .manifest import write_training_manifest

    if (root is None) == (metadata is None):
        _fail("give exactly one of --root DIR and --metadata CSV")
    subjects = _guarded(write_training_manifest, root, out, metadata)
    typer.echo(f"{out}: {len(subjects)} training subjects")


TrainConfigOpt = typer.Option(None, "--config", help="Trainer TOML (default: pipelines/train_tiny.toml).")


def _load_config(loader, path: Optional[Path], default: str, *args):
    """``loader(path or pipelines/DEFAULT, *args)``; a configuration error becomes a clean exit."""
    from .paths import PROJECT_ROOT

    return _guarded(loader, path or PROJECT_ROOT / "pipelines" / default, *args)


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


ProtocolOpt = typer.Option(None, "--protocol", help="Evaluation TOML (default: pipelines/eval_synthetic.toml; "
                           "the paper's NeRSemble test protocol is pipelines/eval_nersemble_test.toml).")


@app.command("evaluate")
def evaluate_cmd(checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint written by "
                                                           "`train` (the bundled model, run in process)."),
                 predictions: Optional[Path] = typer.Option(None, "--predictions", help="Instead of a checkpoint: a "
                                                            "folder of any model's predictions of the frames "
                                                            "`export-frames` wrote (predictions.npz or the released "
                                                            "code's raw_predictions.npz per camera; docs/evaluation.md)."),
                 store: Path = typer.Option(..., "--store", help="Store holding the evaluation subjects."),
                 protocol: Optional[Path] = ProtocolOpt,
                 untrained: bool = typer.Option(False, "--untrained", help="Evaluate the checkpoint's architecture "
                                                "freshly initialized (the baseline)."),
                 label: str = typer.Option("", "--label", help="The model's name in the tables (default: trained, "
                                           "untrained or predictions); saved as STORE/evaluations/PROTOCOL/LABEL.json."),
                 as_json: bool = JsonOpt) -> None:
    """The paper's protocol on held-out subjects (Sec. 4.2): frontal-camera EPE at margins in frames, monocular
    and multi-view depth AbsRel / RMSE, in the face + hair region; prints the paper's table layouts. Scores the
    bundled model (--checkpoint) or any model's prediction files (--predictions)."""
    _setup_logging()
    _require_store(store)
    if (checkpoint is None) == (predictions is None):
        _fail("give either --checkpoint (the bundled model) or --predictions (a folder of prediction files)")
    from .training.config import load_eval_config

    ev = _load_config(load_eval_config, protocol, "eval_synthetic.toml")
    from .training.evaluate import evaluate_model, run_protocol
    from .training.tables import paper_tables, save_evaluation

    if predictions is not None:
        from .training.predictions import FilePredictor

        predictor = _guarded(FilePredictor, predictions, ev)
        result = _guarded(run_protocol, predictor, str(store), ev)
        label = label or "predictions"
        result = {"predictions": str(predictions), "files": len(predictor.files), "protocol": ev.name, **result}
    else:
        from .training.trainer import model_from_checkpoint, select_device

        device = select_device("auto")
        model, _ = _guarded(model_from_checkpoint, checkpoint, device, untrained)
        result = _guarded(evaluate_model, model, str(store), ev, str(device))
        label = label or ("untrained" if untrained else "trained")
        result = {"checkpoint": str(checkpoint), "untrained": untrained, "protocol": ev.name, **result}
    result["saved"] = str(_guarded(save_evaluation, store, result, label))
    _emit(result, as_json, paper_tables({label: result}) + f"\n\nsaved to {result['saved']} (`report` gathers them)")


@app.command("export-frames")
def export_frames_cmd(store: Path = typer.Argument(..., help="Store holding the evaluation subjects."),
                      protocol: Optional[Path] = ProtocolOpt,
                      out: Path = typer.Option(..., "--out", help="Folder of the frames: per subject, sequence and "
                                               "camera, numbered PNGs in frame order and cameras.json."),
                      as_json: bool = JsonOpt) -> None:
    """The protocol's test views as image folders, the input of any external model (then `evaluate
    --predictions` scores what it writes)."""
    _setup_logging()
    _require_store(store)
    from .training.config import load_eval_config
    from .training.predictions import export_frames

    ev = _load_config(load_eval_config, protocol, "eval_synthetic.toml")
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("export-frames (cameras)", total=None)
        result = _guarded(export_frames, str(store), ev, out, lambda d, t: bar.update(task, completed=d, total=t))
    _emit(result, as_json, f"{result['images']} images of {result['cameras']} cameras "
                           f"({len(result['subjects'])} subjects) in {out}")


@app.command("predict")
def predict_cmd(checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by `train`."),
                store: Path = typer.Option(..., "--store", help="Store holding the evaluation subjects."),
                protocol: Optional[Path] = ProtocolOpt,
                out: Path = typer.Option(..., "--out", help="Folder of the predictions.npz files (one per "
                                         "subject, sequence and camera)."),
                as_json: bool = JsonOpt) -> None:
    """The bundled model's predictions of the protocol's views, written as prediction files: the same
    forward passes as `evaluate --checkpoint`, so `evaluate --predictions` on them gives its figures."""
    _setup_logging()
    _require_store(store)
    from .training.config import load_eval_config
    from .training.evaluate import ModelPredictor, run_protocol
    from .training.predictions import RecordingPredictor, write_recorded_predictions
    from .training.trainer import model_from_checkpoint, select_device

    ev = _load_config(load_eval_config, protocol, "eval_synthetic.toml")
    device = select_device("auto")
    model, _ = _guarded(model_from_checkpoint, checkpoint, device, False)
    model.eval()
    recorder = RecordingPredictor(ModelPredictor(model, str(device), ev.views_per_sample))
    result = _guarded(run_protocol, recorder, str(store), ev)
    files = write_recorded_predictions(recorder, out)
    result = {"checkpoint": str(checkpoint), "protocol": ev.name, "files": len(files), "out": str(out), **result}
    _emit(result, as_json, f"{len(files)} prediction files in {out}")


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


@app.command("figure")
def figure_cmd(store: Path = typer.Argument(..., help="Store folder."),
               out: Path = typer.Option(..., "--out", help="PNG to write."),
               subject: Optional[str] = typer.Option(None, "--subject", help="Subject (default: the first)."),
               timestamp: int = typer.Option(0, "--timestamp", min=0, help="Timestamp index in the subject."),
               view: Optional[str] = typer.Option(None, "--view", help="Camera serial (default: the frontal one)."),
               scale: float = typer.Option(0.5, "--scale", min=0.05, max=4.0, help="Resize factor of the figure."),
               as_json: bool = JsonOpt) -> None:
    """One stored view beside its depth map and canonical map (a PNG): what the labels look like."""
    _setup_logging()
    import cv2

    from .artifacts import atomic_write
    from .figures import label_figure

    _require_store(store)
    image, shown = _guarded(label_figure, store, subject, timestamp, view, scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: cv2.imwrite(str(p), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)) or
                 _fail(f"{out}: could not write a PNG there"))
    _emit({**shown, "png": str(out)}, as_json, f"{out}: subject {shown['subject']} {shown['sequence']}/"
          f"{shown['frame']} camera {shown['serial']}: view, depth, canonical map")


@app.command("docs")
def docs_cmd(out: Path = typer.Option(Path("docs"), "--out", help="Folder of the generated pages."),
             check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 naming every page that "
                                        "differs from what the code generates.")) -> None:
    """Generate the reference pages (cli.md, configuration.md, store.md) from the code."""
    from .docgen import PAGES, write_pages

    stale = _guarded(write_pages, out, check)
    if check and stale:
        typer.echo(f"stale: {', '.join(str(out / n) for n in stale)} (regenerate with `facecanon-data docs`)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{out}: {len(PAGES)} pages " + ("current" if check else f"written ({len(stale)} changed)"))


@app.command("bench")
def bench_cmd(name: str = typer.Argument(..., help="Benchmark to run: select, color, dense, reconstruct, track, "
                                          "transfer, loader, build, train, subject."),
              root: Optional[Path] = RootOpt, subject: Optional[str] = SubjectOpt,
              store: Optional[Path] = typer.Option(None, "--store", help="Store folder (bench loader)."),
              real_size: bool = typer.Option(False, "--real-size", help="bench select: on the frontal camera "
                                             "upscaled to NeRSemble's 2200x3208 with a colour calibration."),
              timestamps: Optional[int] = typer.Option(None, "--timestamps", min=1, max=200, help="bench track: "
                                                       "timestamps fitted jointly (default 8; the paper keeps 50); "
                                                       "bench dense: timestamps measured (default 3)."),
              pipeline: Optional[Path] = PipelineOpt, as_json: bool = JsonOpt) -> None:
    """Run a benchmark: the target and its named baseline measured in the same run, and their ratio."""
    _setup_logging()
    cfg = _load(pipeline)
    from . import bench

    if name not in bench.BENCHES:
        _fail(f"unknown benchmark {name!r} (available: {', '.join(bench.BENCHES)})")
    fn, needs = bench.BENCHES[name]
    if real_size and name != "select":
        _fail("--real-size applies to bench select only")
    if timestamps is not None and name not in ("track", "dense"):
        _fail("--timestamps applies to bench track and bench dense only")
    extra = {"real_size": True} if real_size else {}
    if timestamps is not None:
        extra["timestamps" if name == "track" else "count"] = timestamps
    if needs == "capture":
        source, subject = _open(cfg, root, subject)
        result = _guarded(fn, source, subject, cfg, **extra)
    elif needs == "store":
        if store is None:
            _fail(f"bench {name} needs --store STORE (e.g. one written by `facecanon-data build`)")
        result = _guarded(fn, store)
    else:
        result = _guarded(fn, cfg, **extra)
    human = "\n".join(f"{k}: {v}" for k, v in result.items() if k not in ("evaluation", "tables"))
    if "tables" in result:  # bench train: the evaluation in the layout of the paper's tables
        human += "\n\n" + result["tables"]
    _emit(result, as_json, human)


def _print_table(title: str, columns: list[str], rows: list[list[str]], console) -> None:
    """A table that never cuts a cell: on a terminal, columns wrap (rich, folded); elsewhere (a log, a
    pipe), the title and then one tab-separated line per row, header first, every cell whole."""
    if console.is_terminal:
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    clean = lambda cell: str(cell).replace("\t", " ").replace("\n", " ")  # noqa: E731
    lines = [title, "\t".join(map(clean, columns))] + ["\t".join(map(clean, row)) for row in rows]
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# Errors of the machine rather than of the code: a read-only store, a full disk, a missing permission.
_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                       errno.EISDIR, errno.EMFILE, errno.ENAMETOOLONG, errno.ELOOP}


def main() -> None:
    """The console script: an environment error (read-only folder, full disk, permission) is one line
    naming the file, exit status 2; the writers are atomic, so nothing half-written is left behind."""
    try:
        app()
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = exc.filename or "(unnamed file)"
        typer.echo(f"error: {where}: {exc.strerror or exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
