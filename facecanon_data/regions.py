"""Per-pixel region labels of a view: the evaluation's face + hair region, the stand-in for Facer masks.

The paper restricts every metric to Facer's face + hair segmentation (``000_…``, appendix). The store
has no segmentation network's output; ``render`` instead labels each pixel from what the chain knows:

- the tracked head mesh ray-cast into the view: the model region of the hit triangle (its first vertex),
  grouped into ``face`` (face, lips, nose, eye region, forehead, eyeballs), ``hair`` (scalp), ``ears``,
  ``neck``; a model region the masks file cannot label counts as ``body``;
- the view's foreground (``reconstruct``'s masks) where the mesh is absent: ``hair`` when the pixel lies
  above the chin line (the lowest face vertex along the head's up axis, both projected into the view),
  within ``HAIR_REACH`` head radii of the projected head centre, and in a connected piece of such pixels
  that touches the head's own pixels (hair grows from the head: a studio light that leaked into the
  foreground does not); ``body`` otherwise (torso, clothing, long hair below the chin).

Stored as ``region`` (T, V, H, W) uint8 with codes :data:`REGION_LABELS`; the evaluation region is
:data:`EVAL_REGION_CODES`. Without a foreground (no plates, masks off) hair is the mesh's scalp only.
Measured against the synthetic ground truth's face + hair pixels in ``render`` (``region_iou_face_hair``).
"""
from __future__ import annotations

import numpy as np

REGION_LABELS = ("none", "face", "hair", "ears", "neck", "body")
EVAL_REGION_CODES = (REGION_LABELS.index("face"), REGION_LABELS.index("hair"))
HAIR_REACH = 1.5  # foreground this many projected head radii from the head centre is not hair
_MODEL_REGION_LABEL = {"eyeballs": "face", "lips": "face", "nose": "face", "eye_region": "face", "forehead": "face",
                       "face": "face", "scalp": "hair", "ears": "ears", "neck": "neck", "other": "body"}


def vertex_labels(model_region_ids: np.ndarray, model_region_names: tuple[str, ...]) -> np.ndarray:
    """(V,) uint8 code of :data:`REGION_LABELS` per head-model vertex, from its model region id."""
    lookup = np.array([REGION_LABELS.index(_MODEL_REGION_LABEL[n]) for n in model_region_names], np.uint8)
    return lookup[model_region_ids]


def eval_region(region: np.ndarray) -> np.ndarray:
    """Bool mask of the evaluation region (face + hair) of region codes of any shape."""
    return np.isin(region, EVAL_REGION_CODES)


def region_map(triangle: np.ndarray, faces: np.ndarray, labels: np.ndarray, vertices_px: np.ndarray,
               in_front: np.ndarray, foreground: np.ndarray | None) -> np.ndarray:
    """One view's region codes (see module docstring).

    Args:
        triangle: (H, W) int64 hit triangle of the tracked mesh per pixel, -1 = miss.
        faces: (F, 3) vertex ids; labels: (V,) uint8 codes per vertex (:func:`vertex_labels`).
        vertices_px: (V, 2) float pixel coordinates (x, y) of the tracked vertices in this view.
        in_front: (V,) bool, the vertex lies in front of the camera.
        foreground: (H, W) bool or None.
    Returns:
        (H, W) uint8 codes of :data:`REGION_LABELS`.
    """
    out = np.zeros(triangle.shape, np.uint8)
    hit = triangle >= 0
    out[hit] = labels[faces[triangle[hit], 0]]
    if foreground is None:
        return out
    face, hair = REGION_LABELS.index("face"), REGION_LABELS.index("hair")
    head = in_front & np.isin(labels, (face, hair, REGION_LABELS.index("ears")))
    top, bottom = in_front & (labels == hair), in_front & (labels == REGION_LABELS.index("neck"))
    if not (in_front & (labels == face)).any() or not top.any() or not bottom.any():
        out[foreground & ~hit] = REGION_LABELS.index("body")
        return out
    up = vertices_px[top].mean(0) - vertices_px[bottom].mean(0)  # the head's up axis in the image
    up /= max(float(np.linalg.norm(up)), 1e-9)
    chin = float((vertices_px[in_front & (labels == face)] @ up).min())
    centre = vertices_px[head].mean(0)
    reach = HAIR_REACH * float(np.linalg.norm(vertices_px[head] - centre, axis=1).max())
    ys, xs = np.nonzero(foreground & ~hit)
    pixels = np.stack([xs, ys], 1).astype(np.float64)
    near = (pixels @ up > chin) & (np.linalg.norm(pixels - centre, axis=1) < reach)
    out[ys, xs] = REGION_LABELS.index("body")
    out[ys[near], xs[near]] = hair
    return _keep_attached(out, hit & np.isin(out, (face, hair, REGION_LABELS.index("ears"))), hair)


def _keep_attached(region: np.ndarray, head: np.ndarray, hair: int) -> np.ndarray:
    """Off-mesh hair pixels stay hair only in 8-connected pieces (``cv2.connectedComponents``) that touch
    ``head`` (H, W) bool; the others become body."""
    import cv2

    candidate = (region == hair) & ~head
    if not candidate.any():
        return region
    n, labels = cv2.connectedComponents((candidate | head).astype(np.uint8), connectivity=8)
    attached = np.zeros(n, bool)
    attached[np.unique(labels[head])] = True
    attached[0] = False
    region[candidate & ~attached[labels]] = REGION_LABELS.index("body")
    return region
