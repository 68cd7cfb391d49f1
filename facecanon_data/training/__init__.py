"""Training-side code: the store loader (no Dask); the trainer lands with its issue."""
from .dataset import FaceCanonDataset, IndexFilter, ShardedSampler, collate_samples  # noqa: F401
