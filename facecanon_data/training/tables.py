"""The evaluation's results kept beside the store and printed in the layout of the paper's tables.

``evaluate`` and ``bench train`` save each result as ``STORE/evaluations/{protocol}/{label}.json``
(atomically); ``report`` gathers them and prints :func:`paper_tables` per protocol. No torch here, so the
report does not pay for importing it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]{0,63}$")


def save_evaluation(store: str | Path, result: dict, label: str) -> Path:
    """Write ``result`` (:func:`~facecanon_data.training.evaluate.evaluate_model`'s dict with ``protocol``)
    as the row ``label`` of its protocol's tables."""
    for what, name in (("label", label), ("protocol", str(result.get("protocol", "")))):
        if not _NAME.match(name):
            raise ValueError(f"evaluation {what} {name!r}: letters, digits and _.+- only (at most 64)")
    path = Path(store) / "evaluations" / str(result["protocol"]) / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps({**result, "label": label}, default=str)))
    return path


def load_evaluations(store: str | Path) -> dict[str, dict[str, dict]]:
    """{protocol: {label: result}} of the evaluations saved in ``store`` (unreadable files skipped)."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(Path(store, "evaluations").glob("*/*.json")):
        if path.name.startswith("."):  # a write in progress
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and "depth" in result and "margins" in result:
            out.setdefault(path.parent.name, {})[path.stem] = result
    return out


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def paper_tables(results: dict[str, dict]) -> str:
    """Markdown tables in the layout of the paper's Tab. 1 (depth), Tab. 2 (EPE 2D at two margins),
    Tab. 4 (EPE at the two margins and averaged over 1-10) and Tab. 7 (the summary), one row per entry
    of ``results`` (label -> :func:`evaluate_model`'s dict); the margins are the protocol's first two."""
    reported = next(iter(results.values())).get("margins_reported", [2, 8])
    m1, m2 = str(reported[0]), str(reported[1] if len(reported) > 1 else reported[0])
    lines = ["Depth (Tab. 1 layout; monocular / 16 views)", "",
             "| Setting | RMSE (m) | AbsRel |", "|---|---|---|"]
    for label, r in results.items():
        mo, mv = r["depth"]["monocular"], r["depth"]["multi_view"]
        lines.append(f"| {label} | {_f(mo['rmse_m'], 4)} / {_f(mv['rmse_m'], 4)} | {_f(mo['absrel'], 4)} / {_f(mv['absrel'], 4)} |")
    lines += ["", "Correspondences, frontal camera (Tab. 2 layout; face + hair)", "",
              f"| Method | Margin = {m1}: EPE(2D) | <3px | <5px | <10px | Margin = {m2}: EPE(2D) | <3px | <5px | <10px |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        cells = []
        for m in (m1, m2):
            x = r["margins"].get(m, {})
            cells += [_f(x.get("epe_px")), _f(x.get("under_3px")), _f(x.get("under_5px")), _f(x.get("under_10px"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    avg_label = next((r["epe_average"]["margins"] for r in results.values() if "epe_average" in r), "1-10")
    lines += ["", "Tracking across margins (Tab. 4 layout; EPE and CCE in px)", "",
              f"| Method | EPE m={m1} | EPE m={m2} | EPE m={avg_label} | CCE m={m1} | CCE m={m2} |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        x1, x2 = r["margins"].get(m1, {}), r["margins"].get(m2, {})
        lines.append(f"| {label} | {_f(x1.get('epe_px'))} | {_f(x2.get('epe_px'))} | "
                     f"{_f(r.get('epe_average', {}).get('epe_px'))} | {_f(x1.get('cce_px'))} | {_f(x2.get('cce_px'))} |")
    lines += ["", f"Summary (Tab. 7 layout; EPE at margin {m1})", "",
              "| Method | AbsRel (Monocular) | EPE | AbsRel (16 views) |", "|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {_f(r['depth']['monocular']['absrel'], 4)} | {_f(r['margins'].get(m1, {}).get('epe_px'))} "
                     f"| {_f(r['depth']['multi_view']['absrel'], 4)} |")
    return "\n".join(lines)
