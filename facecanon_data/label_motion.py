"""What the labels teach: the correspondences they define, against the true motion of the skin.

The paper's protocol (and ``evaluate``) takes as the "ground-truth" match of a pixel p of image A the
labelled pixel of image B whose *stored* canonical label is nearest to p's label, accepted within a radius.
So the labels are also the referee. On a capture with ground truth the true match is known: p shows a
surface point of the ground-truth mesh (a triangle and barycentric coordinates); the same point at B's
frame, projected into B's camera, is where that skin went (sub-pixel), if B sees it.

Per query pixel p (labelled, in the evaluation region, on the ground truth's head, visible in B):

- ``label_epe_px``: |label match - true position| in pixels of the stored images;
- ``floor_epe_px``: the same rule run on the ground truth's own canonical coordinates at pixel centres
  (what matching to a pixel centre leaves, ~0.38 px for a uniform sub-pixel offset);
- ``label_cce_px``: the label match followed back to A by the same rule, |p' - p|;
- ``label_error_mm``: canonical distance between the true surface point of the label match's pixel and p's
  (the error on the surface, whatever the projection).

Pure functions of arrays; the render stage feeds them its maps and the capture's ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .confidence import nearest_cameras

REGION_GROUPS = {"face": ("face", "eyes", "mouth"), "hair": ("hair", "scalp"), "head": None}  # None: all


@dataclass
class ViewLabels:
    """What the store holds for one view, at its resolution (H, W)."""

    canonical: np.ndarray  # (H, W, 3) float32 m, stored canonical labels
    labelled: np.ndarray  # (H, W) bool
    region: np.ndarray  # (H, W) bool, the stored evaluation region (face + hair)
    confidence: np.ndarray | None = None  # (H, W) float32 in [0, 1], the stored label confidence (None: all 1)


@dataclass
class ViewTruth:
    """The ground truth of one view at the same resolution."""

    canonical: np.ndarray  # (H, W, 3) float32 m, the true canonical point of each head pixel
    head: np.ndarray  # (H, W) bool
    triangle: np.ndarray  # (H, W) int64 scene triangle, -1 = studio
    bary: np.ndarray  # (H, W, 3) float32 barycentric coordinates in that triangle
    depth: np.ndarray  # (H, W) float32 m along the optical axis, 0 = studio
    region: np.ndarray  # (H, W) int8 ground-truth region id (names: ``region_names``), -1 = not head


def true_positions(truth_a: ViewTruth, queries: np.ndarray, vertices_b: np.ndarray, faces: np.ndarray,
                   camera_b, depth_b: np.ndarray, visible_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Where the surface points under ``queries`` (P, 2) rows/cols of view A are in view B: (P, 2) float x, y
    pixel coordinates (centres at integers) and (P,) bool visible (inside B, and B's ground-truth depth at
    the nearest pixel within ``visible_mm`` of the point's: not occluded)."""
    from .meshes import barycentric_interpolate

    tri = truth_a.triangle[queries[:, 0], queries[:, 1]]
    bary = truth_a.bary[queries[:, 0], queries[:, 1]]
    points = barycentric_interpolate(vertices_b, faces, tri, bary)
    uv, z = camera_b.project(points)
    h, w = depth_b.shape
    px = np.rint(uv).astype(np.int64)
    inside = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h) & (z > 0)
    px = np.where(inside[:, None], px, 0)
    visible = inside & (np.abs(depth_b[px[:, 1], px[:, 0]] - z) * 1000 <= visible_mm)
    return uv, visible


def nearest_match(points: np.ndarray, canonical_b: np.ndarray, candidates_b: np.ndarray, radius_m: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The evaluator's rule: for (P, 3) canonical points, the candidate pixel of B whose canonical value is
    nearest: (P, 2) rows/cols and (P,) bool accepted (within ``radius_m``)."""
    from scipy.spatial import cKDTree

    pix = np.argwhere(candidates_b)
    if len(pix) == 0 or len(points) == 0:
        return np.zeros((len(points), 2), np.int64), np.zeros(len(points), bool)
    dist, j = cKDTree(canonical_b[candidates_b]).query(points)
    return pix[j], dist <= radius_m


def pair_errors(labels_a: ViewLabels, labels_b: ViewLabels, truth_a: ViewTruth, truth_b: ViewTruth,
                vertices_b: np.ndarray, faces: np.ndarray, camera_b, radius_m: float, max_queries: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per query pixel of A (see module docstring): label_epe_px, floor_epe_px, label_cce_px, label_error_mm
    (NaN where the labels accept no match), region (int8 ground-truth region id) and confidence (the query
    pixel's stored label confidence)."""
    queries = np.argwhere(labels_a.labelled & labels_a.region & truth_a.head)
    if len(queries) > max_queries:
        queries = queries[np.sort(rng.choice(len(queries), max_queries, replace=False))]
    uv, visible = true_positions(truth_a, queries, vertices_b, faces, camera_b, truth_b.depth)
    queries, true_xy = queries[visible], uv[visible]
    if len(queries) == 0:
        return {k: np.zeros(0) for k in ("label_epe_px", "floor_epe_px", "label_cce_px", "label_error_mm", "region",
                                         "confidence")}
    rows, cols = queries[:, 0], queries[:, 1]
    candidates_b = labels_b.labelled & labels_b.region
    match, ok = nearest_match(labels_a.canonical[rows, cols], labels_b.canonical, candidates_b, radius_m)
    back, back_ok = nearest_match(labels_b.canonical[match[:, 0], match[:, 1]], labels_a.canonical,
                                  labels_a.labelled & labels_a.region, np.inf)
    floor, floor_ok = nearest_match(truth_a.canonical[rows, cols], truth_b.canonical, truth_b.head & labels_b.region,
                                    radius_m)
    xy = lambda rc: rc[:, ::-1].astype(np.float64)  # noqa: E731  rows/cols -> x, y
    epe = np.linalg.norm(xy(match) - true_xy, axis=1)
    on_head = truth_b.head[match[:, 0], match[:, 1]]
    error_mm = np.linalg.norm(truth_b.canonical[match[:, 0], match[:, 1]] - truth_a.canonical[rows, cols], axis=1) * 1000
    nan = np.float64(np.nan)
    return {"label_epe_px": np.where(ok, epe, nan),
            "floor_epe_px": np.where(floor_ok, np.linalg.norm(xy(floor) - true_xy, axis=1), nan),
            "label_cce_px": np.where(ok & back_ok, np.linalg.norm(xy(back) - xy(queries), axis=1), nan),
            "label_error_mm": np.where(ok & on_head, error_mm, nan),
            "region": truth_a.region[rows, cols],
            "confidence": (np.ones(len(rows), np.float32) if labels_a.confidence is None
                           else labels_a.confidence[rows, cols].astype(np.float32))}


def summarize(records: list[dict[str, np.ndarray]], region_names: tuple[str, ...], scale_504: float) -> dict:
    """Figures of many pairs' :func:`pair_errors`: per region group (face, hair, head) the means of label EPE,
    floor and CCE (pixels of the stored images, and ``*_504``: scaled to a 504 px longest side, the released
    inference's resolution), the label's excess over the floor, the < 3 / 5 / 10 px fractions of the label
    EPE, the median 3D error (mm), the query count and the fraction the labels accepted; and under
    ``confident_half`` the label EPE, floor, excess (at 504 px) and 3D error of the half of the queries whose
    stored label confidence is highest (ties in raster order of the queries)."""
    if not records:
        return {}
    cat = {k: np.concatenate([r[k] for r in records]) for k in records[0]}
    out = {}
    for group, members in REGION_GROUPS.items():
        ids = [region_names.index(n) for n in (members or region_names) if n in region_names]
        sel = np.isin(cat["region"], ids) if members else cat["region"] >= 0
        if not sel.any():
            continue
        epe, floor = cat["label_epe_px"][sel], cat["floor_epe_px"][sel]
        cce, mm = cat["label_cce_px"][sel], cat["label_error_mm"][sel]
        accepted = np.isfinite(epe)
        mean = lambda a: float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")  # noqa: E731
        figures = {"label_epe_px": mean(epe), "floor_epe_px": mean(floor), "label_cce_px": mean(cce)}
        figures.update({f"{k}_504": v * scale_504 for k, v in list(figures.items())})
        figures["label_epe_excess_px_504"] = figures["label_epe_px_504"] - figures["floor_epe_px_504"]
        for t in (3, 5, 10):
            figures[f"label_epe_under_{t}px"] = float((epe[accepted] < t).mean()) if accepted.any() else float("nan")
        figures["label_error_mm"] = float(np.nanmedian(mm)) if np.isfinite(mm).any() else float("nan")
        figures["queries"] = int(sel.sum())
        figures["accepted_fraction"] = float(accepted.mean())
        out[group] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}
        top = np.argsort(-cat["confidence"][sel], kind="stable")[:(int(sel.sum()) + 1) // 2]
        half = {"label_epe_px_504": mean(epe[top]) * scale_504, "floor_epe_px_504": mean(floor[top]) * scale_504}
        half["label_epe_excess_px_504"] = half["label_epe_px_504"] - half["floor_epe_px_504"]
        half["label_error_mm"] = float(np.nanmedian(mm[top])) if np.isfinite(mm[top]).any() else float("nan")
        half["confidence_min"] = float(cat["confidence"][sel][top].min())
        half["queries"] = len(top)
        out[group]["confident_half"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in half.items()}
    return out


# Where the label error comes from: the same pairs and query pixels matched with labels that are exact up
# to one stage (``LabelMotion`` with ``oracles``), beside the pixel-centre floor and the stored labels.
ERROR_SOURCES = (
    ("floor", "the ground truth's canonical coordinates at every head pixel's centre"),
    ("true_at_labelled_pixels", "the ground truth's canonical coordinates, but only at the labelled pixels"),
    ("true_of_reconstructed_points", "each labelled pixel's reconstructed point labelled with the true canonical "
                                     "point of the ground-truth surface nearest to it: reconstruction noise only"),
    ("stored_labels", "the stored labels: reconstruction, tracking and transfer"),
)
# A labelling measured beside them (not a stage): the tracked mesh's canonical point where each labelled
# pixel's ray meets it, so no reconstruction noise but the whole tracking error.
ALTERNATIVES = (("tracked_surface_at_pixels", "the tracked mesh's canonical point where each labelled pixel's "
                                              "ray meets it: tracking error, no reconstruction noise"),)


class LabelMotion:
    """The label correspondence figures of one subject (:mod:`facecanon_data.label_motion`), gathered while
    ``render`` walks its timestamps: frontal-camera frame pairs at ``render.label_margins`` (and the
    ``label_margins_average`` range; at most ``label_max_pairs`` per margin, seeded) and, at every timestamp,
    the frontal camera with its ``label_cross_view_cameras`` nearest cameras. A frame's frontal view is kept
    only until its last pair is measured, so memory stays within the largest margin. Views kept with
    ``oracles`` (labels exact up to a stage, :data:`ERROR_SOURCES`) are matched with those too, on the same
    query pixels, for the ``error_sources`` figures."""

    def __init__(self, rc, keys: list[str], frontal: str):
        self.rc, self.frontal = rc, frontal
        margins = set(rc.label_margins)
        if rc.label_margins_average:
            margins |= set(range(rc.label_margins_average[0], rc.label_margins_average[1] + 1))
        frames = {(k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])) for k in keys}
        rng = np.random.default_rng(0)
        self.pairs: dict[tuple, int] = {}  # ((seq, a), (seq, b)) -> margin
        for m in sorted(margins):
            found = sorted(((seq, f), (seq, f + m)) for seq, f in frames if (seq, f + m) in frames)
            if len(found) > rc.label_max_pairs:
                found = [found[j] for j in np.sort(rng.choice(len(found), rc.label_max_pairs, replace=False))]
            self.pairs.update({p: m for p in found})
        self.views: dict[tuple, dict[str, tuple]] = {}  # (seq, frame) -> serial -> (camera, {variant: labels}, truth)
        self.vertices: dict[tuple, np.ndarray] = {}  # (seq, frame) -> the ground-truth scene's vertices
        self.records: dict[int, list] = {}  # margin (0: cross-view) -> pair_errors of each pair (stored labels)
        self.oracle_records: dict[tuple[str, int], list] = {}  # (variant, margin) -> pair_errors
        self.done: set[tuple] = set()
        self.measured = 0  # pairs measured so far: each pair's queries are drawn with its own seed

    def cameras_wanted(self, cams: dict) -> set[str]:
        """The serials of a timestamp whose views :meth:`keep` takes: the frontal camera and its nearest."""
        if self.frontal not in cams:
            return set()
        return {self.frontal, *nearest_cameras(list(cams), cams, self.rc.label_cross_view_cameras)[self.frontal]}

    def keep(self, seq: str, frame: int, serial: str, camera, labels: ViewLabels, truth: ViewTruth,
             oracles: dict[str, ViewLabels] | None = None) -> None:
        self.views.setdefault((seq, frame), {})[serial] = (camera, {"stored_labels": labels, **(oracles or {})}, truth)

    def _pair(self, margin: int, a: tuple, b: tuple, vertices_b: np.ndarray, faces: np.ndarray) -> None:
        """Match view a = (camera, variants, truth) to view b with every labelling both have."""
        _, variants_a, truth_a = a
        camera_b, variants_b, truth_b = b
        rc, seed = self.rc, self.measured
        self.measured += 1
        for name, labels_a in variants_a.items():
            if name not in variants_b:
                continue
            errors = pair_errors(labels_a, variants_b[name], truth_a, truth_b, vertices_b, faces, camera_b,
                                 rc.label_match_mm / 1000, rc.label_max_queries, np.random.default_rng([1, seed]))
            if name == "stored_labels":
                self.records.setdefault(margin, []).append(errors)
            else:
                self.oracle_records.setdefault((name, margin), []).append(errors)

    def measure(self, seq: str, frame: int, vertices: np.ndarray, faces: np.ndarray) -> None:
        """After a timestamp's views are kept: its cross-view pairs, and the frame pairs it completes."""
        here = self.views.get((seq, frame), {})
        if self.frontal not in here:
            self.views.pop((seq, frame), None)
            return
        for serial, view in here.items():
            if serial != self.frontal:
                self._pair(0, here[self.frontal], view, vertices, faces)
        self.views[(seq, frame)] = {self.frontal: here[self.frontal]}
        self.vertices[(seq, frame)] = vertices
        for (a, b), m in self.pairs.items():
            if (a, b) not in self.done and a in self.views and b in self.views:
                self._pair(m, self.views[a][self.frontal], self.views[b][self.frontal], self.vertices[b], faces)
                self.done.add((a, b))
        for x in list(self.views):  # a frame's view goes once every pair it belongs to is measured
            if all(p in self.done for p in self.pairs if x in p):
                self.views.pop(x)
                self.vertices.pop(x, None)

    def figures(self, region_names: tuple[str, ...], scale_504: float) -> dict:
        margins = {str(m): summarize(r, region_names, scale_504) for m, r in sorted(self.records.items()) if m > 0}
        out = {"margins": margins, "cross_view": summarize(self.records.get(0, []), region_names, scale_504),
               "pairs": {str(m): len(r) for m, r in sorted(self.records.items())}, "scale_504": round(scale_504, 5)}
        rc = self.rc
        if rc.label_margins_average:
            lo, hi = rc.label_margins_average
            per = [margins[str(m)]["head"] for m in range(lo, hi + 1) if "head" in margins.get(str(m), {})]
            out["margins_average"] = {"margins": f"{lo}-{hi}", "margins_with_pairs": len(per)} | {
                k: round(float(np.mean([p[k] for p in per])), 4) if per else None
                for k in ("label_epe_px_504", "floor_epe_px_504", "label_epe_excess_px_504", "label_cce_px_504")}
        if self.oracle_records:
            out["error_sources"] = self._sources(margins, out["cross_view"], region_names, scale_504)
        return out

    def _sources(self, margins: dict, cross_view: dict, region_names, scale_504: float) -> dict:
        """{margin or "cross_view": {source: {group: label EPE at 504 px}}} in the order of ERROR_SOURCES."""
        out = {}
        for m, stored in [*((int(k), v) for k, v in margins.items()), (0, cross_view)]:
            row = {"floor": {g: f["floor_epe_px_504"] for g, f in stored.items()}}
            for name, _ in ERROR_SOURCES[1:-1] + ALTERNATIVES:
                records = self.oracle_records.get((name, m))
                if records:
                    row[name] = {g: f["label_epe_px_504"] for g, f in summarize(records, region_names, scale_504).items()}
            row["stored_labels"] = {g: f["label_epe_px_504"] for g, f in stored.items()}
            alternatives = {name: row.pop(name) for name, _ in ALTERNATIVES if name in row}
            out["cross_view" if m == 0 else str(m)] = row | alternatives
        return out
