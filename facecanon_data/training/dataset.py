"""A thin PyTorch loader over the store (no Dask): the paper's two sampling modes.

Sampling modes (one *sample* = several images that the model sees together):
  ``views``  several views of one timestamp of a subject (multi-view geometry);
  ``time``   one camera across several timestamps of a subject (temporal correspondence).
Each sample has ``images_per_sample`` images (an int, or a (min, max) range drawn per sample; 2 to 16).

A sample (``__getitem__``) is a dict of tensors, N images at the target resolution (H, W):
  image          (N, 3, H, W) float32 in [0, 1], colour-jittered jointly when enabled
  depth          (N, 1, H, W) float32 metres along the optical axis, 0 = no label
  canonical      (N, 3, H, W) float32 metres, FLAME canonical space
  mask           (N, 1, H, W) bool, depth and canonical labels valid
  region         (N, H, W) uint8 codes of regions.REGION_LABELS, only with ``with_region=True``
                 (the evaluator's face + hair region; nearest-neighbour resized, it is dense)
  confidence     (N, 1, H, W) float32 label confidence in [0, 1] (0 = no label), only with
                 ``with_confidence=True``; it follows the labels' resampling (the same source pixel)
  K              (N, 3, 3) float32 pixels of the resized image
  world_2_cam    (N, 4, 4) float32 metres
  ray_origin     (N, 3, H, W) float32 camera centre in world coordinates, metres (an expanded view)
  ray_direction  (N, 3, H, W) float32 unit direction of each pixel's ray in world coordinates
  subject, sequence (lists of str), frame, serial index
Images are resized with area/bilinear filtering. Labels are sparse (splatted points), so they are
resampled by *scattering* each valid pixel to the target pixel containing its centre, the nearest depth
winning; a plain nearest-neighbour resize would keep only about (target / stored area) of them.
Intrinsics are scaled with the pixel-centre convention, so a 3-D point projects to the same relative
position. ``dataset[i]`` uses the configured resolution; ``dataset[(i, (h, w))]`` another one (the
trainer's multi-resolution batch sampler passes keys of that form, which also works in worker processes).

Determinism: the sample list depends only on (index filter, mode, seed, epoch); augmentation on
(seed, epoch, sample index). Splitting: use :class:`ShardedSampler` per DDP rank (disjoint, no
padding); DataLoader workers split a rank's indices among themselves (map-style). Zarr groups are
opened lazily per process, so the dataset is safe with ``fork`` and ``spawn``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..cameras import scale_intrinsics
from ..errors import InputError
from ..confidence import LEVELS
from ..store import CAMERA_ARRAYS, FINITE_ARRAYS, TRAINING_ARRAYS, StoreError, read_index, subject_readers


RAY_CACHE_ENTRIES = 48  # cameras x sizes whose ray maps a process keeps (3.2 MB each at 518 x 518)


class BadSampleError(StoreError):
    """A stored view the loader refuses to feed a model; the message names subject, array and index."""


@dataclass
class IndexFilter:
    subjects: list[str] | None = None
    sequences: list[str] | None = None
    min_valid_fraction: float | None = None
    max_cd_l1_mm: float | None = None


def ray_maps(k: np.ndarray, world_2_cam: np.ndarray, height: int, width: int,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre (3,) and (3, H, W) float32 unit ray directions in world coordinates (into ``out``).

    d_world = R^T K^-1 [u, v, 1]^T / |K^-1 [u, v, 1]^T|: R is a rotation, so the norm is that of the camera
    ray, sqrt(x^2 + y^2 + 1), an outer sum; evaluated channel by channel (no (H, W, 3) temporaries).
    """
    r, t = world_2_cam[:3, :3].astype(np.float64), world_2_cam[:3, 3].astype(np.float64)
    centre = (-r.T @ t).astype(np.float32)
    x = ((np.arange(width) - k[0, 2]) / k[0, 0]).astype(np.float32)[None, :]  # (1, W) assumes no skew
    y = ((np.arange(height) - k[1, 2]) / k[1, 1]).astype(np.float32)[:, None]  # (H, 1)
    inv_norm = 1.0 / np.sqrt(x * x + y * y + 1.0, dtype=np.float32)  # (H, W)
    r32 = r.astype(np.float32)
    d = np.empty((3, height, width), np.float32) if out is None else out
    for c in range(3):
        np.multiply(x * r32[0, c] + (y * r32[1, c] + r32[2, c]), inv_norm, out=d[c])
    return centre, d


def _source_windows(src: int, dst: int) -> np.ndarray:
    """Along one axis, the source pixels whose centre falls in each target pixel (target index
    floor((s + 0.5) * dst / src), clipped): (dst, k) int64 source indices in increasing order, padded with
    -1, where k is the most any target pixel receives (1 or 2 at the trainer's sizes). The mapping is
    monotonic, so each target's sources are one contiguous run."""
    target = np.minimum(((np.arange(src) + 0.5) * dst / src).astype(np.int64), dst - 1)
    counts = np.bincount(target, minlength=dst)
    k = max(int(counts.max()), 1)
    start = np.cumsum(counts) - counts
    offsets = np.arange(k)
    return np.where(offsets[None, :] < counts[:, None], start[:, None] + offsets[None, :], -1)


@lru_cache(maxsize=32)
def _candidate_pixels(sh: int, sw: int, height: int, width: int) -> np.ndarray:
    """(S, height, width) int32: for each target pixel, the flat index (y * sw + x) of every source pixel
    whose centre falls in it, in raster order along S = kr * kc (:func:`_source_windows`), sh * sw where a
    window slot is empty. A function of the sizes alone (a few per training run), so it is cached."""
    rows, cols = _source_windows(sh, height), _source_windows(sw, width)  # (H, kr), (W, kc)
    flat = rows.T[:, None, :, None] * sw + cols.T[None, :, None, :]  # (kr, kc, H, W)
    empty = (rows.T[:, None, :, None] < 0) | (cols.T[None, :, None, :] < 0)
    flat = np.where(empty, sh * sw, flat).reshape(-1, height, width).astype(np.int32)
    flat.flags.writeable = False
    return flat


def resample_labels(depth: np.ndarray, canonical: np.ndarray, mask: np.ndarray, height: int, width: int,
                    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                    confidence: np.ndarray | None = None, out_confidence: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse labels (sh, sw) -> (height, width): each valid pixel goes to the target pixel holding its
    centre; where several land on one target pixel the nearest (smallest depth) wins, ties going to the
    first in raster order.

    depth (sh, sw) float32 m, canonical (sh, sw, 3), mask (sh, sw) bool -> the same at the new size,
    written into ``out`` (depth, canonical, mask) when given. ``confidence`` (sh, sw) uint8 levels, when
    given, goes the same way into ``out_confidence`` ((height, width) float32 in [0, 1], 0 = no label).

    The pixel mapping is separable, so every target pixel's candidates form a small window of source pixels
    (1 to 3 per axis at the trainer's sizes, :func:`_candidate_pixels`): one gather of the candidates'
    depths and a running minimum over the window's slots, instead of sorting every valid pixel by depth (the
    dense maps hold hundreds of thousands); the winners' canonical points are then one row gather.
    """
    sh, sw = mask.shape
    if out is None:
        out = (np.empty((height, width), np.float32), np.empty((height, width, 3), np.float32),
               np.empty((height, width), bool))
    out_d, out_c, out_m = out
    if not out_c.flags.c_contiguous:
        raise ValueError("resample_labels: out's canonical array must be C-contiguous")
    candidates = _candidate_pixels(sh, sw, height, width)  # (S, H, W)
    empty = sh * sw  # the index of the padding entry: no label
    labelled = np.empty(empty + 1, np.float32)  # depth where labelled, inf elsewhere and in the padding
    np.copyto(labelled[:-1], np.where(mask, depth, np.float32(np.inf)).ravel())
    labelled[-1] = np.inf
    source = candidates[0].copy()  # (H, W) the winning source pixel so far
    np.take(labelled, source, out=out_d)
    for slot in candidates[1:]:  # strictly nearer only: the earlier slot (raster order) keeps a tie
        d = labelled[slot]
        nearer = d < out_d
        np.copyto(source, slot, where=nearer)
        np.copyto(out_d, d, where=nearer)
    np.less(out_d, np.float32(np.inf), out=out_m)
    np.copyto(source, empty, where=~out_m)
    np.copyto(out_d, np.float32(0), where=~out_m)
    table = np.empty((empty + 1, 3), np.float32)  # canonical points as float32 rows, zero in the padding
    # torch casts float16 with the CPU's conversion instructions, numpy element by element (~30x slower)
    torch.from_numpy(table[:-1]).copy_(torch.from_numpy(np.ascontiguousarray(canonical).reshape(-1, 3)))
    table[-1] = 0
    np.take(table, source.reshape(-1), axis=0, out=out_c.reshape(-1, 3))
    if confidence is not None:
        levels = np.zeros(empty + 1, np.float32)
        np.multiply(confidence.ravel(), np.float32(1 / LEVELS), out=levels[:-1], casting="unsafe")
        np.take(levels, source, out=out_confidence)
    return out_d, out_c, out_m


class FaceCanonDataset(torch.utils.data.Dataset):
    """See module docstring. ``resolution`` is (height, width)."""

    def __init__(self, store: str | Path, mode: str = "views", images_per_sample: int | tuple[int, int] = 4,
                 resolution: tuple[int, int] = (518, 518), filter: IndexFilter | None = None,
                 color_jitter: float = 0.0, seed: int = 0, epoch: int = 0, with_region: bool = False,
                 on_bad_view: str = "raise", with_confidence: bool = False):
        if mode not in ("views", "time"):
            raise ValueError(f"mode must be 'views' or 'time', got {mode!r}")
        if on_bad_view not in ("raise", "skip"):
            raise ValueError(f"on_bad_view must be 'raise' or 'skip', got {on_bad_view!r}")
        # "raise": a view that fails a check (checksum, schema, NaN/inf) raises BadSampleError naming it;
        # "skip": it is left out of its sample, counted in ``skipped`` and listed in the sample's "skipped"
        self.on_bad_view, self.skipped = on_bad_view, 0
        lo, hi = (images_per_sample, images_per_sample) if isinstance(images_per_sample, int) else images_per_sample
        if not 1 <= lo <= hi <= 16:
            raise ValueError(f"images_per_sample must lie in 1..16, got {images_per_sample}")
        self.store, self.mode, self.range = Path(store), mode, (lo, hi)
        self.resolution, self.color_jitter, self.seed = resolution, color_jitter, seed
        # the evaluation reads the region map too; training does not pay for it
        self.image_arrays = TRAINING_ARRAYS + (("region",) if with_region else ()) + (
            ("confidence",) if with_confidence else ())
        idx = read_index(self.store).to_pydict()
        keep = np.ones(len(idx["subject"]), bool)
        f = filter or IndexFilter()
        if f.subjects is not None:
            keep &= np.isin(idx["subject"], f.subjects)
        if f.sequences is not None:
            keep &= np.isin(idx["sequence"], f.sequences)
        if f.min_valid_fraction is not None:
            keep &= np.asarray(idx["valid_fraction"], float) >= f.min_valid_fraction
        if f.max_cd_l1_mm is not None:
            keep &= np.nan_to_num(np.asarray(idx["cd_l1_mm"], float), nan=np.inf) <= f.max_cd_l1_mm
        self.rows = {k: np.asarray(v)[keep] for k, v in idx.items()}
        self._groups: dict[str, object] = {}
        self._ray_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._pid = None
        self.set_epoch(epoch)

    # -- sample list ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Rebuild the sample list for ``epoch`` (deterministic for (seed, epoch))."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        r = self.rows
        key = (r["subject"], r["t"]) if self.mode == "views" else (r["subject"], r["v"])
        groups: dict[tuple, list[int]] = {}
        for i, k in enumerate(zip(*key)):
            groups.setdefault((str(k[0]), int(k[1])), []).append(i)
        samples = []
        for k in sorted(groups):
            members = np.array(groups[k])[rng.permutation(len(groups[k]))]
            pos = 0
            while len(members) - pos >= self.range[0]:
                n = int(rng.integers(self.range[0], self.range[1] + 1))
                samples.append(members[pos:pos + n].tolist())
                pos += n
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    # -- reading -------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_groups"], state["_pid"] = {}, None  # chunk readers are reopened in each process
        state["_ray_cache"] = {}
        return state

    def _group(self, subject: str) -> dict:
        """Per process: the subject's verified chunk readers and its (small) camera arrays in memory."""
        if self._pid != os.getpid():
            self._groups, self._pid = {}, os.getpid()
        if subject not in self._groups:
            readers = subject_readers(self.store, subject)
            self._groups[subject] = {**{k: readers[k] for k in self.image_arrays},
                                     **{k: readers[k].read_all() for k in CAMERA_ARRAYS}}
        return self._groups[subject]

    def read_view(self, row: int) -> dict[str, np.ndarray]:
        """One index row's stored arrays {name: (H, W, ...) or (3, 3) / (4, 4)}, every chunk decoded and
        verified (its checksum, the manifest's checksum for its position, the schema) and depth,
        canonical, K and world_2_cam checked finite. Raises :class:`BadSampleError` naming the subject,
        array and index of anything that fails."""
        subject = str(self.rows["subject"][row])
        t, v = int(self.rows["t"][row]), int(self.rows["v"][row])
        where = f"timestamp {t}, view {v} (index row {row})"
        try:
            g = self._group(subject)
        except InputError as exc:
            raise BadSampleError(f"{where}: {exc}") from None
        out = {}
        for k in self.image_arrays:
            reader = g[k]
            try:
                out[k] = reader.read_chunk((t, v) + (0,) * (len(reader.shape) - 2))[0, 0]
            except (InputError, IndexError) as exc:
                raise BadSampleError(f"{exc} ({where})") from None
        for k in CAMERA_ARRAYS:
            out[k] = g[k][t, v]
        for k in FINITE_ARRAYS:
            if k in out and not np.isfinite(out[k]).all():
                raise BadSampleError(f"subject {subject}, array {k}, {where}: contains NaN or inf")
        if (out["depth"] < 0).any():
            raise BadSampleError(f"subject {subject}, array depth, {where}: negative depth")
        return out

    def read_raw(self, rows: list[int]) -> dict[str, list[np.ndarray]]:
        """The stored, verified arrays of some index rows (:meth:`read_view`; the loader's raw bound),
        {name: [one array per row]}; rows that fail are skipped (``on_bad_view="skip"``, listed in
        ``out["skipped"]``) or raise :class:`BadSampleError`."""
        out = {k: [] for k in (*self.image_arrays, *CAMERA_ARRAYS)}
        out["rows"], out["skipped"] = [], []
        for i in rows:
            try:
                view = self.read_view(i)
            except BadSampleError as exc:
                if self.on_bad_view == "raise":
                    raise
                self.skipped += 1
                out["skipped"].append(str(exc))
                continue
            for k, arr in view.items():
                out[k].append(arr)
            out["rows"].append(i)
        return out

    def __getitem__(self, key: int | tuple[int, tuple[int, int]]) -> dict:
        index, (h, w) = (key, self.resolution) if isinstance(key, (int, np.integer)) else (key[0], key[1])
        sample = self.load(self.samples[index], h, w, jitter_key=index)
        sample["sample_index"] = index
        return sample

    def load(self, rows: list[int], h: int, w: int, jitter_key: int | None = None) -> dict:
        """One sample made of the given index rows (any rows: the evaluator groups its own), at (h, w)."""
        import cv2

        raw = self.read_raw(rows)
        rows = raw["rows"]
        n = len(rows)
        if n == 0:
            raise BadSampleError(f"{self.store}: every view of the sample failed its checks: {raw['skipped'][0]}")
        images = np.empty((n, 3, h, w), np.float32)  # (N, 3, H, W) in [0, 1]
        depths = np.empty((n, h, w), np.float32)  # metres, 0 where unlabelled
        canons = np.empty((n, h, w, 3), np.float32)  # metres
        masks = np.empty((n, h, w), bool)
        dirs = np.empty((n, 3, h, w), np.float32)
        regions = np.empty((n, h, w), np.uint8) if "region" in raw else None
        confidences = np.empty((n, h, w), np.float32) if "confidence" in raw else None
        ks, origins = [], []
        for j in range(n):
            rgb = raw["rgb"][j]
            sh, sw = rgb.shape[:2]
            interp = cv2.INTER_AREA if (h < sh and w < sw) else cv2.INTER_LINEAR
            # One strided pass: uint8 (H, W, 3) -> float32 (3, H, W) scaled to [0, 1].
            np.multiply(cv2.resize(rgb, (w, h), interpolation=interp).transpose(2, 0, 1), np.float32(1 / 255),
                        out=images[j], casting="unsafe")
            resample_labels(raw["depth"][j], raw["canonical"][j], raw["mask"][j], h, w,
                            out=(depths[j], canons[j], masks[j]),
                            confidence=None if confidences is None else raw["confidence"][j],
                            out_confidence=None if confidences is None else confidences[j])
            if regions is not None:  # a dense label map: nearest-neighbour resize
                regions[j] = cv2.resize(raw["region"][j], (w, h), interpolation=cv2.INTER_NEAREST)
            k = scale_intrinsics(raw["K"][j], w / sw, h / sh)
            ks.append(k)
            centre, d = self._rays(k, raw["world_2_cam"][j], h, w)
            np.copyto(dirs[j], d)
            origins.append(centre)
        image = torch.from_numpy(images)
        if self.color_jitter > 0 and jitter_key is not None:
            image = self._jitter(image, jitter_key)
        r = self.rows
        extra = {} if regions is None else {"region": torch.from_numpy(regions)}
        if confidences is not None:
            extra["confidence"] = torch.from_numpy(confidences)[:, None]
        return {
            **extra,
            "image": image,
            "depth": torch.from_numpy(depths)[:, None],
            "canonical": torch.from_numpy(canons).permute(0, 3, 1, 2),
            "mask": torch.from_numpy(masks)[:, None],
            "K": torch.from_numpy(np.stack(ks).astype(np.float32)),
            "world_2_cam": torch.from_numpy(np.stack(raw["world_2_cam"]).astype(np.float32)),
            "ray_origin": torch.from_numpy(np.stack(origins))[:, :, None, None].expand(n, 3, h, w),
            "ray_direction": torch.from_numpy(dirs),
            "subject": [str(r["subject"][i]) for i in rows], "sequence": [str(r["sequence"][i]) for i in rows],
            "frame": torch.as_tensor([int(r["frame"][i]) for i in rows]),
            "serial": [str(r["serial"][i]) for i in rows],
            **({"skipped": raw["skipped"]} if raw["skipped"] else {}),
        }

    def _rays(self, k: np.ndarray, world_2_cam: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`ray_maps`, cached per camera and size (a rig's cameras are fixed over a capture, so a
        process meets a few dozen): camera centre (3,) and (3, h, w) directions, read-only."""
        key = (k.astype(np.float64).tobytes(), world_2_cam.astype(np.float64).tobytes(), h, w)
        hit = self._ray_cache.pop(key, None)
        if hit is None:
            hit = ray_maps(k, world_2_cam, h, w)
            hit[1].flags.writeable = False
            while len(self._ray_cache) >= RAY_CACHE_ENTRIES:
                self._ray_cache.pop(next(iter(self._ray_cache)))
        self._ray_cache[key] = hit  # most recently used last
        return hit

    def _jitter(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """The same brightness / contrast / saturation change for every image of the sample (in place:
        ``image`` is the sample's own buffer)."""
        rng = np.random.default_rng([self.seed, self.epoch, index, 7])
        a = self.color_jitter
        b, c, s = (1 + rng.uniform(-a, a, size=3)).tolist()
        image.mul_(b)
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        image.sub_(mean).mul_(c).add_(mean)
        gray = image.mean(dim=1, keepdim=True)
        return image.sub_(gray).mul_(s).add_(gray).clamp_(0, 1)


class ShardedSampler(torch.utils.data.Sampler):
    """This rank's share of a (seeded, per-epoch) permutation: disjoint across ranks, no padding."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.rank, self.world, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def collate_samples(batch: list[dict]) -> list[dict]:
    """Samples have different image counts: a batch is a list of samples."""
    return batch
