"""Capture sources: the interface stages read through, and NeRSemble v2 on disk."""
from .base import CaptureSource  # noqa: F401
from .nersemble import NeRSembleSource  # noqa: F401
from .video import CaptureFileError  # noqa: F401


def open_source(capture_cfg, root=None) -> "NeRSembleSource":
    """The capture of a pipeline's ``[capture]`` table.

    An explicit ``root`` overrides ``capture.root``; its ground truth is then the ``ground_truth``
    folder beside it (the layout ``synth`` writes), if there is one — never the pipeline's, which
    belongs to another capture.
    """
    from pathlib import Path

    from ..paths import expand

    if root is not None:
        sibling = Path(root).parent / "ground_truth"
        return NeRSembleSource(expand(root), sibling if sibling.is_dir() else None,
                               color_correction=capture_cfg.color_correction)
    gt = capture_cfg.ground_truth
    return NeRSembleSource(expand(capture_cfg.root), expand(gt) if gt else None,
                           color_correction=capture_cfg.color_correction)
