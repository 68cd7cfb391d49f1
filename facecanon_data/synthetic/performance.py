"""Random identities and performances shaped like NeRSemble's sequences.

A performance is mostly near-neutral with short expression peaks (smooth bumps in time), eye blinks,
jaw openings, and slow head turns (yaw up to +-40 degrees, some pitch and roll). The first sequence of
a subject, like NeRSemble's ``EXP-1-head``, is a head-rotation sequence with the largest turns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..flame.synthetic_head import EXPRESSION_NAMES, IDENTITY_NAMES

# NeRSemble v2's performance sequences in recording order (BACKGROUND is not a performance).
SEQUENCE_NAMES = ("EXP-1-head", "EXP-2-eyes", "EXP-3-cheeks+nose", "EXP-4-lips", "EXP-5-mouth",
                  "EXP-6-tongue-1", "EXP-7-tongue-2", "EXP-8-jaw-1", "EXP-9-jaw-2", "EMO-1-shout+laugh",
                  "EMO-2-surprise+fear", "EMO-3-angry+sad", "EMO-4-disgust+happy")


@dataclass
class Identity:
    """shape: (S,) identity coefficients; offsets: (V, 3) static per-vertex offsets, meters."""

    shape: np.ndarray
    offsets: np.ndarray


@dataclass
class Performance:
    """Per-frame FLAME parameters of one sequence, T frames (axis-angle in radians, meters)."""

    expression: np.ndarray  # (T, E)
    global_rot: np.ndarray  # (T, 3)
    neck: np.ndarray
    jaw: np.ndarray
    left_eye: np.ndarray
    right_eye: np.ndarray
    translation: np.ndarray  # (T, 3)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).astype(np.float32) for k in
                ("expression", "global_rot", "neck", "jaw", "left_eye", "right_eye", "translation")}


def random_identity(rng: np.random.Generator, template: np.ndarray, num_shape: int,
                    offset_scale_m: float = 0.0015, offset_width_m: tuple[float, float] = (0.02, 0.04)) -> Identity:
    """Identity coefficients ~ N(0, 0.8) on the model's identity components; smooth static offsets.

    The offsets are a few random radial bumps (Gaussian, ``offset_width_m`` wide, up to
    ``offset_scale_m``: by default 2-4 cm and ~1.5 mm), the kind of detail a shape space misses and the
    tracker's static offsets must recover; wider and larger ones make a head off the model's space.
    """
    shape = np.zeros(num_shape, np.float32)
    k = min(len(IDENTITY_NAMES), num_shape)
    shape[:k] = rng.normal(0, 0.8, size=k).clip(-2, 2)
    centre = template.mean(0)
    offsets = np.zeros_like(template, dtype=np.float32)
    for _ in range(6):
        anchor = template[rng.integers(len(template))]
        width = rng.uniform(*offset_width_m)
        amp = rng.uniform(-1, 1) * offset_scale_m
        w = np.exp(-((template - anchor) ** 2).sum(1) / width ** 2)
        normal = template - centre
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        offsets += (amp * w)[:, None] * normal
    return Identity(shape=shape, offsets=offsets.astype(np.float32))


def _bump(t: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """Smooth bump in [0, 1]: raised cosine of the given half-width around ``centre``."""
    x = np.clip((t - centre) / half_width, -1, 1)
    return 0.5 * (1 + np.cos(np.pi * x))


def random_performance(rng: np.random.Generator, num_frames: int, num_expression: int,
                       head_sequence: bool = False, max_yaw_deg: float = 40.0) -> Performance:
    """One sequence of ``num_frames`` frames (a longer sequence has proportionally more events)."""
    t = np.arange(num_frames, dtype=np.float64)
    T = max(num_frames, 2)
    expr = np.zeros((num_frames, num_expression))
    n_active = min(len(EXPRESSION_NAMES), num_expression)
    n_events = max(2, int(round(num_frames / 10)))
    for _ in range(n_events):
        comps = rng.choice(n_active, size=rng.integers(1, 3), replace=False)
        centre = rng.uniform(0.1, 0.9) * T
        half = rng.uniform(0.08, 0.2) * T
        for c in comps:
            expr[:, c] += rng.uniform(0.6, 1.4) * _bump(t, centre, half)
    expr += rng.normal(0, 0.04, size=expr.shape) * (np.arange(num_expression) < n_active)  # micro-motion
    # Blinks: both eyelids (components eye_close_right / eye_close_left), a few frames each.
    blink = [EXPRESSION_NAMES.index("eye_close_right"), EXPRESSION_NAMES.index("eye_close_left")]
    for _ in range(rng.integers(0, 3)):
        b = _bump(t, rng.uniform(0, T), rng.uniform(1.5, 3))
        for c in blink:
            if c < num_expression:
                expr[:, c] = np.maximum(expr[:, c], b)
    jaw = np.zeros((num_frames, 3))
    for _ in range(rng.integers(1, 3)):
        jaw[:, 0] += rng.uniform(0.1, 0.32) * _bump(t, rng.uniform(0.1, 0.9) * T, rng.uniform(0.08, 0.2) * T)
    jaw[:, 0] = np.clip(jaw[:, 0], 0, 0.4)

    yaw_amp = np.radians(max_yaw_deg if head_sequence else rng.uniform(5, 20))
    phase = rng.uniform(0, 2 * np.pi)
    cycles = rng.uniform(0.8, 1.5) if head_sequence else rng.uniform(0.2, 0.6)
    yaw = yaw_amp * np.sin(2 * np.pi * cycles * t / T + phase)
    pitch = np.radians(rng.uniform(4, 14)) * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t / T + rng.uniform(0, 6.3))
    roll = np.radians(rng.uniform(1, 5)) * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t / T + rng.uniform(0, 6.3))
    global_rot = np.stack([pitch, yaw, roll], 1) * 0.6
    neck = np.stack([pitch, yaw, roll], 1) * 0.4
    gaze = np.stack([np.radians(8) * np.sin(2 * np.pi * rng.uniform(0.3, 1) * t / T + rng.uniform(0, 6.3)),
                     np.radians(12) * np.sin(2 * np.pi * rng.uniform(0.3, 1) * t / T + rng.uniform(0, 6.3)),
                     np.zeros(num_frames)], 1)
    drift = rng.normal(0, 0.006, size=(1, 3)) + 0.004 * np.sin(
        2 * np.pi * t[:, None] / T * rng.uniform(0.2, 0.7, size=3) + rng.uniform(0, 6.3, size=3))
    return Performance(expression=expr.astype(np.float32), global_rot=global_rot.astype(np.float32),
                       neck=neck.astype(np.float32), jaw=jaw.astype(np.float32), left_eye=gaze.astype(np.float32),
                       right_eye=gaze.astype(np.float32), translation=drift.astype(np.float32))
