"""The chain, declared once: every stage's inputs, config sections, run and summary line.

``build``, the stage subcommands, the batch mode and the runner all iterate over :data:`CHAIN`;
nothing else lists the stages. Adding a stage means adding one :class:`Stage` here.
"""
from __future__ import annotations

from dataclasses import asdict

from .contract import Figures, Stage, StageContext, StageOption, check_chain

# -- select ------------------------------------------------------------------------------------


def _select(ctx: StageContext) -> Figures:
    from .select import run_select

    from ..errors import InputValueError

    result = run_select(ctx.source, ctx.subject, ctx.cfg, ctx.work, progress=ctx.progress)
    if not result.selection:
        raise InputValueError(f"{ctx.work / ctx.subject / 'select'}: select kept no timestamp for subject "
                              f"{ctx.subject} (select.num_expression + num_pose = 0, or no frontal frame with a face)")
    figures = result.figures()
    figures["selection"] = [list(row) for row in result.selection]  # (sequence, frame, reason, rank)
    return figures


def _describe_select(subject: str, f: Figures) -> str:
    if f.get("mode", "select") != "select":
        sequences = len({row[0] for row in f.get("selection", [])})
        line = (f"subject {subject}: {f['selected_first']} consecutive timestamps ({f['mode']}) of {sequences} "
                f"sequence(s), no selection")
    else:
        line = (f"subject {subject}: {f['selected_expression']} expression + {f['selected_pose']} pose timestamps "
                f"from {f['frames_processed']} frames ({f['backend']}, face found in {f['frontal_detect_rate']:.1%}, "
                f"{f['frames_per_second']:.0f} frames/s)")
    if f.get("gt_coverage_gain") is not None:
        line += (f"\nground truth: expression picks cover the expression space {f['gt_coverage_gain']:.2f}x (p95) / "
                 f"{f['gt_coverage_gain_mean']:.2f}x (mean) better than uniform-in-time picks; all picks "
                 f"{f['gt_coverage_gain_all']:.2f}x / {f['gt_coverage_gain_all_mean']:.2f}x")
    line += ("\nframes colour-corrected (color_calibration.json)" if f.get("color_correction") else
             "\nno colour correction (the subject has no color_calibration.json, or capture.color_correction is off)")
    return line


# -- reconstruct (fans out: one unit per selected timestamp) ------------------------------------


def _reconstruct_units(ctx: StageContext) -> list[tuple[str, int]]:
    from .reconstruct import parse_timestamps

    given = ctx.options.get("timestamps")
    if given is not None:
        return sorted(set(parse_timestamps(given)))
    return sorted({(str(s), int(f)) for s, f, _, _ in ctx.upstream_figures("select")["selection"]})


def _reconstruct_check(ctx: StageContext) -> None:
    from .reconstruct import check_reconstruct

    check_reconstruct(ctx.source, ctx.subject, ctx.cfg, _reconstruct_units(ctx))


def _reconstruct_run_units(ctx: StageContext, units):
    from .reconstruct import reconstruct_timestamps

    results = reconstruct_timestamps(ctx.source, ctx.subject, ctx.cfg, ctx.work, units, ctx.progress)
    for unit, result in zip(units, results):
        yield unit, asdict(result)


def _reconstruct_finish(ctx: StageContext, results: list[dict]) -> Figures:
    from .reconstruct import result_from_dict, summarize_reconstruct

    return summarize_reconstruct(ctx.subject, [result_from_dict(r) for r in results]).figures()


def _describe_reconstruct(subject: str, f: Figures) -> str:
    line = (f"subject {subject}: kept {f['timestamps_kept']}/{f['timestamps_total']} timestamps (every view registered; "
            f"min views registered {f['views_registered_min']}), median {f['points_median']:.0f} points, "
            f"{'dense (' + f.get('dense_backend', '') + ')' if f['dense'] else 'sparse'}, "
            f"{f['seconds_per_timestamp']:.1f} s per timestamp")
    if f.get("gt_point_error_median_mm") is not None:
        line += f"\nground truth: median point-to-mesh error {f['gt_point_error_median_mm']:.3f} mm"
    for key, why in f["dropped"].items():
        line += f"\ndropped {key}: {why}"
    return line


# -- track -------------------------------------------------------------------------------------


def _track_check(ctx: StageContext) -> None:
    from .track import pick_device, tracking_assets

    tracking_assets(ctx.cfg)
    pick_device(ctx.options.get("device") or ctx.cfg.track.device)


def _track(ctx: StageContext) -> Figures:
    import logging

    from .track import run_track

    from ..errors import InputValueError

    reconstructed = ctx.upstream_figures("reconstruct")
    if not reconstructed["kept"]:
        raise InputValueError(f"{ctx.work / ctx.subject / 'reconstruct'}: reconstruct kept no timestamp of subject "
                              f"{ctx.subject}, nothing to track ({reconstructed['dropped']})")
    log = logging.getLogger("facecanon_data.track")
    result = run_track(ctx.source, ctx.subject, ctx.cfg, ctx.work, device=ctx.options.get("device"),
                       timestamps=ctx.upstream_figures("reconstruct")["kept"], progress=log.info)
    return result.figures()


def _describe_track(subject: str, f: Figures) -> str:
    line = (f"subject {subject}: tracked {f['timestamps_kept']}/{f['timestamps_in']} timestamps on {f['device']} "
            f"in {f['seconds']:.0f} s; CD-L1 median {f['cd_l1_mm_median']:.2f} mm over head points "
            f"({f['points_excluded_fraction']:.0%} excluded: neck, torso, far), landmarks "
            f"{f['landmark_px_median']:.2f} px; {f['outliers_removed']} outlier(s) removed")
    for key, why in f["outliers"].items():
        line += f"\n  removed {key}: {why}"
    if f.get("gt_vertex_error_mm_mean") is not None:
        line += f"\nground truth: mean face-vertex error {f['gt_vertex_error_mm_mean']:.2f} mm"
    if f.get("gt_canonical_vertex_error_mm_mean") is not None:
        line += f" (canonical mesh: {f['gt_canonical_vertex_error_mm_mean']:.2f} mm)"
    if f.get("gt_surface_error_mm_mean") is not None:
        line += f"\nground truth: face vertices {f['gt_surface_error_mm_mean']:.2f} mm from the true surface (mean)"
    return line


# -- canonicalize, render ----------------------------------------------------------------------


def _canonicalize(ctx: StageContext) -> Figures:
    from .canonicalize import run_canonicalize

    return asdict(run_canonicalize(ctx.source, ctx.subject, ctx.cfg, ctx.work))


def _describe_canonicalize(subject: str, f: Figures) -> str:
    return (f"subject {subject}: {f['points_total']} points of {f['timestamps']} timestamps canonicalized, median "
            f"distance to the tracked surface {f['distance_mm_median']:.2f} mm, {f['points_far']} far "
            f"({f['far_policy']})")


def _render(ctx: StageContext) -> Figures:
    from .render import run_render

    return run_render(ctx.source, ctx.subject, ctx.cfg, ctx.work).figures()


def _render_maps_present(ctx: StageContext, record: dict) -> bool:
    """The maps are there, or a light build removed them after ``write`` committed them and the store
    still holds that commit (so nothing will read them); otherwise render again before ``write``."""
    from ..artifacts import StageDir
    from .render import maps_present

    if maps_present(ctx.work, ctx.subject):
        return True
    written = StageDir(ctx.work, ctx.subject, "write").done()
    return (written is not None and written.get("upstream", {}).get("render") == StageDir(ctx.work, ctx.subject, "render").digest()
            and ctx.store is not None and _store_holds_this_commit(ctx, written))


def _describe_render(subject: str, f: Figures) -> str:
    line = (f"subject {subject}: {f['timestamps']} timestamps x {f['views']} views rendered ({f['ms_per_view']:.0f} ms "
            f"per view), valid fraction {f['valid_fraction']:.2%} of the head, cross-view canonical disagreement "
            f"{f['cross_view_canonical_mm']:.2f} mm ({f['cross_view_pairs']} pairs), {f['canonical_dtype']} storage "
            f"error {f['canonical_storage_error_mm']:.3f} mm")
    if f.get("gt_canonical_error_mm") is not None:
        line += (f"\nground truth: canonical error median {f['gt_canonical_error_mm']:.2f} mm "
                 f"(p90 {f['gt_canonical_error_mm_p90']:.2f}), depth AbsRel median {f['gt_depth_absrel']:.5f}")
    return line


# -- write -------------------------------------------------------------------------------------


def _write(ctx: StageContext) -> Figures:
    from .write import run_write

    return run_write(ctx.subject, ctx.cfg, ctx.work, ctx.store, stage_key=ctx.key, source=ctx.source)


def _store_path(ctx: StageContext) -> str:
    return str(ctx.store.resolve())


def _store_holds_this_commit(ctx: StageContext, record: dict) -> bool:
    """The store still holds the commit this marker recorded (not another build's, not nothing)."""
    from ..store import StoreError, subject_attrs

    try:
        return subject_attrs(ctx.store, ctx.subject).get("provenance", {}).get("stage_key") == record["key"]
    except StoreError:
        return False


def _describe_write(subject: str, f: Figures) -> str:
    return f"subject {subject}: {f['timestamps']} timestamps x {f['views']} views committed to {f['path']}"


# -- the chain ---------------------------------------------------------------------------------

CHAIN: tuple[Stage, ...] = check_chain((
    Stage("select", reads=(), sections=("capture", "select"), run=_select, describe=_describe_select,
          help="Pick timestamps: MediaPipe on the frontal camera, farthest-point sampling on expression + pose."),
    Stage("reconstruct", reads=("select",), sections=("capture", "reconstruct"), unit_sections=("capture", "reconstruct"),
          units=_reconstruct_units, check=_reconstruct_check, run_units=_reconstruct_run_units,
          finish=_reconstruct_finish, describe=_describe_reconstruct, replaced_by_option={"timestamps": "select"},
          options=(StageOption("timestamps", "--timestamps", "SEQ:FRAME[,SEQ:FRAME...] instead of the select "
                                                             "stage's picks."),),
          help="COLMAP with the calibrated cameras on each selected timestamp; keep those with all views registered."),
    Stage("track", reads=("reconstruct",), sections=("flame", "track"), run=_track,
          check=_track_check, describe=_describe_track, resources={"GPU": 1},
          options=(StageOption("device", "--device", "cpu | cuda (default: the pipeline's track.device, auto)."),),
          help="Fit FLAME to all kept timestamps jointly (one shape + static offsets), drop outlier timestamps."),
    Stage("canonicalize", reads=("track",), sections=("flame", "canonicalize"), run=_canonicalize,
          describe=_describe_canonicalize,
          help="Carry every reconstructed point into canonical space by its nearest tracked-surface deformation."),
    Stage("render", reads=("canonicalize",), sections=("render",), run=_render,
          still_present=_render_maps_present,
          describe=_describe_render, help="Per-view depth, canonical and validity maps, with label-quality figures."),
    Stage("write", reads=("select", "render"), sections=(), run=_write, describe=_describe_write,
          key_extra=_store_path, still_present=_store_holds_this_commit, needs_store=True,
          help="Commit a subject's stage outputs to the store (atomically, one writer per subject)."),
))
STAGES: dict[str, Stage] = {s.name: s for s in CHAIN}
