"""The training loop: alternating sampling modes, AdamW + cosine schedule, clipping, accumulation,
multi-resolution batches, full resume, JSONL metrics + plot, bf16 / activation checkpointing on CUDA,
and DDP when launched by ``torchrun`` (several processes: ``WORLD_SIZE`` > 1).

Determinism: on CPU a run is a function of the config (model init from ``optim.seed``; sample lists,
jitter and per-batch resolutions from (seed, mode, epoch, batch)); a resumed run continues bit-identically,
because the checkpoint holds the model, optimizer, scheduler, step and each mode's loader position
(epoch, batches consumed), and the loader re-derives the rest. Outputs, in ``out``:
``last.pt`` (the latest checkpoint, replaced atomically), ``metrics.jsonl`` (one line per logged step),
``loss.png`` and ``config.json``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .dataset import FaceCanonDataset, IndexFilter, ShardedSampler, collate_samples
from .losses import sample_targets, total_loss
from .model import FaceAnythingModel, load_pretrained_backbone
from ..errors import InputFileNotFound, InputValueError

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"


def select_device(preference: str) -> torch.device:
    """``auto`` picks CUDA when a device exists; asking for ``cuda`` without one is an error."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputValueError("optim.device = 'cuda' but torch sees no CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def dataset_for(cfg: TrainConfig, store: str, mode: str) -> FaceCanonDataset:
    d = cfg.data
    subjects = list(d.subjects) or None
    if d.exclude_subjects:
        from ..store import subjects as store_subjects

        subjects = [s for s in (subjects or store_subjects(store)) if s not in d.exclude_subjects]
    flt = IndexFilter(subjects=subjects, min_valid_fraction=d.min_valid_fraction or None,
                      max_cd_l1_mm=d.max_cd_l1_mm or None)
    ds = FaceCanonDataset(store, mode=mode, images_per_sample=tuple(d.images_per_sample),
                          resolution=tuple(d.resolutions[0]), filter=flt, color_jitter=d.color_jitter,
                          seed=cfg.optim.seed, on_bad_view=d.on_bad_view,
                          with_confidence=cfg.loss.label_weight == "confidence")
    if len(ds) == 0:
        raise InputValueError(f"{store}: no '{mode}' samples of {d.images_per_sample[0]}+ images for subjects "
                         f"{subjects or 'all'}")
    return ds


class BatchStream:
    """An endless, resumable stream of micro-batches of one sampling mode for this rank.

    Epoch e uses the dataset's sample list for e and a seeded permutation split across ranks; batch b of
    epoch e is drawn at resolution ``resolutions[rng(seed, mode, e, b)]``. ``state()`` is (epoch, batch).
    """

    def __init__(self, dataset: FaceCanonDataset, mode_id: int, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.ds, self.mode_id, self.cfg, self.rank, self.world = dataset, mode_id, cfg, rank, world
        self.epoch, self.batch = 0, 0
        self._it = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state: dict) -> None:
        self.epoch, self.batch, self._it = int(state["epoch"]), int(state["batch"]), None

    def _batches(self) -> list[list]:
        d = self.cfg.data
        self.ds.set_epoch(self.epoch)
        sampler = ShardedSampler(len(self.ds), self.rank, self.world, seed=self.cfg.optim.seed + self.mode_id)
        sampler.set_epoch(self.epoch)
        order = list(sampler)
        out = []
        for b in range(0, len(order), d.batch_size):
            rng = np.random.default_rng([self.cfg.optim.seed, self.mode_id, self.epoch, b // d.batch_size])
            res = tuple(d.resolutions[int(rng.integers(len(d.resolutions)))])
            out.append([(i, res) for i in order[b:b + d.batch_size]])
        return out

    def next(self) -> list[dict]:
        while True:
            if self._it is None:
                batches = self._batches()[self.batch:]
                loader = torch.utils.data.DataLoader(
                    self.ds, batch_sampler=batches, collate_fn=collate_samples, num_workers=self.cfg.data.num_workers)
                self._it = iter(loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
                continue
            self.batch += 1
            return batch


def build_model(cfg: TrainConfig, device: torch.device) -> FaceAnythingModel:
    """A fresh model from ``optim.seed``; then pretrained backbone weights and / or ``init_from``."""
    torch.manual_seed(cfg.optim.seed)
    model = FaceAnythingModel(cfg.model)
    if cfg.model.pretrained:
        missing = load_pretrained_backbone(model, cfg.model.pretrained)
        log.info("backbone from %s (%d keys kept their initialization: %s)", cfg.model.pretrained, len(missing),
                 ", ".join(missing[:4]))
    if cfg.model.init_from:
        added = init_from_checkpoint(model, cfg.model.init_from)
        if added:
            log.info("initialized from %s; new heads start fresh: %s", cfg.model.init_from, ", ".join(added))
    return model.to(device)


def init_from_checkpoint(model: FaceAnythingModel, path: str | Path) -> list[str]:
    """Copy a checkpoint's weights into ``model``; heads the checkpoint lacks (e.g. the canonical head of
    stage two) keep their fresh initialization. Returns those heads' names."""
    ckpt = load_checkpoint(path)
    state = ckpt["model"]
    own = model.state_dict()
    bad = [k for k in state if k in own and own[k].shape != state[k].shape]
    if bad:
        raise InputValueError(f"{path}: checkpoint shapes differ from the configured model for {bad[:4]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(h for h in model.heads if not any(k.startswith(f"heads.{h}.") for k in state))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict; ``weights_only`` loading never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path}: checkpoint not found")
    from .model import load_weights_only

    ckpt = load_weights_only(path, "a readable checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise InputValueError(f"{path}: not a facecanon-data checkpoint (no model / config)")
    return ckpt


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu", untrained: bool = False
                          ) -> tuple[FaceAnythingModel, TrainConfig]:
    """The trained model of a checkpoint, or (``untrained``) the same architecture fresh from its seed."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"], where=f"{path}: config")
    cfg.model.pretrained, cfg.model.init_from = "", ""
    torch.manual_seed(cfg.optim.seed)
    model = FaceAnythingModel(cfg.model)
    if not untrained:
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "reference_embed")) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)


def _schedule(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = cfg.optim.warmup_steps, cfg.optim.max_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def train(cfg: TrainConfig, store: str | Path, out: str | Path | None = None, resume: bool = True,
          stop_after: int | None = None, progress=None) -> dict:
    """Train (or resume) into ``out``; returns a summary dict. ``stop_after`` ends the run after that many
    optimizer steps of this call (tests use it to simulate an interruption)."""
    store, out = str(store), Path(out or cfg.out)
    rank, world = _distributed()
    device = select_device(cfg.optim.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(cfg, device)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(model, cfg)
    scheduler = _schedule(optimizer, cfg)
    streams = {m: BatchStream(dataset_for(cfg, store, m), i, cfg, rank, world) for i, m in enumerate(cfg.data.modes)}
    step = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for m, s in ckpt["streams"].items():
            streams[m].load_state(s)
        step = int(ckpt["step"])
        log.info("resumed %s at step %d", ckpt_path, step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        _truncate_metrics(out / "metrics.jsonl", step)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.optim.bf16
                else nullcontext())
    t0, start_step = time.time(), step
    images_total = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_out = False
    model.train()
    modes = cfg.data.modes
    while step < cfg.optim.max_steps:
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        micro_batches = [streams[modes[(step * cfg.optim.accumulate + k) % len(modes)]].next()
                         for k in range(cfg.optim.accumulate)]
        count = sum(len(b) for b in micro_batches)
        images_seen, resolutions = 0, set()
        for bi, batch in enumerate(micro_batches):
            for si, sample in enumerate(batch):
                last = bi == len(micro_batches) - 1 and si == len(batch) - 1
                targets = {k: (v.to(device) if torch.is_tensor(v) else v)
                           for k, v in sample_targets(sample, cfg.loss.canonical_scale).items()}
                images = sample["image"][None].to(device)
                sync = nullcontext() if (ddp is None or last) else ddp.no_sync()
                with sync:
                    with autocast:
                        pred = (ddp or model)(images)
                    pred = {k: v[0].float() for k, v in pred.items()}
                    loss, parts = total_loss(pred, targets, cfg.loss)
                    (loss / count).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / count
                images_seen += images.shape[1]
                resolutions.add(tuple(images.shape[-2:]))
        images_total += images_seen
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        optimizer.step()
        scheduler.step()
        step += 1
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.optim.max_steps):
            record = {"step": step, **{k: round(v, 6) for k, v in parts_sum.items()}, "grad_norm": round(grad_norm, 6),
                      "lr": scheduler.get_last_lr()[0], "images": images_seen,
                      "resolutions": sorted(resolutions), "seconds": round(time.time() - t0, 2)}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("step %d/%d loss %.4f (depth %.3f ray %.3f canonical %.3f) %.1fs", step, cfg.optim.max_steps,
                     parts_sum.get("loss", 0), parts_sum.get("loss_depth", 0), parts_sum.get("loss_ray", 0),
                     parts_sum.get("loss_canonical", 0), time.time() - t0)
        if progress is not None:
            progress(step, cfg.optim.max_steps, parts_sum.get("loss", 0.0))
        timed_out = cfg.optim.max_minutes and (time.time() - t0) > 60 * cfg.optim.max_minutes
        interrupted = stop_after is not None and step - start_step >= stop_after
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.optim.max_steps or timed_out or interrupted):
            save_checkpoint(ckpt_path, model, optimizer, scheduler, step, streams, cfg)
        if timed_out or interrupted:
            break
    if rank == 0:
        plot_metrics(out / "metrics.jsonl", out / "loss.png")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    stopped = "max_steps" if step >= cfg.optim.max_steps else ("time cap" if timed_out else "interrupted")
    seconds = time.time() - t0
    return {"out": str(out), "step": step, "stopped": stopped, "seconds": round(seconds, 1),
            "checkpoint": str(ckpt_path), "device": str(device), "world_size": world,
            # throughput of this call (data loading included), this process's images
            "steps_per_second": round((step - start_step) / max(seconds, 1e-9), 3),
            "images_per_second": round(images_total / max(seconds, 1e-9), 2),
            "peak_gpu_memory_mib": (round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
                                    if device.type == "cuda" else None)}


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, streams: dict, cfg: TrainConfig) -> None:
    """Everything needed to continue bit-identically; written to a temporary name, then renamed."""
    from ..artifacts import code_version

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "streams": {m: s.state() for m, s in streams.items()}, "config": cfg.to_dict(),
             "code_version": code_version()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint's step (they would be logged again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss parts against step (log scale)."""
    if not jsonl.is_file():
        return
    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "loss_depth", "loss_ray", "loss_canonical"):
        if key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per sample)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
