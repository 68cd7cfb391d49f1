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


def test_the_reference_pages_are_what_the_code_generates():
    r = subprocess.run([str(EXE), "docs", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\nregenerate with `facecanon-data docs`"


def test_docs_check_fails_on_a_stale_page_and_docs_regenerates_it(tmp_path):
    import shutil

    from facecanon_data.docgen import PAGES

    out = tmp_path / "docs"
    out.mkdir()
    for name in PAGES:
        shutil.copy(ROOT / "docs" / name, out / name)
    page = out / "configuration.md"
    page.write_text(page.read_text().replace("| `downscale` | int | `4` |", "| `downscale` | int | `2` |"))
    (out / "store.md").unlink()
    r = subprocess.run([str(EXE), "docs", "--check", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "configuration.md" in r.stderr and "store.md" in r.stderr and "cli.md" not in r.stderr
    assert not (out / "store.md").exists()  # --check writes nothing
    assert subprocess.run([str(EXE), "docs", "--out", str(out)], capture_output=True).returncode == 0
    assert subprocess.run([str(EXE), "docs", "--check", "--out", str(out)], capture_output=True).returncode == 0
    assert (out / "configuration.md").read_text() == (ROOT / "docs" / "configuration.md").read_text()


def test_every_configuration_key_and_stored_array_is_documented():
    import dataclasses

    from facecanon_data.config import PipelineConfig, opt
    from facecanon_data.store import SCHEMA
    from facecanon_data.training.config import EvalConfig, TrainConfig

    config_page = (ROOT / "docs" / "configuration.md").read_text()

    def keys(cls):
        for f in dataclasses.fields(cls):
            if f.name == "source_file":
                continue
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                yield from keys(f.default_factory)
            else:
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
                yield f.name

    for cls in (PipelineConfig, TrainConfig, EvalConfig):
        for key in keys(cls):
            assert f"| `{key}` |" in config_page, key
    store_page = (ROOT / "docs" / "store.md").read_text()
    assert all(f"| `{spec.name}` | `{spec.shape_text()}` | {spec.dtype}" in store_page for spec in SCHEMA)
    try:
        opt(1, "")
    except TypeError:
        pass
    else:
        raise AssertionError("a configuration field without help was accepted")
