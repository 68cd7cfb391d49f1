"""MediaPipe FaceMesh (legacy solution, offline models shipped in mediapipe 0.10.21's wheel).

478 landmarks with ``refine_landmarks=True``. Landmarks are returned in pixels; z uses the x scale
(MediaPipe's convention), smaller z is closer to the camera.
"""
from __future__ import annotations

import numpy as np


class FaceMeshDetector:
    """Context manager around ``mp.solutions.face_mesh.FaceMesh`` for one face per image."""

    def __init__(self, static_image_mode: bool = True, min_detection_confidence: float = 0.5):
        try:
            import mediapipe as mp
        except ImportError as exc:  # pragma: no cover - dependency guard
            raise ImportError("FaceMesh needs mediapipe==0.10.21: pip install 'mediapipe==0.10.21'") from exc
        if not hasattr(mp, "solutions"):
            raise ImportError(f"mediapipe {mp.__version__} has no legacy FaceMesh; install mediapipe==0.10.21")
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image_mode, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence)

    def __enter__(self) -> "FaceMeshDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._mesh.close()

    def detect(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (478, 3) float32 landmarks in pixels, or None when no face is found."""
        h, w = image_rgb.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(image_rgb))
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        return np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float32)
