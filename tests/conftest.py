"""Shared fixtures and the suite's tiers.

Tiers (pytest markers; ``make check`` runs ``unit``, ``make test`` runs all of them, two at a time):

- ``unit``: pure functions, fakes and small hand-made stores; seconds in all.
- ``stage``: a stage or an algorithm on the embedded synthetic capture (rendered once per session).
- ``e2e``: the command line end to end (``build`` in a subprocess, kills, concurrent runs, training).
- ``cluster``: a real SLURM scheduler or several training processes.

A test takes the tier it is marked with; unmarked, it is ``stage`` when it uses the synthetic capture and
``unit`` otherwise. The synthetic capture is rendered once per session and, under pytest-xdist, once for
all workers (the first renders it under a file lock, the others read it). ``make test`` hands out whole
files (``--dist loadfile``), so a module's fixtures (the SLURM scheduler) live in one worker, and caps
each worker at one thread, so two workers on two cores do not fight over them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from facecanon_data.config import load_pipeline
from facecanon_data.paths import default_pipeline
from facecanon_data.threads import thread_env

if "PYTEST_XDIST_WORKER" in os.environ:  # before torch or OpenCV is imported; subprocesses inherit it
    for _name, _value in thread_env(1).items():
        os.environ.setdefault(_name, _value)

logging.getLogger("absl").setLevel(logging.ERROR)

TIERS = ("cluster", "e2e", "stage", "unit")  # also the order tests start in: the longest first


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker("stage" if "synth_capture" in getattr(item, "fixturenames", ()) else "unit")
    rank = {t: i for i, t in enumerate(TIERS)}
    items.sort(key=lambda it: min(rank[t] for t in TIERS if it.get_closest_marker(t)))  # stable within a tier


@pytest.fixture(scope="session")
def pipeline():
    return load_pipeline(default_pipeline())


@pytest.fixture(scope="session")
def synth_capture(tmp_path_factory):
    """1 subject x 2 sequences x 8 frames x 16 cameras at the demo resolution, with the FaceMesh check."""
    from filelock import FileLock

    from facecanon_data.synthetic.synth import SynthReport, synthesize

    cfg = load_pipeline(default_pipeline(), {"synth": {"frames": 8, "sequences": 2, "subjects": 1, "seed": 0}})
    if "PYTEST_XDIST_WORKER" not in os.environ:  # no xdist: this process alone
        out = tmp_path_factory.mktemp("synth")
        return {"out": out, "report": synthesize(cfg, out=out, verify=True), "cfg": cfg}
    shared = tmp_path_factory.getbasetemp().parent  # one folder for all workers of this run
    out, done = shared / "synth", shared / "synth.report.json"
    with FileLock(str(shared / "synth.lock")):
        if not done.exists():
            report = synthesize(cfg, out=out, verify=True)
            done.write_text(json.dumps(dataclasses.asdict(report)))  # written last: the capture is complete
    return {"out": out, "report": SynthReport(**json.loads(done.read_text())), "cfg": cfg}


@pytest.fixture(scope="session")
def head_assets(pipeline):
    from facecanon_data.flame.assets import load_assets

    return load_assets(pipeline.flame)
