"""A 16-camera rig laid out like NeRSemble's: arcs in front of the head about 1 m away."""
from __future__ import annotations

import numpy as np

from ..cameras import FRONTAL_SERIAL, NERSEMBLE_SERIALS, Camera, look_at

# (azimuth, elevation) in degrees; azimuth 0 faces the subject. Three rows: 7 at eye level, 5 above, 4 below.
_LAYOUT = ([(a, 0.0) for a in (-78, -52, -26, 0, 26, 52, 78)]
           + [(a, 22.0) for a in (-56, -28, 0, 28, 56)]
           + [(a, -20.0) for a in (-45, -15, 15, 45)])


def nersemble_like_rig(width: int, height: int, focal: float, distance: float = 1.05,
                       target: np.ndarray = np.array([0.0, -0.03, 0.0])) -> list[Camera]:
    """Cameras with NeRSemble's serials; the frontal one (azimuth 0, eye level) is ``FRONTAL_SERIAL``.

    One shared K (as in NeRSemble's calibration), principal point at the image centre.
    """
    others = [s for s in NERSEMBLE_SERIALS if s != FRONTAL_SERIAL]
    k = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1.0]])
    cams = []
    for az, el in _LAYOUT:
        serial = FRONTAL_SERIAL if (az, el) == (0, 0.0) else others.pop(0)
        a, e = np.radians(az), np.radians(el)
        pos = distance * np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)]) + [0, target[1], 0]
        cams.append(Camera(serial, k.copy(), look_at(pos, target), width, height))
    order = {s: i for i, s in enumerate(NERSEMBLE_SERIALS)}
    return sorted(cams, key=lambda c: order[c.serial])
