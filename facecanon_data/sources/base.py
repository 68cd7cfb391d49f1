"""The capture-source interface every stage reads through."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Iterator, Protocol

import numpy as np

from ..cameras import Camera


class GroundTruthAccess(Protocol):
    """Optional ground truth of a synthetic subject (never read by the pipeline's stages)."""

    def frame(self, sequence: str, frame: int) -> dict[str, np.ndarray]: ...

    def canonical_vertices(self) -> np.ndarray: ...

    def view_maps(self, sequence: str, frame: int, serial: str, downscale: float = 1) -> dict[str, np.ndarray]: ...


class CaptureSource(ABC):
    """A calibrated multi-view capture: subjects -> sequences -> synchronized camera videos.

    Frames are (H, W, 3) uint8 RGB; cameras are :class:`Camera` scaled to the requested downscale.
    """

    @abstractmethod
    def subjects(self) -> list[str]:
        """Subject ids (e.g. ``"017"``), sorted."""

    @abstractmethod
    def sequences(self, subject: str) -> list[str]:
        """Performance sequences of a subject, sorted (non-performances such as BACKGROUND excluded)."""

    @abstractmethod
    def serials(self, subject: str) -> list[str]:
        """Camera serials of a subject's calibration."""

    @abstractmethod
    def cameras(self, subject: str, sequence: str | None = None, downscale: float = 1) -> dict[str, Camera]:
        """Calibrated cameras, intrinsics scaled to images downscaled by ``downscale``."""

    def missing_cameras(self, subject: str, sequence: str) -> list[str]:
        """Calibrated cameras without a video in ``sequence`` (real releases miss one now and then)."""
        return []

    def color_correction_applied(self, subject: str) -> bool:
        """Whether frames of ``subject`` are colour-corrected as they are read (a calibration exists and
        correction is on). Sources without colour calibrations say False."""
        return False

    def check_subject(self, subject: str) -> None:
        """Fail early, naming the file, when a subject's calibration or videos are unusable."""
        for sequence in self.sequences(subject):
            self.cameras(subject, sequence)
            self.num_frames(subject, sequence)

    @abstractmethod
    def num_frames(self, subject: str, sequence: str) -> int:
        """Number of synchronized timestamps in a sequence."""

    @abstractmethod
    def frames(self, subject: str, sequence: str, serial: str, indices: Iterable[int] | None = None,
               downscale: float = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(index, image) for frames of one camera, decoded sequentially."""

    @abstractmethod
    def timestamps(self, subject: str, sequence: str, indices: Iterable[int],
                   downscale: float = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(index, {serial: image}) for timestamps of all cameras."""

    def timestamp(self, subject: str, sequence: str, index: int, downscale: float = 1) -> dict[str, np.ndarray]:
        """All cameras' images of one timestamp."""
        return next(iter(self.timestamps(subject, sequence, [index], downscale)))[1]

    def masks(self, subject: str, sequence: str, serial: str, indices: Iterable[int],
              downscale: float = 1) -> Iterator[tuple[int, np.ndarray]] | None:
        """Foreground mattes (H, W) float32 in [0, 1] where the capture has them, else None."""
        return None

    def timestamp_masks(self, subject: str, sequence: str, indices: Iterable[int],
                        downscale: float = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]] | None:
        """(index, {serial: matte}) for timestamps of all cameras, or None without mattes."""
        return None

    def background_plates(self, subject: str, downscale: float = 1) -> dict[str, np.ndarray] | None:
        """{serial: (H, W, 3) uint8} stills of the empty rig, processed like the frames; None without."""
        return None

    def ground_truth(self, subject: str) -> GroundTruthAccess | None:
        """Ground truth of a synthetic subject, or None (real captures)."""
        return None
