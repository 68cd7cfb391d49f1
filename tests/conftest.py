"""Shared fixtures: one small synthetic capture per test session (deterministic, seed 0)."""
from __future__ import annotations

import logging

import pytest

from facecanon_data.config import load_pipeline
from facecanon_data.paths import default_pipeline

logging.getLogger("absl").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def pipeline():
    return load_pipeline(default_pipeline())


@pytest.fixture(scope="session")
def synth_capture(tmp_path_factory, pipeline):
    """1 subject x 2 sequences x 8 frames x 16 cameras at the demo resolution, with the FaceMesh check."""
    from facecanon_data.config import load_pipeline
    from facecanon_data.synthetic.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    cfg = load_pipeline(default_pipeline(), {"synth": {"frames": 8, "sequences": 2, "subjects": 1, "seed": 0}})
    report = synthesize(cfg, out=out, verify=True)
    return {"out": out, "report": report, "cfg": cfg}


@pytest.fixture(scope="session")
def head_assets(pipeline):
    from facecanon_data.flame.assets import load_assets

    return load_assets(pipeline.flame)
