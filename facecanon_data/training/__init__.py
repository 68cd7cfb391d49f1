"""Training-side code: the store loader (no Dask), the model, losses, training loop, evaluator and figures.

Heavy modules (torch models, the trainer) are imported from their own submodules; importing this
package loads only the loader.
"""
from .dataset import FaceCanonDataset, IndexFilter, ShardedSampler, collate_samples  # noqa: F401
