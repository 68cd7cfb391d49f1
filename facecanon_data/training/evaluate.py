"""The paper's evaluation protocol (Sec. 4.1-4.2 and appendix of ``000_…``) on held-out subjects of a store.

What is evaluated: per subject, the sequences of the protocol (its manifest's filter, else all) and in each
the timestamps whose frame number is below ``first_frames`` (the paper: the first 40 frames of each test
sequence; build test subjects with ``select.timestamps = "first:40"`` so these are all stored).

Region: every figure is restricted to the stored ``region`` map's face + hair codes
(:mod:`facecanon_data.regions`, the stand-in for the paper's Facer face + hair masks).

Depth (Tab. 1, Tab. 7): per image, over the labelled pixels of the region, the prediction (in the
sample's normalized units) is aligned to the ground truth by one scale, ``s = median(gt) / median(pred)``;
AbsRel = mean(|s pred - gt| / gt), RMSE = sqrt(mean((s pred - gt)^2)) in metres; means over images.
*Monocular*: each frontal-camera image alone (one image in). *Multi-view*: all views of a timestamp in
together (``views_per_sample`` at most per forward pass), the figure over all of their images.

Correspondences (Eq. 2, Tab. 2 and 4): frontal-camera frame pairs (f, f + m) of one sequence, both
stored, for each margin m in **frames** (V-DPM's definition). The frontal frames of a sequence are
predicted together, ``views_per_sample`` per forward pass; canonical maps are comparable across passes.
For a labelled query pixel p of A in the region, the ground-truth match q is the labelled region pixel of
B whose stored canonical point is nearest (accepted within ``gt_match_mm``); the predicted match q̂ is the
region pixel of B whose *predicted* canonical point is nearest to A's predicted one at p. EPE (2D) =
|q̂ - q| in pixels of the evaluation resolution, with the fractions under 3, 5 and 10 px. CCE (the
forward-backward cycle error, Tab. 3) follows q̂ back to A the same way: |p̂ - p| pixels. The "1-10" column
is the mean of the per-margin EPEs over ``margins_average``. ``cross_view`` adds two cameras at one
timestamp (margin 0), which the paper does not report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import EvalConfig
from .dataset import FaceCanonDataset, IndexFilter
from ..errors import InputValueError
from ..regions import eval_region

log = logging.getLogger(__name__)
THRESHOLDS_PX = (3, 5, 10)


@dataclass
class Prediction:
    """Per image of one or more forward passes at the evaluation resolution (H, W)."""

    canonical: np.ndarray  # (N, H, W, 3) predicted, in the model's own canonical units and frame
    gt_canonical: np.ndarray  # (N, H, W, 3) stored, metres
    mask: np.ndarray  # (N, H, W) bool: labelled
    region: np.ndarray  # (N, H, W) bool: the evaluation region (face + hair)
    valid: np.ndarray | None = None  # (N, H, W) bool: where the model predicted anything (None: everywhere)

    def predicted(self, i: int) -> np.ndarray:
        return np.ones(self.mask.shape[1:], bool) if self.valid is None else self.valid[i]


@dataclass
class PredictedMaps:
    """What a model says about some images, at the evaluation resolution (H, W)."""

    depth: np.ndarray  # (N, H, W) float32, any positive scale (aligned per image); NaN where not predicted
    canonical: np.ndarray  # (N, H, W, 3) float32, the model's own canonical units and frame
    valid: np.ndarray  # (N, H, W) bool: predicted


# A predictor answers for some index rows of a store: (dataset, rows, loaded sample, kind) -> PredictedMaps.
# kind is "views" (one timestamp's views in one pass: multi-view depth, cross-view pairs), "monocular"
# (one frontal image alone) or "frames" (one camera's frames of one sequence, in frame order).
Predictor = Callable[[FaceCanonDataset, list, dict, str], PredictedMaps]


class ModelPredictor:
    """The bundled model in process: "views" and "monocular" are one forward pass of the given images,
    "frames" are passes of ``per_pass`` consecutive frames (canonical maps are comparable across passes)."""

    def __init__(self, model, device: str, per_pass: int):
        self.model, self.device, self.per_pass = model, device, per_pass

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = images[None].to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            out = self.model(images)
        n, _, h, w = images.shape[1:]
        depth = out["depth"][0, :, 0].float().cpu().numpy()
        canon = (out["canonical"][0].float().permute(0, 2, 3, 1).cpu().numpy() if "canonical" in out
                 else np.zeros((n, h, w, 3), np.float32))
        return depth, canon

    def __call__(self, ds: FaceCanonDataset, rows: list, sample: dict, kind: str) -> PredictedMaps:
        step = self.per_pass if kind == "frames" else len(rows)
        parts = [self._forward(sample["image"][i:i + step]) for i in range(0, len(rows), step)]
        depth, canon = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
        return PredictedMaps(depth=depth, canonical=canon, valid=np.ones(depth.shape, bool))


def evaluation_subjects(cfg: EvalConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Subjects (and per-subject sequence filters) from the protocol's list or manifest."""
    if cfg.manifest:
        from ..manifest import read_manifest
        from ..paths import expand

        entries = read_manifest(expand(cfg.manifest))
        return [e.subject for e in entries], {e.subject: list(e.sequences) for e in entries if e.sequences}
    return list(cfg.subjects), {}


def protocol_dataset(store: str, cfg: EvalConfig) -> tuple[FaceCanonDataset, dict[str, np.ndarray], list[str]]:
    """The store's evaluated views: (dataset with region maps, {subject: index rows of its evaluated
    timestamps}, missing subjects). Raises naming the store when no subject is there or the frontal
    camera is missing."""
    subjects, seq_filter = evaluation_subjects(cfg)
    ds = FaceCanonDataset(store, mode="views", images_per_sample=1, filter=IndexFilter(subjects=subjects),
                          with_region=True)
    rows = ds.rows
    present = sorted(set(map(str, rows["subject"])))
    if not present:
        raise InputValueError(f"{store}: none of the evaluation subjects {subjects} is in the store")
    views = {}
    for subject in present:
        keep = (rows["subject"] == subject) & (rows["frame"] < cfg.first_frames)
        if subject in seq_filter:
            keep &= np.isin(rows["sequence"], seq_filter[subject])
        ids = np.nonzero(keep)[0]
        if len(ids) and not (rows["serial"][ids] == cfg.frontal_serial).any():
            raise InputValueError(f"{store}: subject {subject} has no view of the frontal camera {cfg.frontal_serial} "
                                  f"(protocol {cfg.source_file or cfg.name}: frontal_serial)")
        views[subject] = ids
    return ds, views, sorted(set(subjects) - set(present))


def camera_frames(ds: FaceCanonDataset, ids: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """{(sequence, serial): index rows in frame order} of one subject's evaluated views ``ids``."""
    rows = ds.rows
    out = {}
    for seq, serial in sorted(set(zip(rows["sequence"][ids].tolist(), rows["serial"][ids].tolist()))):
        sel = ids[(rows["sequence"][ids] == seq) & (rows["serial"][ids] == serial)]
        out[(str(seq), str(serial))] = sel[np.argsort(rows["frame"][sel], kind="stable")]
    return out


def evaluate_model(model, store: str, cfg: EvalConfig, device: str = "cpu") -> dict:
    """Run the protocol on the bundled model in process; returns a JSON-ready dict of the metrics."""
    model.eval()
    return run_protocol(ModelPredictor(model, device, cfg.views_per_sample), store, cfg)


def run_protocol(predictor: Predictor, store: str, cfg: EvalConfig) -> dict:
    """The protocol (see module docstring) on any predictor: the bundled model in process
    (:class:`ModelPredictor`) or predictions read from files (:mod:`.predictions`)."""
    ds, views, missing = protocol_dataset(store, cfg)
    rows = ds.rows
    h, w = cfg.resolution
    mono, multi = ([], []), ([], [])  # (absrel, rmse) per image
    frontal_frames = 0
    pairs: dict[int, list[tuple[Prediction, int, int]]] = {}
    for subject, ids in views.items():
        for t in sorted(set(rows["t"][ids].tolist())):  # multi-view depth: all views of a timestamp in
            at_t = ids[rows["t"][ids] == t]
            at_t = at_t[np.argsort(rows["v"][at_t])]
            for start in range(0, len(at_t), cfg.views_per_sample):
                chunk = at_t[start:start + cfg.views_per_sample].tolist()
                pred, sample, maps = predict_sample(predictor, ds, chunk, h, w, "views")
                _extend(multi, depth_errors(maps.depth, sample["depth"][:, 0].numpy(), pred.mask & pred.region))
                if cfg.cross_view:
                    pairs.setdefault(0, []).extend((pred, i, i + 1) for i in range(len(chunk) - 1))
        frontal = ids[rows["serial"][ids] == cfg.frontal_serial]
        frontal_frames += len(frontal)
        for i in frontal.tolist():  # monocular depth: one image in
            pred, sample, maps = predict_sample(predictor, ds, [i], h, w, "monocular")
            _extend(mono, depth_errors(maps.depth, sample["depth"][:, 0].numpy(), pred.mask & pred.region))
        for (seq, serial), sel in camera_frames(ds, frontal).items():  # correspondences: frontal frame pairs
            pred = predict_sample(predictor, ds, sel.tolist(), h, w, "frames")[0]
            frames = rows["frame"][sel].tolist()
            for m in sorted(set(cfg.margins) | set(_average_range(cfg))):
                pairs.setdefault(m, []).extend((pred, a, b) for a, b in frame_pairs(frames, m))
    rng = np.random.default_rng(cfg.seed)
    by_margin = {}
    for m in sorted(pairs):
        chosen = pairs[m]
        if len(chosen) > cfg.max_pairs:
            chosen = [chosen[i] for i in np.sort(rng.choice(len(chosen), cfg.max_pairs, replace=False))]
        results = [correspondence_errors(p, i, j, cfg.gt_match_mm, cfg.max_queries, rng) for p, i, j in chosen]
        by_margin[str(m)] = epe_summary(np.concatenate([r[0] for r in results]) if results else np.zeros(0),
                                        np.concatenate([r[1] for r in results]) if results else np.zeros(0),
                                        len(chosen))
    for m in cfg.margins:
        if by_margin.get(str(m), {}).get("pairs", 0) == 0:
            log.warning("margin %d: no frontal-camera frame pair %d frames apart among the evaluated frames", m, m)
    out = {
        "subjects": list(views), "missing_subjects": missing, "resolution": [h, w], "frontal_serial": cfg.frontal_serial,
        "first_frames": cfg.first_frames, "frontal_frames": frontal_frames, "region": "face + hair (region map)",
        "depth": {"monocular": _depth_summary(mono), "multi_view": _depth_summary(multi)},
        "depth_alignment": "per-image median scale", "margins": by_margin, "margins_reported": list(cfg.margins),
    }
    average = _average_range(cfg)
    if average:
        epes = [by_margin[str(m)]["epe_px"] for m in average if by_margin.get(str(m), {}).get("pairs")]
        out["epe_average"] = {"margins": f"{average[0]}-{average[-1]}", "epe_px": float(np.mean(epes)) if epes else float("nan"),
                              "margins_with_pairs": len(epes)}
    return out


def _average_range(cfg: EvalConfig) -> list[int]:
    return list(range(cfg.margins_average[0], cfg.margins_average[1] + 1)) if cfg.margins_average else []


def frame_pairs(frames: list[int], margin: int) -> list[tuple[int, int]]:
    """(a, b) positions into ``frames`` whose frame numbers differ by exactly ``margin`` (a before b)."""
    where = {f: i for i, f in enumerate(frames)}
    return [(i, where[f + margin]) for i, f in enumerate(frames) if f + margin in where]


def _depth(out: dict) -> np.ndarray:
    return out["depth"][0, :, 0].float().cpu().numpy()


def _extend(acc: tuple[list, list], errors: tuple[list, list]) -> None:
    acc[0].extend(errors[0])
    acc[1].extend(errors[1])


def _depth_summary(acc: tuple[list, list]) -> dict:
    absrel, rmse = acc
    return {"absrel": float(np.mean(absrel)) if absrel else float("nan"),
            "rmse_m": float(np.mean(rmse)) if rmse else float("nan"), "images": len(absrel)}


def predict_sample(predictor: Predictor, ds: FaceCanonDataset, rows: list[int], h: int, w: int, kind: str
                   ) -> tuple[Prediction, dict, PredictedMaps]:
    """Load ``rows`` at (h, w) and ask the predictor about them: (Prediction, the loaded sample, the maps)."""
    sample = ds.load(rows, h, w)
    maps = predictor(ds, rows, sample, kind)
    if maps.depth.shape != (len(rows), h, w) or maps.canonical.shape != (len(rows), h, w, 3):
        raise InputValueError(f"predictor returned depth {maps.depth.shape} and canonical {maps.canonical.shape} "
                              f"for {len(rows)} images at {h}x{w}")
    mask = sample["mask"][:, 0].numpy()
    region = eval_region(sample["region"].numpy()) if "region" in sample else face_region_of_labels(mask)
    pred = Prediction(canonical=maps.canonical, gt_canonical=sample["canonical"].permute(0, 2, 3, 1).numpy(),
                      mask=mask, region=region, valid=None if maps.valid.all() else maps.valid)
    return pred, sample, maps


def depth_errors(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> tuple[list[float], list[float]]:
    """Per image AbsRel and RMSE (metres) after median scale alignment. pred, gt (N, H, W); mask bool."""
    absrel, rmse = [], []
    for p, g, m in zip(pred, gt, mask):
        m = m & (g > 0) & np.isfinite(p) & (p > 0)
        if m.sum() < 10:
            continue
        s = np.median(g[m]) / np.median(p[m])
        d = s * p[m] - g[m]
        absrel.append(float(np.mean(np.abs(d) / g[m])))
        rmse.append(float(np.sqrt(np.mean(d * d))))
    return absrel, rmse


def face_region_of_labels(mask: np.ndarray) -> np.ndarray:
    """(..., H, W) bool: the filled convex hull of each image's labelled pixels (a store's images without
    a region map, e.g. for the visualization)."""
    import cv2

    if mask.ndim == 3:
        return np.stack([face_region_of_labels(m) for m in mask])
    ys, xs = np.nonzero(mask)
    region = np.zeros(mask.shape, np.uint8)
    if len(ys) >= 3:
        hull = cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32))
        cv2.fillConvexPoly(region, hull, 1)
    return region.astype(bool) | mask


def correspondence_errors(pred: Prediction, a: int, b: int, gt_match_mm: float,
                          max_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(EPE, CCE) in pixels of predicted matches A -> B for A's labelled region pixels with a GT match;
    NaN for a query where the model predicted nothing (at the query pixel, or nowhere in B's region)."""
    from scipy.spatial import cKDTree

    labelled_a, labelled_b = pred.mask[a] & pred.region[a], pred.mask[b] & pred.region[b]
    qa, pb = np.argwhere(labelled_a), np.argwhere(labelled_b)  # (P, 2) rows, cols
    none = (np.zeros(0), np.zeros(0))
    if len(qa) == 0 or len(pb) == 0:
        return none
    if len(qa) > max_queries:
        qa = qa[np.sort(rng.choice(len(qa), max_queries, replace=False))]
    dist, j = cKDTree(pred.gt_canonical[b][labelled_b]).query(pred.gt_canonical[a][qa[:, 0], qa[:, 1]])
    ok = dist <= gt_match_mm / 1000.0
    if not ok.any():
        return none
    qa, target = qa[ok], pb[j[ok]]
    epe, cce = np.full(len(qa), np.nan), np.full(len(qa), np.nan)
    region_a = np.argwhere(pred.region[a] & pred.predicted(a))
    region_b = np.argwhere(pred.region[b] & pred.predicted(b))
    asked = pred.predicted(a)[qa[:, 0], qa[:, 1]]
    if len(region_a) == 0 or len(region_b) == 0 or not asked.any():
        return epe, cce
    _, k = cKDTree(pred.canonical[b][region_b[:, 0], region_b[:, 1]]).query(pred.canonical[a][qa[asked, 0], qa[asked, 1]])
    hat = region_b[k]
    _, back = cKDTree(pred.canonical[a][region_a[:, 0], region_a[:, 1]]).query(pred.canonical[b][hat[:, 0], hat[:, 1]])
    epe[asked] = np.linalg.norm((hat - target[asked]).astype(np.float64), axis=1)
    cce[asked] = np.linalg.norm((region_a[back] - qa[asked]).astype(np.float64), axis=1)
    return epe, cce


def epe_summary(epe: np.ndarray, cce: np.ndarray, pairs: int) -> dict:
    """Means and threshold fractions over the queries the model answered (NaN entries: it predicted
    nothing there; their share is ``unanswered``)."""
    answered = np.isfinite(epe)
    epe, cce = epe[answered], cce[np.isfinite(cce)]
    out = {"epe_px": float(epe.mean()) if len(epe) else float("nan"), "cce_px": float(cce.mean()) if len(cce) else float("nan"),
           "correspondences": int(len(epe)), "pairs": pairs}
    for t in THRESHOLDS_PX:
        out[f"under_{t}px"] = float((epe < t).mean()) if len(epe) else float("nan")
    if not answered.all():
        out["unanswered"] = float(1 - answered.mean())
    return out
