"""Typed configuration of the bundled trainer (``pipelines/train_*.toml``) and of an evaluation protocol
(``pipelines/eval_*.toml``). Every default lives here; the TOML files only override (same strict rules
as the pipeline files: unknown keys and wrong types are errors naming the file and the key)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cameras import FRONTAL_SERIAL
from ..config import ConfigError, load_toml_config, opt

OUTPUTS = ("depth", "ray", "canonical")


@dataclass
class ModelConfig:
    """A DINOv2-style ViT (patch 14) with alternating per-image / across-image attention, DPT heads."""

    patch_size: int = opt(14, "ViT patch size in pixels")
    dim: int = opt(96, "token width (ViT-S 384, ViT-L 1024)")
    depth: int = opt(6, "transformer blocks")
    heads: int = opt(3, "attention heads per block")
    mlp_ratio: float = opt(4.0, "MLP width / token width")
    global_every: int = opt(
        2,
        "block i attends across the sample's images when i % global_every == global_every - 1")
    out_layers: list[int] = opt(factory=lambda: [1, 3, 4, 5], help="blocks feeding the DPT heads")
    head_features: int = opt(48, "DPT fusion width")
    head_channels: list[int] = opt(factory=lambda: [24, 48, 96, 96], help="DPT reassemble widths")
    outputs: list[str] = opt(factory=lambda: list(OUTPUTS), help="heads present in the model")
    pretrained: str = opt("", "local DINOv2-format backbone state dict (.pt / .pth), never a hub")
    init_from: str = opt("", "a checkpoint whose matching weights start training (e.g. depth-only stage 1)")
    grad_checkpoint: bool = opt(True, "activation checkpointing per block (CUDA only)")


@dataclass
class DataConfig:
    store: str = opt("", "the dataset store (``train --store`` overrides)")
    subjects: list[str] = opt(factory=list, help="empty: every subject not excluded")
    exclude_subjects: list[str] = opt(factory=list, help="held-out subjects, never trained on")
    modes: list[str] = opt(factory=lambda: ["views", "time"], help="alternated batch by batch")
    images_per_sample: list[int] = opt(factory=lambda: [2, 4], help="(min, max) per sample")
    resolutions: list[list[int]] = opt(factory=lambda: [[112, 84]], help="(height, width), x patch")
    batch_size: int = opt(2, "samples per micro-batch (per rank)")
    color_jitter: float = opt(0.2, "joint brightness / contrast / saturation jitter (0: off)")
    num_workers: int = opt(0, "DataLoader worker processes")
    min_valid_fraction: float = opt(0.0, "index filter (0: off)")
    max_cd_l1_mm: float = opt(0.0, "index filter on tracking quality (0: off)")
    on_bad_view: str = opt(
        "raise",
        "a view failing the loader's checks: 'raise' (stop, naming it) or 'skip' (counted)")


@dataclass
class LossConfig:
    """Sec. 3.2: per output L1 regression, confidence-weighted L1 with a log-confidence term, gradient L1."""

    regression: float = opt(1.0, "weight of the L1 regression term")
    confidence: float = opt(1.0, "weight of the confidence-weighted L1 term")
    gradient: float = opt(1.0, "weight of the gradient L1 term")
    alpha: float = opt(0.2, "weight of -log(confidence)")
    depth: float = opt(1.0, "per-output weights; ``canonical`` is the paper's lambda")
    ray: float = opt(1.0, "weight of the ray output")
    canonical: float = opt(1.0, "weight of the canonical output (the paper's lambda)")
    canonical_scale: float = opt(10.0, "canonical targets are FLAME metres x this (a face spans about +-1)")
    label_weight: str = opt(
        "mask", "'mask': every labelled pixel counts the same; 'confidence': the depth and canonical terms "
                "weight each labelled pixel by its stored label confidence (the store's confidence array)")


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "AdamW peak learning rate")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    warmup_steps: int = opt(20, "linear warm-up before the cosine decay")
    max_steps: int = opt(600, "optimizer steps (the fixed budget)")
    max_minutes: float = opt(0.0, "wall-clock cap in minutes (0: none); a capped run is not reproducible")
    grad_clip: float = opt(1.0, "gradient norm clipped to this (0: off)")
    accumulate: int = opt(1, "micro-batches per optimizer step")
    bf16: bool = opt(True, "bf16 autocast (CUDA only)")
    device: str = opt("auto", "auto | cpu | cuda")
    seed: int = opt(0, "seed of initialisation and sampling")


@dataclass
class TrainConfig:
    name: str = opt("tiny", "name of the run (in its metrics and checkpoints)")
    out: str = opt("train-out", "checkpoints, metrics.jsonl, loss plot")
    log_every: int = opt(10, "steps between metric lines")
    checkpoint_every: int = opt(100, "steps between checkpoints")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    source_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "checkpoint config") -> "TrainConfig":
        """Rebuild from a checkpoint's copy: the same strict filling and checks (size bounds included)
        as a TOML file, so a tampered checkpoint cannot ask for a terabyte model."""
        from ..config import _fill

        cfg = cls()
        _fill(cfg, d, where)
        _validate_train(cfg, where)
        return cfg


@dataclass
class EvalConfig:
    """An evaluation protocol (Sec. 4.2): which subjects, at what resolution, which correspondence pairs."""

    name: str = opt("synthetic", "name of the protocol (in its tables and JSON)")
    subjects: list[str] = opt(factory=list, help="evaluated subjects (held out from training)")
    manifest: str = opt("", "alternatively a manifest (subject + sequence filter per line)")
    resolution: list[int] = opt(factory=lambda: [112, 84], help="(height, width)")
    views_per_sample: int = opt(16, "images per forward pass: all 16 views of a timestamp (multi-view depth)")
    frontal_serial: str = opt(FRONTAL_SERIAL, "the camera of correspondences and monocular depth (the paper)")
    first_frames: int = opt(40, "timestamps with frame < this are evaluated (the paper: the first 40 frames)")
    margins: list[int] = opt(factory=lambda: [2, 8], help="temporal margins in frames (Tab. 2: 2 and 8)")
    margins_average: list[int] = opt(factory=lambda: [1, 10], help="[first, last]: Tab. 4's '1-10' column")
    cross_view: bool = opt(False, "also two cameras at one timestamp (margin 0; not in the paper's tables)")
    gt_match_mm: float = opt(2.0, "a ground-truth correspondence: stored canonical points this close")
    max_queries: int = opt(400, "query pixels per image pair (deterministic subsample)")
    max_pairs: int = opt(200, "image pairs per margin")
    seed: int = opt(0, "seed of the query-pixel and pair subsampling")
    source_file: str = ""


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    cfg = load_toml_config(path, TrainConfig(), overrides)
    _validate_train(cfg, cfg.source_file)
    return cfg


def load_eval_config(path: str | Path) -> EvalConfig:
    cfg = load_toml_config(path, EvalConfig())
    if len(cfg.resolution) != 2 or any(r % 14 for r in cfg.resolution):
        raise ConfigError(f"{path}: resolution must be [height, width], multiples of 14")
    if not cfg.subjects and not cfg.manifest:
        raise ConfigError(f"{path}: give subjects or a manifest")
    if not cfg.margins or any(m < 1 for m in cfg.margins):
        raise ConfigError(f"{path}: margins must be one or more frame counts >= 1")
    if cfg.margins_average and (len(cfg.margins_average) != 2 or not 1 <= cfg.margins_average[0] <= cfg.margins_average[1]):
        raise ConfigError(f"{path}: margins_average must be [first, last] with 1 <= first <= last, or []")
    if cfg.first_frames < 2 or not 1 <= cfg.views_per_sample <= 16:
        raise ConfigError(f"{path}: first_frames must be >= 2 and views_per_sample in 1..16")
    return cfg


# What the model family can plausibly hold (ViT-g/14 is 1536 wide, 40 deep, 24 heads; its heads far
# narrower): a configuration beyond these is refused before anything is allocated.
MODEL_BOUNDS = {"patch_size": (4, 64), "dim": (8, 4096), "depth": (1, 64), "heads": (1, 64),
                "head_features": (4, 2048)}
MAX_PARAMETERS = 3_000_000_000  # ~12 dim^2 per block
MAX_RESOLUTION = 4096  # pixels per side
MAX_BATCH = 4096


def _validate_train(cfg: TrainConfig, where: str) -> None:
    m, d, o = cfg.model, cfg.data, cfg.optim
    for name, (lo, hi) in MODEL_BOUNDS.items():
        value = getattr(m, name)
        if not lo <= value <= hi:
            raise ConfigError(f"{where}: model.{name} = {value} is outside {lo}..{hi}")
    if not 0 < m.mlp_ratio <= 16 or not all(1 <= c <= 4096 for c in m.head_channels):
        raise ConfigError(f"{where}: model.mlp_ratio must lie in (0, 16] and model.head_channels in 1..4096")
    params = m.depth * (4 + 2 * m.mlp_ratio) * m.dim ** 2
    if params > MAX_PARAMETERS:
        raise ConfigError(f"{where}: the model would hold ~{params / 1e9:.0f} G parameters "
                          f"(more than {MAX_PARAMETERS / 1e9:.0f} G); refusing to allocate it")
    if any(not 1 <= x <= MAX_RESOLUTION for r in d.resolutions for x in r) or not 1 <= d.batch_size <= MAX_BATCH:
        raise ConfigError(f"{where}: data.resolutions must lie in 1..{MAX_RESOLUTION} px and data.batch_size "
                          f"in 1..{MAX_BATCH}")
    if m.dim % m.heads:
        raise ConfigError(f"{where}: model.dim must be a multiple of model.heads")
    if len(m.out_layers) != 4 or not all(0 <= i < m.depth for i in m.out_layers):
        raise ConfigError(f"{where}: model.out_layers needs 4 block indices below model.depth")
    if len(m.head_channels) != 4:
        raise ConfigError(f"{where}: model.head_channels needs 4 widths")
    if not m.outputs or any(x not in OUTPUTS for x in m.outputs):
        raise ConfigError(f"{where}: model.outputs must be a subset of {list(OUTPUTS)}")
    if any(x not in ("views", "time") for x in d.modes) or not d.modes:
        raise ConfigError(f"{where}: data.modes must be a non-empty subset of ['views', 'time']")
    if cfg.data.on_bad_view not in ("raise", "skip"):
        raise ConfigError(f"{where}: data.on_bad_view must be 'raise' or 'skip', got {cfg.data.on_bad_view!r}")
    if cfg.loss.label_weight not in ("mask", "confidence"):
        raise ConfigError(f"{where}: loss.label_weight must be 'mask' or 'confidence', got {cfg.loss.label_weight!r}")
    if len(d.images_per_sample) != 2 or not 1 <= d.images_per_sample[0] <= d.images_per_sample[1] <= 16:
        raise ConfigError(f"{where}: data.images_per_sample must be [min, max] within 1..16")
    for r in d.resolutions:
        if len(r) != 2 or r[0] % m.patch_size or r[1] % m.patch_size:
            raise ConfigError(f"{where}: data.resolutions entries must be [height, width], multiples of "
                              f"{m.patch_size}; got {r}")
    if o.accumulate < 1 or o.max_steps < 1 or d.batch_size < 1:
        raise ConfigError(f"{where}: optim.accumulate, optim.max_steps and data.batch_size must be >= 1")
    if o.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: optim.device must be auto|cpu|cuda")
