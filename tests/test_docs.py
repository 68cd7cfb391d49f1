"""What the README promises a new user: its loading example runs, its figure command draws the labels."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from fakes import fake_subject
from facecanon_data.store import build_index, write_subject

ROOT = Path(__file__).parent.parent
EXE = Path(sys.executable).parent / "facecanon-data"


def _store(tmp_path):
    path = tmp_path / "synth-out" / "store"
    write_subject(path, fake_subject("900", t=2, views=6))
    build_index(path)
    return path


def test_the_readme_loading_example_runs(tmp_path):
    _store(tmp_path)
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "FaceCanonDataset" in block and len(block.strip().splitlines()) <= 12
    r = subprocess.run([sys.executable, "-c", block.replace("batch_size=2", "batch_size=1")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_figure_draws_a_view_its_depth_and_its_canonical_map(tmp_path):
    import cv2

    store = _store(tmp_path)
    out = tmp_path / "fig.png"
    r = subprocess.run([str(EXE), "figure", str(store), "--out", str(out), "--scale", "1", "--timestamp", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    image = cv2.imread(str(out))[..., ::-1]
    assert image.shape == (60, 3 * 40, 3)
    data = fake_subject("900", t=2, views=6)
    v = data.serials.index("222200037") if "222200037" in data.serials else 0
    assert np.array_equal(image[:, :40], data.rgb[1, v])  # the stored view itself
    unlabelled = ~data.mask[1, v]
    assert (image[:, 40:80][unlabelled] == 0).all() and (image[:, 80:][unlabelled] == 0).all()
    assert (image[:, 80:][~unlabelled].sum(axis=-1) > 0).mean() > 0.99
    bad = subprocess.run([str(EXE), "figure", str(store), "--out", str(out), "--view", "123"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "has no view 123" in bad.stderr
