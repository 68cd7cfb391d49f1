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

    canonical: np.ndarray  # (N, H, W, 3) predicted, in canonical_scale units
    gt_canonical: np.ndarray  # (N, H, W, 3) stored, metres
    mask: np.ndarray  # (N, H, W) bool: labelled
    region: np.ndarray  # (N, H, W) bool: the evaluation region (face + hair)


def evaluation_subjects(cfg: EvalConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Subjects (and per-subject sequence filters) from the protocol's list or manifest."""
    if cfg.manifest:
        from ..manifest import read_manifest
        from ..paths import expand

        entries = read_manifest(expand(cfg.manifest))
        return [e.subject for e in entries], {e.subject: list(e.sequences) for e in entries if e.sequences}
    return list(cfg.subjects), {}


def evaluate_model(model, store: str, cfg: EvalConfig, device: str = "cpu") -> dict:
    """Run the protocol; returns a JSON-ready dict of the metrics (see module docstring)."""
    subjects, seq_filter = evaluation_subjects(cfg)
    ds = FaceCanonDataset(store, mode="views", images_per_sample=1, filter=IndexFilter(subjects=subjects),
                          with_region=True)
    rows = ds.rows
    present = sorted(set(map(str, rows["subject"])))
    missing = sorted(set(subjects) - set(present))
    if not present:
        raise InputValueError(f"{store}: none of the evaluation subjects {subjects} is in the store")
    h, w = cfg.resolution
    model.eval()
    mono, multi = ([], []), ([], [])  # (absrel, rmse) per image
    frontal_frames = 0
    pairs: dict[int, list[tuple[Prediction, int, int]]] = {}
    for subject in present:
        keep = (rows["subject"] == subject) & (rows["frame"] < cfg.first_frames)
        if subject in seq_filter:
            keep &= np.isin(rows["sequence"], seq_filter[subject])
        ids = np.nonzero(keep)[0]
        for t in sorted(set(rows["t"][ids].tolist())):  # multi-view depth: all views of a timestamp in
            at_t = ids[rows["t"][ids] == t]
            at_t = at_t[np.argsort(rows["v"][at_t])]
            for start in range(0, len(at_t), cfg.views_per_sample):
                chunk = at_t[start:start + cfg.views_per_sample].tolist()
                pred, sample, out = forward_sample(model, ds, chunk, h, w, device)
                _extend(multi, depth_errors(_depth(out), sample["depth"][:, 0].numpy(), pred.mask & pred.region))
                if cfg.cross_view:
                    pairs.setdefault(0, []).extend((pred, i, i + 1) for i in range(len(chunk) - 1))
        frontal = ids[rows["serial"][ids] == cfg.frontal_serial]
        if len(ids) and not len(frontal):
            raise InputValueError(f"{store}: subject {subject} has no view of the frontal camera {cfg.frontal_serial} "
                                  f"(protocol {cfg.source_file or cfg.name}: frontal_serial)")
        frontal_frames += len(frontal)
        for i in frontal.tolist():  # monocular depth: one image in
            pred, sample, out = forward_sample(model, ds, [i], h, w, device)
            _extend(mono, depth_errors(_depth(out), sample["depth"][:, 0].numpy(), pred.mask & pred.region))
        for seq in sorted(set(rows["sequence"][frontal].tolist())):  # correspondences: frontal frame pairs
            sel = frontal[rows["sequence"][frontal] == seq]
            sel = sel[np.argsort(rows["frame"][sel])]
            pred = predict_frames(model, ds, sel.tolist(), h, w, device, cfg.views_per_sample)
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
        "subjects": present, "missing_subjects": missing, "resolution": [h, w], "frontal_serial": cfg.frontal_serial,
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


@torch.no_grad()
def forward_sample(model, ds: FaceCanonDataset, rows: list[int], h: int, w: int, device: str):
    """One forward pass over the given index rows: (Prediction, the loaded sample, the model's output)."""
    sample = ds.load(rows, h, w)
    images = sample["image"][None].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        out = model(images)
    if "canonical" in out:
        canon = out["canonical"][0].float().permute(0, 2, 3, 1).cpu().numpy()
    else:
        canon = np.zeros((len(rows), h, w, 3), np.float32)
    mask = sample["mask"][:, 0].numpy()
    region = eval_region(sample["region"].numpy()) if "region" in sample else face_region_of_labels(mask)
    pred = Prediction(canonical=canon, gt_canonical=sample["canonical"].permute(0, 2, 3, 1).numpy(),
                      mask=mask, region=region)
    return pred, sample, out


def predict_frames(model, ds: FaceCanonDataset, rows: list[int], h: int, w: int, device: str,
                   per_pass: int) -> Prediction:
    """Predictions for ``rows`` (frames of one camera, in order), ``per_pass`` images per forward pass."""
    parts = [forward_sample(model, ds, rows[i:i + per_pass], h, w, device)[0] for i in range(0, len(rows), per_pass)]
    return Prediction(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("canonical", "gt_canonical",
                                                                                  "mask", "region")))


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
    """(EPE, CCE) in pixels of predicted matches A -> B for A's labelled region pixels with a GT match."""
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
    region_a, region_b = np.argwhere(pred.region[a]), np.argwhere(pred.region[b])
    _, k = cKDTree(pred.canonical[b][region_b[:, 0], region_b[:, 1]]).query(pred.canonical[a][qa[:, 0], qa[:, 1]])
    hat = region_b[k]
    _, back = cKDTree(pred.canonical[a][region_a[:, 0], region_a[:, 1]]).query(pred.canonical[b][hat[:, 0], hat[:, 1]])
    epe = np.linalg.norm((hat - target).astype(np.float64), axis=1)
    cce = np.linalg.norm((region_a[back] - qa).astype(np.float64), axis=1)
    return epe, cce


def epe_summary(epe: np.ndarray, cce: np.ndarray, pairs: int) -> dict:
    out = {"epe_px": float(epe.mean()) if len(epe) else float("nan"), "cce_px": float(cce.mean()) if len(cce) else float("nan"),
           "correspondences": int(len(epe)), "pairs": pairs}
    for t in THRESHOLDS_PX:
        out[f"under_{t}px"] = float((epe < t).mean()) if len(epe) else float("nan")
    return out
