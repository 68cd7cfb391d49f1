"""``facecanon-data report STORE``: per-subject quality of a store, as a table and an HTML page.

Everything comes from the store itself (the subjects' attributes and the index), so a report can be
made anywhere the store is readable. The HTML page embeds its plots (PNG, base64): one file to share.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .report_views import TILES, write_subject_views
from .store import open_subject, subjects

# Per-timestamp figures the stages record (attrs["timestamps"][i]); shown when present.
FIGURES = (("cd_l1_mm", "CD-L1 (mm)"), ("landmark_px", "landmarks (px)"), ("valid_fraction", "valid fraction"),
           ("cross_view_canonical_mm", "cross-view canonical (mm)"), ("gt_canonical_error_mm", "GT canonical, head (mm)"),
           ("gt_canonical_error_mm_face_hair", "GT canonical, face + hair (mm)"), ("gt_depth_absrel", "GT depth AbsRel"))

# Per-subject figures of render against the ground truth (attrs["quality"]), where the capture has one:
# the correspondences the labels define against the true motion, at a 504 px longest side (label_motion).
LABEL_FIGURES = (("label_epe_px_504_m2", "label EPE m=2 (px @504)"), ("label_epe_floor_px_504_m2", "floor m=2"),
                 ("label_epe_confident_half_px_504_m2", "confident half m=2"),
                 ("label_epe_px_504_m8", "label EPE m=8 (px @504)"), ("label_epe_floor_px_504_m8", "floor m=8"),
                 ("label_epe_confident_half_px_504_m8", "confident half m=8"))


def subject_summary(store: str | Path, subject: str) -> dict:
    g = open_subject(store, subject)
    attrs = g.attrs.asdict()
    stamps = attrs.get("timestamps", [])
    out = {"subject": subject, "timestamps": len(stamps), "views": len(attrs.get("serials", [])),
           "reasons": {r: sum(t.get("reason") == r for t in stamps) for r in ("expression", "pose", "first")},
           "resolution": list(g["depth"].shape[2:4]),
           "dense_backend": attrs.get("provenance", {}).get("dense_backend", "none"),
           "color_correction": "applied" if attrs.get("provenance", {}).get("color_correction") else "none",
           "code_version": attrs.get("provenance", {}).get("code_version", ""),
           "config_hash": attrs.get("provenance", {}).get("config_hash", "")}
    for key, _ in FIGURES:
        vals = np.array([float(t[key]) for t in stamps if t.get(key) is not None], float)
        vals = vals[np.isfinite(vals)]
        out[key] = round(float(np.median(vals)), 5) if len(vals) else None
    quality = attrs.get("quality") or {}
    for key, _ in LABEL_FIGURES:
        if quality.get(key) is not None:
            out[key] = quality[key]
    return out


def _label_epe_png(store: str | Path, names: list[str]) -> str | None:
    """Label EPE, its pixel-centre floor and the EPE of the most confident half of the pixels against the
    frame margin (frontal camera, all head, 504 px scale), per subject that has them; None when none does."""
    curves = []
    for s in names:
        epe = (open_subject(store, s).attrs.asdict().get("quality") or {}).get("label_epe") or {}
        rows = sorted((int(m), f["head"]) for m, f in epe.get("margins", {}).items() if "head" in f)
        if rows:
            curves.append((s, rows))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for s, rows in curves:
        m = [r[0] for r in rows]
        line, = ax.plot(m, [r[1]["label_epe_px_504"] for r in rows], "o-", label=f"{s} labels")
        ax.plot(m, [r[1]["floor_epe_px_504"] for r in rows], "--", color=line.get_color(), label=f"{s} floor")
        half = [(mm, r["confident_half"]["label_epe_px_504"]) for mm, r in rows if "confident_half" in r]
        if half:
            ax.plot(*zip(*half), ":", marker=".", color=line.get_color(), label=f"{s} confident half")
    top = max(max(r[1]["label_epe_px_504"] for _, rows in curves for r in rows), 1.72)
    ax.set_ylim(0, 1.15 * top)
    ax.axhline(1.72, color="grey", lw=0.8)
    ax.text(ax.get_xlim()[0], 1.75, " the paper's model at margin 2 (1.72 px)", fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("margin (frames)")
    ax.set_ylabel("EPE (px at 504 px longest side)")
    ax.set_title("label correspondences against the true motion (frontal camera)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def build_report(store: str | Path) -> dict:
    from .training.tables import load_evaluations, paper_tables

    rows = [subject_summary(store, s) for s in subjects(store)]
    evaluations = load_evaluations(store)
    return {"store": str(store), "subjects": rows,
            "timestamps": sum(r["timestamps"] for r in rows), "views": sum(r["timestamps"] * r["views"] for r in rows),
            "evaluations": {p: paper_tables(results) for p, results in evaluations.items()}}


def _plot_png(store: str | Path, names: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(k, label) for k, label in FIGURES]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2))
    for ax, (key, label) in zip(axes, shown):
        data = []
        for s in names:
            stamps = open_subject(store, s).attrs.asdict().get("timestamps", [])
            vals = [float(t[key]) for t in stamps if t.get(key) is not None and np.isfinite(float(t[key]))]
            data.append(vals)
        if any(data):
            ax.boxplot([d if d else [np.nan] for d in data], tick_labels=names)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("per-timestamp quality by subject", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


COLUMN_NAMES = {"subject": "subject", "timestamps": "timestamps", "views": "views", "resolution": "stored H × W (px)",
                "dense_backend": "dense depth", "color_correction": "colour correction",
                **dict(FIGURES), **dict(LABEL_FIGURES)}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " × ".join(map(str, value))
    return str(value)


SUBJECTS_PER_PAGE = 50  # subject sections per page: 414 subjects are 9 pages
PLOTTED_SUBJECTS = 40  # the box plots show the worst this many subjects (one box each)
WORST_BY = ("gt_canonical_error_mm_face_hair", "gt_canonical_error_mm", "cd_l1_mm")  # the first a subject has

# Sorting the summary table by a column (click its header); with ``?check`` in the URL, a check that every
# image decoded and the page fits its window (the result lands on <body> and in the console, where a
# headless browser reads it).
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], down = th.dataset.dir !== "down";
  const key = r => { const v = r.cells[col].dataset.v; return v === undefined ? r.cells[col].textContent : +v; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (down ? -1 : 1))
    .forEach(r => body.appendChild(r));
  th.dataset.dir = down ? "down" : "up";
}));
if (location.search.includes("check")) {  // report.html?check: load every image now, then report
  document.querySelectorAll("img[loading=lazy]").forEach(i => { i.loading = "eager"; });
  window.addEventListener("load", () => {  // the load event waits for every image that is loading
    const images = [...document.images];
    const decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
    const width = document.documentElement.scrollWidth + "/" + window.innerWidth;
    document.body.dataset.imagesDecoded = decoded + "/" + images.length;
    document.body.dataset.pageWidth = width;
    console.log("report-check images " + decoded + "/" + images.length + " width " + width);
    document.body.dataset.pageHeight = document.documentElement.scrollHeight;
    const target = location.hash && document.getElementById(location.hash.slice(1));
    if (target) document.body.dataset.sectionTop = Math.round(target.getBoundingClientRect().top + window.scrollY);
  });
}
"""
_STYLE = ("body{font-family:sans-serif;max-width:1240px;margin:0 auto;padding:0 12px}"
          "table{border-collapse:collapse;width:100%;font-size:13px}"
          "td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}"
          "th{font-weight:600;vertical-align:bottom}td:first-child,th:first-child{text-align:left}"
          "table.sortable th{cursor:pointer}table.sortable th:hover{background:#eef}"
          "img{max-width:100%;height:auto;display:block;margin:8px 0}pre{overflow-x:auto}"
          ".strips{display:flex;flex-wrap:wrap;gap:10px}.strips figure{margin:0;flex:1 1 360px;max-width:600px}"
          "figcaption{font-size:12px;color:#444}nav{margin:10px 0}nav a{margin-right:8px}"
          "section{border-top:2px solid #ccc;margin-top:18px}.figs{font-size:13px;color:#333}")


def _worst_key(rows: list[dict]) -> str | None:
    return next((k for k in WORST_BY if any(r.get(k) is not None for r in rows)), None)


def _page_name(path: Path, page: int) -> str:
    return path.name if page == 0 else f"{path.stem}-{page + 1}{path.suffix}"


def write_html(store: str | Path, report: dict, path: str | Path) -> Path:
    """The report as pages of HTML (``path``, then ``{stem}-2.html`` ... for every
    :data:`SUBJECTS_PER_PAGE` subjects) with their images in ``{stem}_files/`` beside them: page 1 holds
    the summary table (human column names with units, worst subject first, sortable, each subject linked
    to its section) and the plots; every page holds its subjects' sections (figures, thumbnail strips of
    the best, median and worst timestamps, the error by region). Laid out to fit a laptop's window."""
    from .artifacts import atomic_write

    path = Path(path)
    rows = list(report["subjects"])
    worst = _worst_key(rows)
    if worst:
        rows.sort(key=lambda r: -np.inf if r.get(worst) is None else -float(r[worst]))
    names = [r["subject"] for r in rows]
    pages = [names[i:i + SUBJECTS_PER_PAGE] for i in range(0, len(names), SUBJECTS_PER_PAGE)] or [[]]
    page_of = {s: k for k, chunk in enumerate(pages) for s in chunk}
    files = path.parent / f"{path.stem}_files"
    cols = ["subject", "timestamps", "views", "resolution", "dense_backend", "color_correction"] + [k for k, _ in FIGURES]
    cols += [k for k, _ in LABEL_FIGURES if any(r.get(k) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(COLUMN_NAMES.get(c, c))}</th>" for c in cols)

    def cell(r: dict, c: str) -> str:
        value = r.get(c)
        sort = f' data-v="{float(value)}"' if isinstance(value, (int, float)) and value is not None else ""
        text = html.escape(_cell(value))
        if c == "subject":
            text = f'<a href="{_page_name(path, page_of[value])}#s-{html.escape(value)}">{text}</a>'
        return f"<td{sort}>{text}</td>"

    body = "".join("<tr>" + "".join(cell(r, c) for c in cols) + "</tr>" for r in rows)
    plotted = names[:PLOTTED_SUBJECTS]
    img = f'<img src="data:image/png;base64,{_plot_png(store, plotted)}" alt="per-timestamp quality">' if names else ""
    motion = _label_epe_png(store, plotted) if names else None
    if motion:
        img += (f'<h2>label correspondences against the true motion</h2>'
                f'<img src="data:image/png;base64,{motion}" alt="label EPE against margin">')
    by_name = {r["subject"]: r for r in rows}
    written = []
    for k, chunk in enumerate(pages):
        nav = "" if len(pages) == 1 else "<nav>pages: " + "".join(
            f'<a href="{_page_name(path, j)}">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>" for j in range(len(pages))) + "</nav>"
        sections = "".join(_subject_section(store, by_name[s], files, cols) for s in chunk)
        top = ""
        if k == 0:
            order = f"worst first by {COLUMN_NAMES.get(worst, worst)}; " if worst else ""
            top = (f"<p>{len(names)} subjects, {report['timestamps']} timestamps, {report['views']} view-samples; "
                   f"medians over timestamps; {order}click a column to sort.</p>"
                   f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{img}'
                   + "".join(f"<h2>evaluation: {html.escape(p)}</h2><pre>{html.escape(t)}</pre>"
                             for p, t in report.get("evaluations", {}).items()))
        page = (f"<!doctype html><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
                f"<title>facecanon-data report {k + 1}/{len(pages)}</title><style>{_STYLE}</style>"
                f"<h1>{html.escape(str(store))}</h1>{nav}{top}{sections}{nav}<script>{_SCRIPT}</script>")
        target = path.parent / _page_name(path, k)
        atomic_write(target, lambda p, page=page: p.write_text(page))  # a full disk leaves the previous page
        written.append(target)
    for stale in path.parent.glob(f"{path.stem}-*{path.suffix}"):  # pages of a larger store before
        if stale not in written and stale.stem[len(path.stem) + 1:].isdigit():
            stale.unlink()
    return path


def _subject_section(store, row: dict, files: Path, cols: list[str]) -> str:
    """One subject's section: its figures, thumbnail strips and error by region (images written to ``files``)."""
    subject = row["subject"]
    views = write_subject_views(store, subject, files)
    rel = files.name
    figures = ", ".join(f"{html.escape(COLUMN_NAMES.get(c, c))} {html.escape(_cell(row.get(c)))}"
                        for c in cols[1:] if row.get(c) is not None)
    ranked = (f" ranked by {html.escape(COLUMN_NAMES.get(views['ranked_by'], views['ranked_by']))}"
              if views["ranked_by"] else "")
    strips = "".join(
        f'<figure><img loading="lazy" src="{rel}/{html.escape(name)}" alt="{kind} timestamp of {html.escape(subject)}">'
        f"<figcaption>{kind} timestamp{ranked}: {html.escape(stamp)}"
        + ("" if value is None else f" ({value})") + "</figcaption></figure>"
        for kind, (name, _, stamp, value) in views["strips"].items())
    regions = (f'<figure><img loading="lazy" src="{rel}/{html.escape(views["regions"])}" alt="error by region">'
               "<figcaption>label error by region, all timestamps</figcaption></figure>") if views["regions"] else ""
    return (f'<section id="s-{html.escape(subject)}"><h2>subject {html.escape(subject)}</h2>'
            f'<p class="figs">{figures}</p><p class="figs">tiles per view: {", ".join(TILES)} '
            f"(canonical colours on one scale for every subject)</p>"
            f'<div class="strips">{strips}{regions}</div></section>')
