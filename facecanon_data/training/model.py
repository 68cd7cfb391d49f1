"""The predictor of Sec. 3.1: a DINOv2-style ViT over 1-16 images with alternating attention, DPT heads.

Shapes: a forward pass takes ``images`` (B, N, 3, H, W) float32 in [0, 1] (B samples of N images each,
H and W multiples of the patch size) and returns per output (B, N, C, H, W) maps:

  depth       (B, N, 1, H, W)  depth along each camera's axis, in the sample's normalized units (> 0)
  ray         (B, N, 6, H, W)  ray origin (3) and direction (3) in the first image's camera frame
  canonical   (B, N, 3, H, W)  FLAME canonical coordinates x ``loss.canonical_scale``
  *_conf      (B, N, 1, H, W)  confidence > 1 of each output

The backbone keeps DINOv2's parameter names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1/attn.qkv/attn.proj/ls1.gamma/norm2/mlp.fc1/mlp.fc2/ls2.gamma``, ``norm``), so a
DINOv2 state dict loads into it unchanged; the across-image blocks are ordinary DINOv2 blocks that see
the tokens of all the sample's images at once (as DA3 does), so they add no parameters. The first image
of each sample gets a learned ``reference_embed``: rays are predicted in its camera frame.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from ..errors import InputFileNotFound, InputValueError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_CHANNELS = {"depth": 1, "ray": 6, "canonical": 3}
PRETRAIN_GRID = 37  # DINOv2's pos_embed covers a 37 x 37 patch grid (518 px)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (DINOv2's layout)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio)), LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, h*w, C)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Backbone(nn.Module):
    """DINOv2-style ViT whose every ``global_every``-th block attends across the images of a sample."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID ** 2, cfg.dim))
        self.reference_embed = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.reference_embed, std=0.02)
        self.apply(_init_linear)

    def is_global(self, i: int) -> bool:
        return i % self.cfg.global_every == self.cfg.global_every - 1

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, C): the pretraining grid's embedding, bicubically resized to (h, w) as DINOv2 does."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if h == w == PRETRAIN_GRID:
            return self.pos_embed
        grid = grid.reshape(1, PRETRAIN_GRID, PRETRAIN_GRID, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(cls.dtype)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """images (B, N, 3, H, W) normalized -> the ``out_layers`` tokens, each (B, N, h*w, C), and (h, w)."""
        b, n, _, hh, ww = images.shape
        p = self.cfg.patch_size
        h, w = hh // p, ww // p
        x = self.patch_embed(images.flatten(0, 1))  # (B*N, h*w, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos_embed(h, w)
        x = x.view(b, n, 1 + h * w, -1)
        x = torch.cat([x[:, :1] + self.reference_embed, x[:, 1:]], dim=1)
        tokens = 1 + h * w
        outs: dict[int, torch.Tensor] = {}
        checkpoint = self.cfg.grad_checkpoint and self.training and images.is_cuda
        for i, blk in enumerate(self.blocks):
            # across-image blocks see all B samples' N x tokens sequences; per-image blocks one image each
            shape = (b, n * tokens, -1) if self.is_global(i) else (b * n, tokens, -1)
            y = x.reshape(shape)
            y = torch.utils.checkpoint.checkpoint(blk, y, use_reentrant=False) if checkpoint else blk(y)
            x = y.view(b, n, tokens, -1)
            if i in self.cfg.out_layers:
                outs[i] = self.norm(x[:, :, 1:])
        return [outs[i] for i in self.cfg.out_layers], (h, w)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


class ResidualConvUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT fusion: add the (refined) skip features, refine, upsample to the next scale, project."""

    def __init__(self, c: int, has_skip: bool = True):
        super().__init__()
        self.skip = ResidualConvUnit(c) if has_skip else None  # the coarsest block has nothing to add
        self.refine, self.out = ResidualConvUnit(c), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if self.skip is not None and skip is not None:
            x = x + self.skip(skip)
        x = F.interpolate(self.refine(x), size=size, mode="bilinear", align_corners=False)
        return self.out(x)


class DPTHead(nn.Module):
    """Dense prediction from four token maps (Ranftl et al. 2021): reassemble at 4x, 2x, 1x, 1/2x the
    patch grid, fuse coarse to fine, upsample to the image size; ``channels + 1`` outputs (the last is the
    confidence logit)."""

    def __init__(self, dim: int, features: int, widths: list[int], channels: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in widths)
        self.resize = nn.ModuleList([
            nn.ConvTranspose2d(widths[0], widths[0], 4, 4), nn.ConvTranspose2d(widths[1], widths[1], 2, 2),
            nn.Identity(), nn.Conv2d(widths[3], widths[3], 3, stride=2, padding=1)])
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in widths)
        self.fusion = nn.ModuleList(FusionBlock(features, has_skip=i < 3) for i in range(4))
        self.output = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, channels + 1, 1))

    def forward(self, tokens: list[torch.Tensor], grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """tokens: 4 x (M, h*w, C); returns (M, channels + 1, H, W)."""
        h, w = grid
        feats = []
        for i, t in enumerate(tokens):
            x = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
            feats.append(self.layer_rn[i](self.resize[i](self.project[i](x))))
        x = None
        for i in (3, 2, 1, 0):  # coarse to fine; each block ends at the next finer scale's size
            target = feats[i - 1].shape[-2:] if i > 0 else (4 * h * 2, 4 * w * 2)
            x = self.fusion[i](feats[i] if x is None else x, None if x is None else feats[i], tuple(target))
        x = self.output[0](x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.output[1:](x)


class FaceAnythingModel(nn.Module):
    """Backbone + one DPT head per output (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.heads = nn.ModuleDict({o: self._new_head(o) for o in cfg.outputs})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def _new_head(self, output: str) -> DPTHead:
        return DPTHead(self.cfg.dim, self.cfg.head_features, self.cfg.head_channels, OUTPUT_CHANNELS[output])

    def add_head(self, output: str) -> None:
        """Stage two of the paper's training: add e.g. the canonical head to a depth-only model."""
        if output not in self.heads:
            self.heads[output] = self._new_head(output).to(self.mean.device)
            self.cfg.outputs = list(self.heads)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, _, hh, ww = images.shape
        p = self.cfg.patch_size
        if hh % p or ww % p:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
        tokens, grid = self.backbone((images - self.mean) / self.std)
        flat = [t.flatten(0, 1) for t in tokens]
        out = {}
        for name, head in self.heads.items():
            y = head(flat, grid, (hh, ww)).float().view(b, n, -1, hh, ww)
            value, logit = y[:, :, :-1], y[:, :, -1:]
            if name == "depth":
                value = torch.exp(value.clamp(max=10.0))
            elif name == "ray":
                value = torch.cat([value[:, :, :3], F.normalize(value[:, :, 3:], dim=2)], dim=2)
            out[name] = value
            out[f"{name}_conf"] = 1.0 + torch.exp(logit.clamp(max=10.0))
        return out


def load_weights_only(path: Path, what: str):
    """``torch.load(weights_only=True)`` (no code in the file runs); any failure is an
    :class:`InputValueError` naming the file and the unpickler's own reason, without PyTorch's advice
    to retry with ``weights_only=False`` (which would run the file's code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler's errors are many; name the file
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln.split("error:", 1)[1].strip() for ln in lines if "WeightsUnpickler error:" in ln), None)
        if reason is None:
            reason = next((ln for ln in lines if "weights_only" not in ln and "Re-running" not in ln), type(exc).__name__)
        raise InputValueError(f"{path}: not {what} ({reason}); refused without running any code from it") from None


def load_pretrained_backbone(model: FaceAnythingModel, path: str | Path) -> list[str]:
    """Load a DINOv2-format state dict from a local file into the backbone (never a download).

    Accepts the raw state dict or one under ``model`` / ``state_dict`` / ``teacher``, with or without a
    ``backbone.`` prefix; keys DINOv2 has and we do not (``mask_token``, ``register_tokens``) are ignored.
    Loading uses ``torch.load(weights_only=True)``: no code in the file is executed. Returns the missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: pretrained backbone weights not found")
    state = load_weights_only(path, "a loadable weights-only state dict")
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    own = model.backbone.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise InputValueError(f"{path}: shapes differ from the configured backbone for {bad[:4]} "
                         f"(e.g. {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    usable = {k: v for k, v in state.items() if k in own}
    if not usable:
        raise InputValueError(f"{path}: no DINOv2 backbone keys found")
    missing = sorted(set(own) - set(usable))
    model.backbone.load_state_dict(usable, strict=False)
    return missing


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
