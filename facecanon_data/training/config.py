"""Typed configuration of the bundled trainer (``pipelines/train_*.toml``) and of an evaluation protocol
(``pipelines/eval_*.toml``). Every default lives here; the TOML files only override (same strict rules
as the pipeline files: unknown keys and wrong types are errors naming the file and the key)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cameras import FRONTAL_SERIAL
from ..config import ConfigError, load_toml_config

OUTPUTS = ("depth", "ray", "canonical")


@dataclass
class ModelConfig:
    """A DINOv2-style ViT (patch 14) with alternating per-image / across-image attention, DPT heads."""

    patch_size: int = 14
    dim: int = 96  # token width (ViT-S 384, ViT-L 1024)
    depth: int = 6  # transformer blocks
    heads: int = 3
    mlp_ratio: float = 4.0
    global_every: int = 2  # block i attends across the sample's images when i % global_every == global_every - 1
    out_layers: list[int] = field(default_factory=lambda: [1, 3, 4, 5])  # blocks feeding the DPT heads
    head_features: int = 48  # DPT fusion width
    head_channels: list[int] = field(default_factory=lambda: [24, 48, 96, 96])  # DPT reassemble widths
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))  # heads present in the model
    pretrained: str = ""  # local DINOv2-format backbone state dict (.pt / .pth), never a hub
    init_from: str = ""  # a checkpoint whose matching weights start training (e.g. depth-only stage 1)
    grad_checkpoint: bool = True  # activation checkpointing per block (CUDA only)


@dataclass
class DataConfig:
    store: str = ""  # the dataset store (``train --store`` overrides)
    subjects: list[str] = field(default_factory=list)  # empty: every subject not excluded
    exclude_subjects: list[str] = field(default_factory=list)  # held-out subjects, never trained on
    modes: list[str] = field(default_factory=lambda: ["views", "time"])  # alternated batch by batch
    images_per_sample: list[int] = field(default_factory=lambda: [2, 4])  # (min, max) per sample
    resolutions: list[list[int]] = field(default_factory=lambda: [[112, 84]])  # (height, width), x patch
    batch_size: int = 2  # samples per micro-batch (per rank)
    color_jitter: float = 0.2  # joint brightness / contrast / saturation jitter (0: off)
    num_workers: int = 0  # DataLoader worker processes
    min_valid_fraction: float = 0.0  # index filter (0: off)
    max_cd_l1_mm: float = 0.0  # index filter on tracking quality (0: off)
    on_bad_view: str = "raise"  # a view failing the loader's checks: "raise" (stop, naming it) or "skip" (counted)


@dataclass
class LossConfig:
    """Sec. 3.2: per output L1 regression, confidence-weighted L1 with a log-confidence term, gradient L1."""

    regression: float = 1.0
    confidence: float = 1.0
    gradient: float = 1.0
    alpha: float = 0.2  # weight of -log(confidence)
    depth: float = 1.0  # per-output weights; ``canonical`` is the paper's lambda
    ray: float = 1.0
    canonical: float = 1.0
    canonical_scale: float = 10.0  # canonical targets are FLAME metres x this (a face spans about +-1)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    max_steps: int = 600  # optimizer steps (the fixed budget)
    max_minutes: float = 0.0  # wall-clock cap in minutes (0: none); a capped run is not reproducible
    grad_clip: float = 1.0
    accumulate: int = 1  # micro-batches per optimizer step
    bf16: bool = True  # bf16 autocast (CUDA only)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


@dataclass
class TrainConfig:
    name: str = "tiny"
    out: str = "train-out"  # checkpoints, metrics.jsonl, loss plot
    log_every: int = 10
    checkpoint_every: int = 100
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

    name: str = "synthetic"
    subjects: list[str] = field(default_factory=list)  # evaluated subjects (held out from training)
    manifest: str = ""  # alternatively a manifest (subject + sequence filter per line)
    resolution: list[int] = field(default_factory=lambda: [112, 84])  # (height, width)
    views_per_sample: int = 16  # images per forward pass: all 16 views of a timestamp (multi-view depth)
    frontal_serial: str = FRONTAL_SERIAL  # the camera of correspondences and monocular depth (the paper)
    first_frames: int = 40  # timestamps with frame < this are evaluated (the paper: the first 40 frames)
    margins: list[int] = field(default_factory=lambda: [2, 8])  # temporal margins in frames (Tab. 2: 2 and 8)
    margins_average: list[int] = field(default_factory=lambda: [1, 10])  # [first, last]: Tab. 4's "1-10" column
    cross_view: bool = False  # also two cameras at one timestamp (margin 0; not in the paper's tables)
    gt_match_mm: float = 2.0  # a ground-truth correspondence: stored canonical points this close
    max_queries: int = 400  # query pixels per image pair (deterministic subsample)
    max_pairs: int = 200  # image pairs per margin
    seed: int = 0
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
