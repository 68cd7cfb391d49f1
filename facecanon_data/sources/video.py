"""Sequential video decoding (OpenCV's FFmpeg backend, shipped in the opencv wheel mediapipe pulls in)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from ..errors import InputError, InputValueError


class CaptureFileError(InputError, OSError):
    """A capture file is missing or unreadable; the message names the file."""


class VideoReader:
    """Reads frames of one video in increasing order without seeking from the start for each frame.

    Frames that are not wanted are skipped with ``grab()`` (demux + decode, no colour conversion), so
    reading many frames of one video costs one pass over it.
    """

    def __init__(self, path: str | Path):
        import cv2

        self.path = Path(path)
        if not self.path.is_file():
            raise CaptureFileError(f"{self.path}: video file not found")
        from ..threads import thread_cap

        cap = thread_cap()  # FFmpeg's decoder threads follow the process's thread cap
        self._cap = (cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, cap]) if cap
                     else cv2.VideoCapture(str(self.path)))
        if not self._cap.isOpened():
            raise CaptureFileError(f"{self.path}: cannot open video (corrupt or unsupported codec)")
        self.num_frames = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS))
        self._next = 0  # index of the frame the next read returns

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cap.release()

    def _seek(self, index: int) -> None:
        import cv2

        if index < self._next or index - self._next > 30:
            # Far ahead or backwards: let FFmpeg seek to the nearest keyframe and decode forward.
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            self._next = index
        while self._next < index:
            if not self._cap.grab():
                raise CaptureFileError(f"{self.path}: ended at frame {self._next}, wanted {index}")
            self._next += 1

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W, 3) uint8 RGB."""
        import cv2

        if index < 0 or (self.num_frames and index >= self.num_frames):  # 0 = count unknown
            raise IndexError(f"{self.path}: frame {index} out of range (0..{self.num_frames - 1})")
        self._seek(index)
        ok, bgr = self._cap.read()
        if not ok:
            raise CaptureFileError(f"{self.path}: cannot decode frame {index} (of {self.num_frames})")
        self._next = index + 1
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def frames(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, RGB frame) for sorted ``indices`` (all frames when None)."""
        wanted = range(self.num_frames) if indices is None else sorted(set(int(i) for i in indices))
        for i in wanted:
            yield i, self.read(i)


class VideoWriter:
    """Writes RGB frames to an ``.mp4`` (MPEG-4 part 2, high quality) atomically: a temporary file
    is renamed into place on ``close()``, so a crash never leaves a truncated video behind."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float = 25.0):
        import cv2

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.stem + ".partial.mp4")
        self._w = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not self._w.isOpened():
            raise CaptureFileError(f"{self.path}: cannot open a video writer")
        self._w.set(cv2.VIDEOWRITER_PROP_QUALITY, 100)
        self.size = (width, height)

    def write(self, rgb: np.ndarray) -> None:
        import cv2

        if (rgb.shape[1], rgb.shape[0]) != self.size:
            raise InputValueError(f"{self.path}: frame size {rgb.shape[1]}x{rgb.shape[0]} != {self.size}")
        self._w.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self._w.release()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        self._w.release()
        self._tmp.unlink(missing_ok=True)
