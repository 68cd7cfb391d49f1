"""Capture sources: the interface stages read through, and NeRSemble v2 on disk."""
from .base import CaptureSource  # noqa: F401
from .nersemble import NeRSembleSource  # noqa: F401
from .video import CaptureFileError  # noqa: F401


def open_source(capture_cfg, root=None) -> "NeRSembleSource":
    """The capture of a pipeline's ``[capture]`` table (``root`` overrides it)."""
    from ..paths import expand

    gt = capture_cfg.ground_truth
    return NeRSembleSource(expand(root or capture_cfg.root), expand(gt) if gt else None,
                           color_correction=capture_cfg.color_correction)
