"""The stage contract and its runner on in-memory fakes: which stages rerun after which change.

The fakes keep every stage's declaration (reads, config sections, units, key_extra) and replace only
the work, so the whole invalidation table runs in well under a second.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from facecanon_data.config import PipelineConfig
from facecanon_data.orchestration import build as build_mod
from facecanon_data.stages import chain as chain_mod
from facecanon_data.stages.contract import Stage, StageOption, check_chain

ALL = {"select", "reconstruct", "track", "canonicalize", "render", "write"}
FROM_RECONSTRUCT = ALL - {"select"}
FROM_TRACK = {"track", "canonicalize", "render", "write"}

# Written out by hand (not derived from the declaration): what a change of each section must rerun.
SECTION_CHANGES = {
    "capture": ALL,
    "select": ALL,
    "reconstruct": FROM_RECONSTRUCT,
    "flame": FROM_TRACK,
    "track": FROM_TRACK,
    "canonicalize": {"canonicalize", "render", "write"},
    "render": {"render", "write"},
    "synth": set(),  # only the synthetic capture's generator reads it
    "slurm": set(),  # where stages run does not change what they produce
    "threads": set(),
}
FORCED = {
    "select": ALL,
    "reconstruct": FROM_RECONSTRUCT,
    "track": FROM_TRACK,
    "canonicalize": {"canonicalize", "render", "write"},
    "render": {"render", "write"},
    "write": {"write"},
}


class FakeWork:
    """Counts what each fake stage computed; the store is a folder with one file per commit."""

    def __init__(self):
        self.ran: list[str] = []
        self.units: list[tuple[str, int]] = []

    def plain(self, name):
        def run(ctx):
            self.ran.append(name)
            (ctx.work / ctx.subject / name / "out.txt").write_text(name)
            if name == "select":
                n = ctx.cfg.select.num_expression
                return {"selection": [["EXP-1-head", 10 * i, "expression", i] for i in range(n)]}
            if name == "write":
                (ctx.store / ctx.subject).mkdir(parents=True, exist_ok=True)
                (ctx.store / ctx.subject / "commit").write_text(ctx.key)
            return {"stage": name}
        return run

    def run_units(self, ctx, units):
        for unit in units:
            self.units.append(unit)
            yield unit, {"key": f"{unit[0]}/{unit[1]:06d}", "kept": True}

    def finish(self, ctx, results):
        self.ran.append("reconstruct")
        return {"kept": [r["key"] for r in results], "dropped": {}}


def _fake_chain(work: FakeWork):
    def fake(stage: Stage) -> Stage:
        if stage.fans_out:
            return dataclasses.replace(stage, check=None, run_units=work.run_units, finish=work.finish)
        if stage.name == "write":  # the store holds this very commit
            present = (lambda ctx, rec: (ctx.store / ctx.subject / "commit").is_file()
                       and (ctx.store / ctx.subject / "commit").read_text() == rec["key"])
        elif stage.still_present:  # outputs a work-folder policy may remove (render's maps)
            present = (lambda ctx, rec, name=stage.name: (ctx.work / ctx.subject / name / "out.txt").is_file())
        else:
            present = None
        return dataclasses.replace(stage, run=work.plain(stage.name), check=None, still_present=present)
    return tuple(fake(s) for s in chain_mod.CHAIN)


@pytest.fixture
def fakes(monkeypatch):
    work = FakeWork()
    chain = _fake_chain(work)
    monkeypatch.setattr(build_mod, "CHAIN", chain)
    monkeypatch.setattr(build_mod, "STAGES", {s.name: s for s in chain})
    return work


def _cfg() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.select.num_expression, cfg.select.num_pose = 3, 0
    return cfg


def _mutate(cfg: PipelineConfig, section: str) -> PipelineConfig:
    """A copy of ``cfg`` with one value of ``section`` changed."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in
                                      dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))})
    if section == "threads":
        cfg.threads += 1
        return cfg
    table = getattr(cfg, section)
    for f in dataclasses.fields(table):
        value = getattr(table, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(table, f.name, value + 1)
            return cfg
        if isinstance(value, str):
            setattr(table, f.name, value + "x")
            return cfg
    raise AssertionError(f"no value to change in [{section}]")


def _build(fakes: FakeWork, cfg, tmp_path: Path, store="store", force=()):
    fakes.ran.clear()
    fakes.units.clear()
    out = build_mod.run_subject_inline(build_mod.SourceSpec("never-opened", None), "900", cfg, str(tmp_path / "work"), str(tmp_path / store), force)
    assert out.ok, out.reason
    assert set(out.stages) == ALL
    assert {s for s, status in out.stages.items() if status == "ran"} == set(fakes.ran)
    return set(fakes.ran), out


def test_every_section_change_reruns_exactly_what_depends_on_it(fakes, tmp_path):
    assert _build(fakes, _cfg(), tmp_path)[0] == ALL
    assert _build(fakes, _cfg(), tmp_path)[0] == set()  # identical: everything reused
    for section, expected in SECTION_CHANGES.items():
        changed = _mutate(_cfg(), section)
        assert _build(fakes, changed, tmp_path)[0] == expected, section
        assert _build(fakes, _cfg(), tmp_path)[0] == expected, f"{section} changed back"


def test_force_reruns_the_stage_and_everything_downstream_only(fakes, tmp_path):
    _build(fakes, _cfg(), tmp_path)
    for stage, expected in FORCED.items():
        assert _build(fakes, _cfg(), tmp_path, force=(stage,))[0] == expected, stage
    assert _build(fakes, _cfg(), tmp_path)[0] == set()


def test_another_store_or_a_lost_commit_rewrites_only_the_store(fakes, tmp_path):
    _build(fakes, _cfg(), tmp_path)
    assert _build(fakes, _cfg(), tmp_path, store="other")[0] == {"write"}
    (tmp_path / "other" / "900" / "commit").write_text("somebody else's commit")
    assert _build(fakes, _cfg(), tmp_path, store="other")[0] == {"write"}


def test_a_new_selection_reconstructs_only_new_timestamps_and_drops_the_old(fakes, tmp_path):
    _build(fakes, _cfg(), tmp_path)
    more = _cfg()
    more.select.num_expression = 5
    ran, out = _build(fakes, more, tmp_path)
    assert ran == ALL and fakes.units == [("EXP-1-head", 30), ("EXP-1-head", 40)]
    fewer = _cfg()
    fewer.select.num_expression = 2
    ran, out = _build(fakes, fewer, tmp_path)
    assert fakes.units == [] and out.timestamps_kept == 2  # all reused, and only the two still selected kept
    marker = json.loads((tmp_path / "work" / "900" / "reconstruct" / "_DONE.json").read_text())
    assert marker["figures"]["kept"] == ["EXP-1-head/000000", "EXP-1-head/000010"]


def test_a_rerun_stage_leaves_no_output_of_its_previous_run(fakes, tmp_path):
    _build(fakes, _cfg(), tmp_path)
    stale = tmp_path / "work" / "900" / "render" / "EXP-1-head" / "000040"
    stale.mkdir(parents=True)
    changed = _mutate(_cfg(), "render")
    _build(fakes, changed, tmp_path)
    assert not stale.exists()


def test_a_stage_out_of_order_is_a_clear_input_error(tmp_path):
    from facecanon_data.errors import InputError
    from facecanon_data.orchestration.runner import run_stage
    from facecanon_data.stages.contract import StageContext

    ctx = StageContext(open_source=lambda: None, subject="900", cfg=_cfg(), work=tmp_path)
    with pytest.raises(InputError, match=r"900/canonicalize: stage canonicalize has not completed .*render reads it"):
        run_stage(chain_mod.STAGES["render"], ctx)


def test_the_chain_declaration_is_checked():
    noop = dict(help="", describe=lambda s, f: "", run=lambda ctx: {})
    with pytest.raises(TypeError, match="reads \\['b'\\], declared after it"):
        check_chain((Stage("a", reads=("b",), sections=(), **noop), Stage("b", reads=(), sections=(), **noop)))
    with pytest.raises(TypeError, match="give either run or all of"):
        Stage("a", reads=(), sections=(), help="", describe=lambda s, f: "", units=lambda ctx: [])
    assert StageOption("x", "--x", "h").flag == "--x"


def test_imports_run_one_way():
    """cli -> orchestration -> stages -> sources / flame / store -> small utilities, never back; stages
    know nothing of Dask, and nothing the pipeline runs imports the synthetic capture's generator."""
    import ast

    package = Path(__file__).parent.parent / "facecanon_data"
    rank = {"cli": 5, "docgen": 5, "bench": 5, "orchestration": 4, "training": 4, "report": 4, "report_views": 4, "figures": 4, "synthetic": 3, "stages": 2,
            "sources": 1, "flame": 1, "store": 1, "chunk_reader": 1, "features": 1, "manifest": 1}  # else 0
    problems = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        here = rank.get(parts[0], 0)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = list(parts[:-1])[:len(parts) - node.level] + (node.module or "").split(".")
                if rank.get(target[0], 0) > here:
                    problems.append(f"{'/'.join(parts)} imports {'.'.join(target)}")
            if isinstance(node, ast.Import) and parts[0] == "stages":
                problems += [f"{'/'.join(parts)} imports {a.name}" for a in node.names
                             if a.name.split(".")[0] in ("dask", "distributed")]
    assert not problems, problems
