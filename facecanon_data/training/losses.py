"""Training targets and the losses of Sec. 3.2.

Targets (appendix 0.B.1): the sample's geometry is expressed in the first image's camera frame and
scaled so that the mean norm of the valid ground-truth 3-D points is 1. Depth and ray origins take that
scale; ray directions are unit vectors; canonical maps are FLAME metres x ``canonical_scale``.

Per output with prediction ``y_hat`` (B, N, C, H, W), target ``y``, confidence ``c`` > 1 and valid mask
``M`` (B, N, 1, H, W), averaged over the valid pixels ``|M|``:

  regression   L_reg  = 1/|M| sum_M ||y_hat - y||_1
  confidence   L_conf = 1/|M| sum_M ( c * ||y_hat - y||_1 - alpha * log c )
  gradient     L_grad = 1/|M_g| sum_{M_g} ||d/dx (y_hat - y)||_1 + ||d/dy (y_hat - y)||_1
               (finite differences between horizontally / vertically adjacent pixels both in M)

and the total is sum over outputs of w_o * (w_reg L_reg + w_conf L_conf + w_grad L_grad), w_canonical
being the paper's lambda. Depth and canonical maps count only where the store has labels; rays are
defined at every pixel. With ``loss.label_weight = "confidence"`` M becomes the stored label confidence
(a weight in [0, 1]; the sums above become weighted means) for L_reg and L_conf of depth and canonical.
"""
from __future__ import annotations

import torch

from .config import LossConfig


def sample_targets(sample: dict, canonical_scale: float) -> dict[str, torch.Tensor]:
    """Normalized targets for one loader sample (N images): see the module docstring.

    Returns depth (N, 1, H, W), ray (N, 6, H, W), canonical (N, 3, H, W), mask (N, 1, H, W) bool,
    ``scale`` (metres per normalized unit) and, when the sample carries the label confidence, ``weight``
    (N, 1, H, W) float32: the confidence, 0 where unlabelled.
    """
    depth, mask, k, w2c = sample["depth"], sample["mask"], sample["K"].double(), sample["world_2_cam"].double()
    n, _, h, w = depth.shape
    r, t = w2c[:, :3, :3], w2c[:, :3, 3]
    r0, t0 = r[0], t[0]
    # pixel rays in each camera: K^-1 [u, v, 1]; points in camera i: depth * that; into camera 0's frame
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], 0).reshape(3, -1)  # (3, H*W)
    cam_rays = torch.linalg.solve(k, pix.expand(n, 3, h * w))  # (N, 3, H*W), z = 1
    rel_r = r0 @ r.transpose(1, 2)  # camera i -> camera 0 rotation, (N, 3, 3)
    centres0 = (r0 @ (-r.transpose(1, 2) @ t[..., None]))[..., 0] + t0  # camera centres in camera 0, (N, 3)
    pts = (rel_r @ (cam_rays * depth.reshape(n, 1, -1).double())) + centres0[..., None]  # (N, 3, H*W)
    valid = mask.reshape(n, -1)
    norms = pts.norm(dim=1)[valid]
    scale = float(norms.mean()) if norms.numel() else 1.0
    dirs = rel_r @ cam_rays
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    origin = (centres0 / scale)[..., None].expand(n, 3, h * w)
    ray = torch.cat([origin, dirs], 1).reshape(n, 6, h, w).float()
    out = {"depth": (depth.double() / scale).float(), "ray": ray,
           "canonical": sample["canonical"] * canonical_scale, "mask": mask, "scale": scale}
    if "confidence" in sample:
        out["weight"] = sample["confidence"] * mask
    return out


def regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 over channels, mean over valid pixels. pred, target (..., C, H, W); mask (..., 1, H, W) bool, or
    float per-pixel weights (then a weighted mean)."""
    err = (pred - target).abs().sum(-3, keepdim=True)
    return _masked_mean(err, mask)


def confidence_loss(pred: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, mask: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """Confidence-weighted L1 with the log-confidence regularizer; conf (..., 1, H, W) > 0; mask as in
    :func:`regression_loss`."""
    err = (pred - target).abs().sum(-3, keepdim=True)
    return _masked_mean(conf * err - alpha * torch.log(conf), mask)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 of the difference of horizontal and vertical finite differences where both pixels are valid."""
    diff = pred - target
    gx = (diff[..., :, 1:] - diff[..., :, :-1]).abs().sum(-3, keepdim=True)
    gy = (diff[..., 1:, :] - diff[..., :-1, :]).abs().sum(-3, keepdim=True)
    mx = mask[..., :, 1:] & mask[..., :, :-1]
    my = mask[..., 1:, :] & mask[..., :-1, :]
    count = mx.sum() + my.sum()
    if count == 0:
        return pred.sum() * 0.0
    return ((gx * mx).sum() + (gy * my).sum()) / count


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    if count == 0:
        return x.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
    return (x * mask).sum() / count


def total_loss(pred: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], cfg: LossConfig
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the outputs present in ``pred``; returns the loss and its parts as floats for the log.
    With ``cfg.label_weight == "confidence"`` the depth and canonical L1 terms are means weighted by
    ``targets["weight"]`` (the gradient term keeps the plain mask: it compares neighbouring pixels)."""
    mask = targets["mask"]
    weighted = cfg.label_weight == "confidence"
    if weighted and "weight" not in targets:
        raise ValueError("loss.label_weight = 'confidence' but the sample has no label confidence "
                         "(load it with with_confidence=True)")
    total = pred[next(iter(pred))].sum() * 0.0
    parts: dict[str, float] = {}
    for name in ("depth", "ray", "canonical"):
        if name not in pred:
            continue
        m = torch.ones_like(mask) if name == "ray" else mask
        w = targets["weight"] if weighted and name != "ray" else m
        y_hat, y, c = pred[name], targets[name], pred[f"{name}_conf"]
        part = (cfg.regression * regression_loss(y_hat, y, w) + cfg.confidence * confidence_loss(y_hat, y, c, w, cfg.alpha)
                + cfg.gradient * gradient_loss(y_hat, y, m))
        parts[f"loss_{name}"] = float(part.detach())
        total = total + getattr(cfg, name) * part
    parts["loss"] = float(total.detach())
    return total, parts
