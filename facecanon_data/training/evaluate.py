"""Sec. 4.2's metrics on held-out subjects of a store: depth AbsRel / RMSE and 2-D correspondence EPE.

Depth: per image, over the pixels with a stored depth, the prediction (in the sample's normalized units)
is aligned to the ground truth by one scale, the ratio of medians ``s = median(gt) / median(pred)``
(the usual alignment for scale-ambiguous depth); then AbsRel = mean(|s pred - gt| / gt) and
RMSE = sqrt(mean((s pred - gt)^2)) in metres. Reported as means over images.

Correspondences (Eq. 2): for an image pair (A, B), a query pixel p of A with a stored canonical point has
the ground-truth match q, the pixel of B whose stored canonical point is nearest, when closer than
``gt_match_mm``; the predicted match is the pixel of B whose *predicted* canonical point is nearest to
A's predicted canonical point at p (scipy's cKDTree), searched over B's face region. EPE = |q_hat - q| in
pixels of the evaluation resolution; also the fractions under 3, 5 and 10 px. The face region (the
paper uses Facer face + hair masks) is here the filled convex hull of B's labelled pixels, which the
store has for every image. Pairs: the same camera at ``margin`` kept timestamps apart within a sequence
(frame order), and, with ``cross_view``, two cameras at one timestamp (reported as margin 0).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .config import EvalConfig
from .dataset import FaceCanonDataset, IndexFilter
from ..errors import InputValueError

log = logging.getLogger(__name__)
THRESHOLDS_PX = (3, 5, 10)


@dataclass
class Prediction:
    """Per image of one forward pass at the evaluation resolution (H, W)."""

    canonical: np.ndarray  # (N, H, W, 3) predicted, in canonical_scale units
    gt_canonical: np.ndarray  # (N, H, W, 3) stored, metres
    mask: np.ndarray  # (N, H, W) bool


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
    ds = FaceCanonDataset(store, mode="views", images_per_sample=1, filter=IndexFilter(subjects=subjects))
    rows = ds.rows
    present = sorted(set(map(str, rows["subject"])))
    missing = sorted(set(subjects) - set(present))
    if not present:
        raise InputValueError(f"{store}: none of the evaluation subjects {subjects} is in the store")
    h, w = cfg.resolution
    model.eval()
    depth_abs, depth_rmse = [], []
    pairs: dict[int, list[tuple[Prediction, int, int]]] = {}
    for subject in present:
        keep = rows["subject"] == subject
        if subject in seq_filter:
            keep &= np.isin(rows["sequence"], seq_filter[subject])
        ids = np.nonzero(keep)[0]
        # multi-view samples: one timestamp, views in chunks of views_per_sample
        for t in sorted(set(rows["t"][ids].tolist())):
            at_t = ids[rows["t"][ids] == t]
            at_t = at_t[np.argsort(rows["v"][at_t])]
            for start in range(0, len(at_t), cfg.views_per_sample):
                chunk = at_t[start:start + cfg.views_per_sample].tolist()
                pred, sample, out = forward_sample(model, ds, chunk, h, w, device)
                a, r = depth_errors(out["depth"][0, :, 0].cpu().numpy(), sample["depth"][:, 0].numpy(),
                                    sample["mask"][:, 0].numpy())
                depth_abs += a
                depth_rmse += r
                if cfg.cross_view:
                    pairs.setdefault(0, []).extend((pred, i, i + 1) for i in range(len(chunk) - 1))
        # single-camera samples: each sequence's kept timestamps in frame order
        for v in sorted(set(rows["v"][ids].tolist())):
            for seq in sorted(set(rows["sequence"][ids].tolist())):
                sel = ids[(rows["v"][ids] == v) & (rows["sequence"][ids] == seq)]
                sel = sel[np.argsort(rows["frame"][sel])]
                if len(sel) < 2 or not any(m < len(sel) for m in cfg.margins):
                    continue
                for start in range(0, len(sel), 16):
                    chunk = sel[start:start + 16].tolist()
                    if len(chunk) < 2:
                        continue
                    pred, _, _ = forward_sample(model, ds, chunk, h, w, device)
                    for m in cfg.margins:
                        pairs.setdefault(m, []).extend((pred, i, i + m) for i in range(len(chunk) - m))
    rng = np.random.default_rng(cfg.seed)
    by_margin = {}
    all_epe = []
    for m in sorted(pairs):
        chosen = pairs[m]
        if len(chosen) > cfg.max_pairs:
            chosen = [chosen[i] for i in np.sort(rng.choice(len(chosen), cfg.max_pairs, replace=False))]
        errors = [correspondence_errors(p, i, j, cfg.gt_match_mm, cfg.max_queries, rng)
                  for p, i, j in chosen]
        e = np.concatenate(errors) if errors else np.zeros(0)
        all_epe.append(e)
        by_margin[str(m)] = _epe_summary(e, len(chosen))
    epe = np.concatenate(all_epe) if all_epe else np.zeros(0)
    overall = _epe_summary(epe, sum(len(p) for p in pairs.values()))
    return {
        "subjects": present, "missing_subjects": missing, "resolution": [h, w],
        "depth_absrel": float(np.mean(depth_abs)) if depth_abs else float("nan"),
        "depth_rmse_m": float(np.mean(depth_rmse)) if depth_rmse else float("nan"),
        "depth_images": len(depth_abs), "depth_alignment": "per-image median scale",
        "epe": overall.pop("epe_px"), **{f"epe_{k}": v for k, v in overall.items()},
        "margins": by_margin,
    }


@torch.no_grad()
def forward_sample(model, ds: FaceCanonDataset, rows: list[int], h: int, w: int, device: str):
    sample = ds.load(rows, h, w)
    images = sample["image"][None].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        out = model(images)
    if "canonical" in out:
        canon = out["canonical"][0].float().permute(0, 2, 3, 1).cpu().numpy()
    else:
        canon = np.zeros((len(rows), h, w, 3), np.float32)
    pred = Prediction(canonical=canon, gt_canonical=sample["canonical"].permute(0, 2, 3, 1).numpy(),
                      mask=sample["mask"][:, 0].numpy())
    return pred, sample, out


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


def face_region(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the filled convex hull of the labelled pixels (the evaluation's face region)."""
    import cv2

    ys, xs = np.nonzero(mask)
    region = np.zeros(mask.shape, np.uint8)
    if len(ys) >= 3:
        hull = cv2.convexHull(np.stack([xs, ys], 1).astype(np.int32))
        cv2.fillConvexPoly(region, hull, 1)
    return region.astype(bool) | mask


def correspondence_errors(pred: Prediction, a: int, b: int, gt_match_mm: float,
                          max_queries: int, rng: np.random.Generator) -> np.ndarray:
    """End-point errors (pixels) of predicted matches A -> B for A's labelled pixels with a GT match."""
    from scipy.spatial import cKDTree

    ma, mb = pred.mask[a], pred.mask[b]
    qa = np.argwhere(ma)  # (P, 2) rows, cols
    pb = np.argwhere(mb)
    if len(qa) == 0 or len(pb) == 0:
        return np.zeros(0)
    if len(qa) > max_queries:
        qa = qa[np.sort(rng.choice(len(qa), max_queries, replace=False))]
    dist, j = cKDTree(pred.gt_canonical[b][mb]).query(pred.gt_canonical[a][qa[:, 0], qa[:, 1]])
    ok = dist <= gt_match_mm / 1000.0
    if not ok.any():
        return np.zeros(0)
    qa, target = qa[ok], pb[j[ok]]
    region = np.argwhere(face_region(mb))
    _, k = cKDTree(pred.canonical[b][region[:, 0], region[:, 1]]).query(pred.canonical[a][qa[:, 0], qa[:, 1]])
    return np.linalg.norm((region[k] - target).astype(np.float64), axis=1)


def _epe_summary(e: np.ndarray, pairs: int) -> dict:
    out = {"epe_px": float(e.mean()) if len(e) else float("nan"), "correspondences": int(len(e)), "pairs": pairs}
    for t in THRESHOLDS_PX:
        out[f"under_{t}px"] = float((e < t).mean()) if len(e) else float("nan")
    return out

