"""PNG figures of a model on one store sample: inputs, predicted and ground-truth depth and canonical
maps, and predicted correspondences between two images (lines, green within 5 px of the ground-truth
match, red otherwise)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import FaceCanonDataset, IndexFilter
from .evaluate import ModelPredictor, predict_sample
from ..errors import InputValueError


def _canonical_rgb(c: np.ndarray, valid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(H, W, 3) canonical points -> colours, the same box [lo, hi] for prediction and ground truth."""
    rgb = np.clip((c - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    rgb[~valid] = 1.0
    return rgb


def _dilate(x: np.ndarray, valid: np.ndarray, r: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sparse labels are dots: grow each by ``r`` pixels (from a labelled neighbour) so a figure shows them."""
    out, valid = x.copy(), valid.copy()
    for _ in range(r):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                take = np.roll(valid, (dy, dx), (0, 1)) & ~valid
                out[take] = np.roll(out, (dy, dx), (0, 1))[take]
                valid |= take
    return out, valid


def visualize(model, store: str, out: str | Path, subject: str, canonical_scale: float,
              resolution: tuple[int, int] = (112, 84), views: int = 4, t: int = 0, device: str = "cpu") -> list[Path]:
    """Write ``maps.png`` (one column per view) and ``correspondences.png`` into ``out``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = FaceCanonDataset(store, mode="views", images_per_sample=1, filter=IndexFilter(subjects=[subject]),
                          with_region=True)
    rows = ds.rows
    if len(rows["t"]) == 0:
        raise InputValueError(f"{store}: subject {subject} is not in the store")
    ts = sorted(set(rows["t"].tolist()))
    if t not in ts:
        raise InputValueError(f"{store}: subject {subject} has no timestamp index {t} (has {ts[0]}..{ts[-1]})")
    sel = np.nonzero(rows["t"] == t)[0]
    sel = sel[np.argsort(rows["v"][sel])][:views].tolist()
    h, w = resolution
    model.eval()
    pred, sample, maps = predict_sample(ModelPredictor(model, device, len(sel)), ds, sel, h, w, "views")
    n = len(sel)
    images = sample["image"].permute(0, 2, 3, 1).numpy()
    depth_gt, mask = sample["depth"][:, 0].numpy(), sample["mask"][:, 0].numpy()
    depth_pred = maps.depth
    gt_c = pred.gt_canonical * canonical_scale
    lo, hi = gt_c[mask].min(0), gt_c[mask].max(0)
    fig, axes = plt.subplots(5, n, figsize=(2.2 * n, 2.2 * 5 * h / w), squeeze=False)
    for j in range(n):
        region = pred.region[j]
        m = mask[j] & (depth_gt[j] > 0)
        s = np.median(depth_gt[j][m]) / np.median(depth_pred[j][m]) if m.sum() > 10 else 1.0
        vmin, vmax = (np.percentile(depth_gt[j][m], [2, 98]) if m.any() else (0, 1))
        d_gt, d_valid = _dilate(depth_gt[j], m)
        gt_c_dilated, c_valid = _dilate(gt_c[j], mask[j])
        panels = [
            (images[j], "input"),
            (np.where(region, s * depth_pred[j], np.nan), "depth (pred, aligned)"),
            (np.where(d_valid, d_gt, np.nan), "depth (store)"),
            (_canonical_rgb(pred.canonical[j], region, lo, hi), "canonical (pred)"),
            (_canonical_rgb(gt_c_dilated, c_valid, lo, hi), "canonical (store)"),
        ]
        for i, (img, title) in enumerate(panels):
            ax = axes[i, j]
            if img.ndim == 2:
                ax.imshow(img, cmap="turbo", vmin=vmin, vmax=vmax)
            else:
                ax.imshow(img)
            ax.set_axis_off()
            if j == 0:
                ax.set_title(title, fontsize=8, loc="left")
    fig.suptitle(f"subject {subject}, timestamp {t}", fontsize=9)
    fig.tight_layout()
    maps = out / "maps.png"
    fig.savefig(maps, dpi=110)
    plt.close(fig)
    corr = out / "correspondences.png"
    _correspondence_figure(pred, images, 0, min(1, n - 1), corr)
    return [maps, corr]


def _correspondence_figure(pred, images: np.ndarray, a: int, b: int, path: Path, lines: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.spatial import cKDTree

    h, w = images.shape[1:3]
    qa = np.argwhere(pred.mask[a])
    rng = np.random.default_rng(0)
    if len(qa) > lines:
        qa = qa[np.sort(rng.choice(len(qa), lines, replace=False))]
    region = np.argwhere(pred.region[b])
    fig, ax = plt.subplots(figsize=(5, 5 * h / (2 * w)))
    ax.imshow(np.concatenate([images[a], images[b]], 1))
    ax.set_axis_off()
    if len(qa) and len(region) and pred.mask[b].any():
        _, k = cKDTree(pred.canonical[b][region[:, 0], region[:, 1]]).query(pred.canonical[a][qa[:, 0], qa[:, 1]])
        pb = np.argwhere(pred.mask[b])
        _, g = cKDTree(pred.gt_canonical[b][pb[:, 0], pb[:, 1]]).query(pred.gt_canonical[a][qa[:, 0], qa[:, 1]])
        for p, q, gt in zip(qa, region[k], pb[g]):
            good = np.linalg.norm(q - gt) < 5
            ax.plot([p[1], q[1] + w], [p[0], q[0]], "-", color="lime" if good else "red", lw=0.6)
    ax.set_title(f"predicted correspondences image {a} -> {b} (green: < 5 px from ground truth)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)

