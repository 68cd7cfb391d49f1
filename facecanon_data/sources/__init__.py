"""Capture sources: the interface stages read through, and NeRSemble v2 on disk."""
from .base import CaptureSource  # noqa: F401
from .nersemble import NeRSembleSource  # noqa: F401
from .video import CaptureFileError  # noqa: F401


def capture_roots(capture_cfg, root=None):
    """(capture root, ground-truth root or None) of a pipeline's ``[capture]`` table.

    An explicit ``root`` overrides ``capture.root``; its ground truth is then the ``ground_truth``
    folder beside it (the layout ``synth`` writes), if there is one — never the pipeline's, which
    belongs to another capture.
    """
    from pathlib import Path

    from ..paths import expand

    if root is not None:
        sibling = Path(root).parent / "ground_truth"
        return expand(root), (sibling if sibling.is_dir() else None)
    gt = capture_cfg.ground_truth
    return expand(capture_cfg.root), (expand(gt) if gt else None)


def open_source(capture_cfg, root=None) -> "NeRSembleSource":
    """The capture of a pipeline's ``[capture]`` table (see :func:`capture_roots`)."""
    cap, gt = capture_roots(capture_cfg, root)
    return NeRSembleSource(cap, gt, color_correction=capture_cfg.color_correction)
