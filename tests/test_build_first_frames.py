"""build: a test-subject manifest line (`timestamps=first:N`) through the batch mode, and the light work folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import build_cmd as _build_cmd, build_pipeline as _pipeline

EXE = Path(sys.executable).parent / "facecanon-data"


@pytest.mark.e2e
def test_a_test_subject_line_builds_its_first_frames_through_the_same_chain(synth_capture, tmp_path):
    """`900 timestamps=first:3 EXP-2-eyes`: the batch mode (`--subject`) builds frames 0, 1, 2 of that
    sequence, no selection, with the chain's labels and the region map; the report counts them."""
    cap = synth_capture["out"] / "capture"
    manifest = tmp_path / "m.txt"
    manifest.write_text("900  timestamps=first:3  EXP-2-eyes\n")
    r = subprocess.run(_build_cmd(manifest, _pipeline(tmp_path, cap), cap, tmp_path) + ["--subject", "900"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from facecanon_data.regions import REGION_LABELS
    from facecanon_data.store import open_subject

    g = open_subject(tmp_path / "store", "900")
    stamps = g.attrs["timestamps"]
    assert [(t["sequence"], t["frame"], t["reason"]) for t in stamps] == [("EXP-2-eyes", f, "first") for f in range(3)]
    region = np.asarray(g["region"][:])
    assert region.shape == g["mask"].shape and region.dtype == np.uint8
    present = set(np.unique(region).tolist())
    assert {REGION_LABELS.index("face"), REGION_LABELS.index("hair")} <= present, present
    rep = subprocess.run([str(EXE), "report", str(tmp_path / "store"), "--json"], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    (row,) = json.loads(rep.stdout.strip().splitlines()[-1])["subjects"]
    assert row["reasons"] == {"expression": 0, "pose": 0, "first": 3}
    _check_report_in_a_browser(tmp_path / "store" / "report.html")
    # consecutive frames with ground truth: the label correspondences against the true motion, in the store
    assert row["label_epe_px_504_m2"] is not None and row["label_epe_floor_px_504_m2"] is not None
    motion = g.attrs["quality"]["label_epe"]
    head = motion["margins"]["2"]["head"]  # frames 0 and 2
    assert 0.2 < head["floor_epe_px"] < 0.6 and head["queries"] > 50, head  # ~0.38 px: matching to pixel centres
    assert head["floor_epe_px"] - 0.1 <= head["label_epe_px"] < 10, head
    assert set(motion["margins"]) == {"1", "2"} and motion["cross_view"]["head"]["queries"] > 50, motion
    half = head["confident_half"]  # the label confidence, stored with the maps, ranks the same queries
    assert half["queries"] == (head["queries"] + 1) // 2 and 0 < half["confidence_min"] <= 1, half
    confidence, mask = np.asarray(g["confidence"][:]), np.asarray(g["mask"][:])
    assert confidence.dtype == np.uint8 and (confidence[~mask] == 0).all() and (confidence[mask] >= 1).all()
    assert len(np.unique(confidence[mask])) > 20  # graded, not a copy of the mask
    # --keep-work light (the default): images, COLMAP workspaces and written maps are gone, masks packed
    work = tmp_path / "work" / "900"
    assert not list(work.glob("reconstruct/*/*/images")) and not list(work.glob("reconstruct/*/*/colmap"))
    assert len(list(work.glob("reconstruct/*/*/masks.npz"))) == 3 and not list(work.glob("render/*/*/maps.npz"))
    # ... and a resume reuses every stage; a new store re-renders and re-decodes the same images
    again = subprocess.run(_build_cmd(manifest, tmp_path / "p.toml", cap, tmp_path) + ["--subject", "900", "--json"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    (o,) = json.loads(again.stdout.strip().splitlines()[-1])["subjects"]
    assert set(o["stages"].values()) == {"reused"}, o["stages"]
    assert o["keep_work"] == "light" and 0 < o["work_mb_per_timestamp"] < 2.0, o
    other = subprocess.run(_build_cmd(manifest, tmp_path / "p.toml", cap, tmp_path / "b") + ["--subject", "900", "--json",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert other.returncode == 0, other.stderr[-3000:]
    (o,) = json.loads(other.stdout.strip().splitlines()[-1])["subjects"]
    assert o["stages"]["render"] == "ran" and o["stages"]["track"] == "reused", o["stages"]
    h = open_subject(tmp_path / "b" / "store", "900")
    for name in ("rgb", "region", "mask", "depth"):
        assert np.array_equal(np.asarray(h[name][:]), np.asarray(g[name][:])), name


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _check_report_in_a_browser(page: Path) -> None:
    """report.html in headless Chromium at a laptop's 1280 px and at 1400 px: no console error, every image
    decoded (the page's own check, written to <body>), no sideways scrolling; screenshots of the top and of
    the subject's section are kept in test-artifacts/."""
    import re
    import shutil

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (`make test` installs it as root; else apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
            "--v=0", "--virtual-time-budget=8000"]
    for width in (1280, 1400):
        r = subprocess.run(base + [f"--window-size={width},900", "--dump-dom", page.as_uri() + "?check#s-900"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
        assert not [c for c in console if "Uncaught" in c or ":ERROR:" in c], console
        # the page's own check (report.html?check: every image loaded before the load event, then counted)
        body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", r.stdout)[0]))
        assert {"images-decoded", "page-width", "page-height", "section-top"} <= set(body), (console, body)
        decoded, shown = map(int, body["images-decoded"].split("/"))
        assert shown >= 6 and decoded == shown, body  # plots, 3 strips, regions: every image decoded
        page_width, window = map(int, body["page-width"].split("/"))
        assert page_width <= window == width, body  # no sideways scrolling
    import cv2  # the whole page at 1400 px, then its top and the subject's section as screenshots

    height, top = int(body["page-height"]), int(body["section-top"])
    whole = ARTIFACTS / "report-page.png"
    r = subprocess.run(base + [f"--window-size=1400,{height}", f"--screenshot={whole}", page.as_uri() + "?check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and whole.is_file(), r.stderr[-2000:]
    image = cv2.imread(str(whole))
    assert image.shape[:2] == (height, 1400)
    for name, start in (("report-top", 0), ("report-subject", top)):
        part = image[start:start + 1100]
        assert part.std() > 20, name  # not a blank page
        cv2.imwrite(str(ARTIFACTS / f"{name}.png"), part)
