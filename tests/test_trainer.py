"""The bundled trainer: losses on hand-computed cases, targets, attention across images, resume,
checkpoint safety, the evaluator's metrics on known answers, CLI, DDP on CPU."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
from pathlib import Path
import pytest
import torch

from fakes import fake_subject
from facecanon_data.store import build_index, write_subject
from facecanon_data.training.config import EvalConfig, ModelConfig, TrainConfig
from facecanon_data.training.evaluate import (Prediction, correspondence_errors, depth_errors, evaluate_model,
                                              face_region_of_labels)
from facecanon_data.training.losses import (confidence_loss, gradient_loss, regression_loss, sample_targets,
                                            total_loss)
from facecanon_data.training.model import FaceAnythingModel, load_pretrained_backbone
from facecanon_data.training.trainer import (init_from_checkpoint, load_checkpoint, model_from_checkpoint,
                                             select_device, train)

TINY = dict(dim=24, depth=2, heads=2, out_layers=[0, 1, 1, 1], head_features=8, head_channels=[4, 8, 8, 8])


def _tiny_toml(out, data: str, optim: str = "") -> str:
    """A trainer TOML with the TINY model, 2 steps, writing to ``out``."""
    model = "\n".join(f"{k} = {v!r}" for k, v in TINY.items())  # ints and int lists: valid TOML
    return f'out = "{out}"\n[model]\n{model}\n[data]\n{data}\n[optim]\nmax_steps = 2\nwarmup_steps = 1\n{optim}\n'


def tiny_config(**optim) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = ModelConfig(**TINY)
    cfg.data.resolutions = [[42, 28], [28, 28]]
    cfg.data.images_per_sample = [2, 3]
    cfg.optim.max_steps, cfg.optim.warmup_steps, cfg.log_every, cfg.checkpoint_every = 4, 2, 1, 100
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-store")
    for i, pid in enumerate(("900", "901")):
        write_subject(path, fake_subject(pid, t=4, views=4, h=84, w=56, seed=i))
    build_index(path)
    return path


# -- losses -----------------------------------------------------------------------------------------
def test_regression_loss_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])[None]  # (1, C=1, 2, 2)
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[True, False], [True, True]]])[None]
    assert regression_loss(pred, target, mask).item() == pytest.approx((1 + 3 + 4) / 3)
    two = torch.cat([pred, 2 * pred], 1)  # channels add: |1|+|2| etc.
    assert regression_loss(two, torch.zeros_like(two), mask).item() == pytest.approx(3 * (1 + 3 + 4) / 3)
    assert regression_loss(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_confidence_loss_hand_computed():
    pred, target = torch.full((1, 1, 1, 2), 3.0), torch.full((1, 1, 1, 2), 1.0)
    conf = torch.tensor([[[[2.0, 4.0]]]])
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    expected = ((2 * 2 - 0.5 * math.log(2)) + (4 * 2 - 0.5 * math.log(4))) / 2
    assert confidence_loss(pred, target, conf, mask, alpha=0.5).item() == pytest.approx(expected)


def test_gradient_loss_hand_computed():
    pred = torch.tensor([[[[0.0, 1.0, 3.0]]]])  # one row: dx of the error = 1, 2
    target = torch.zeros_like(pred)
    full = torch.ones_like(pred, dtype=torch.bool)
    assert gradient_loss(pred, target, full).item() == pytest.approx(1.5)
    partial = torch.tensor([[[[True, True, False]]]])  # only the first pair counts
    assert gradient_loss(pred, target, partial).item() == pytest.approx(1.0)
    assert gradient_loss(pred + 5, pred, full).item() == 0.0  # a constant offset has no gradient error


def test_total_loss_weights_and_invalid_pixels():
    n, h, w = 2, 6, 5
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    mask[:, :, 2:4, 1:3] = True
    targets = {"depth": torch.ones(n, 1, h, w), "canonical": torch.zeros(n, 3, h, w), "ray": torch.zeros(n, 6, h, w),
               "mask": mask}
    pred = {"depth": torch.ones(n, 1, h, w), "canonical": torch.zeros(n, 3, h, w), "ray": torch.zeros(n, 6, h, w)}
    for k in ("depth", "canonical", "ray"):
        pred[f"{k}_conf"] = torch.ones(n, 1, h, w)
    pred["depth"][~mask] = 100.0  # errors where there is no label do not count
    cfg = TrainConfig().loss
    loss, parts = total_loss(pred, targets, cfg)
    assert loss.item() == pytest.approx(0.0) and parts["loss_depth"] == pytest.approx(0.0)
    pred["canonical"] = pred["canonical"] + 0.5  # 3 channels x 0.5 on valid pixels: reg 1.5, conf 1.5
    cfg.canonical = 2.0
    loss, parts = total_loss(pred, targets, cfg)
    assert parts["loss_canonical"] == pytest.approx(3.0) and loss.item() == pytest.approx(6.0)


def test_targets_are_normalized_in_the_first_camera(store):
    from facecanon_data.training.dataset import FaceCanonDataset

    ds = FaceCanonDataset(store, mode="views", images_per_sample=3, resolution=(42, 28))
    s = ds[0]
    t = sample_targets(s, canonical_scale=10.0)
    # re-derive the normalized points of image 1 from its targets: origin + depth * dir / dir_z(camera)
    ray, depth, mask = t["ray"], t["depth"], t["mask"][:, 0]
    torch.testing.assert_close(ray[0, :3], torch.zeros_like(ray[0, :3]), atol=1e-6, rtol=0)  # reference camera
    torch.testing.assert_close(ray[:, 3:].norm(dim=1), torch.ones_like(ray[:, 0]))
    norms = []
    for j in range(3):
        r = s["world_2_cam"][j, :3, :3].double() @ s["world_2_cam"][0, :3, :3].double().T  # cam0 -> cam j
        z = (r @ ray[j, 3:].double().reshape(3, -1))[2].reshape(ray.shape[-2:])  # direction's z in camera j
        pts = ray[j, :3].double() + depth[j, 0].double() / z * ray[j, 3:].double()
        norms.append(pts.norm(dim=0)[mask[j]])
    assert torch.cat(norms).mean().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(t["canonical"], s["canonical"] * 10)


# -- model ------------------------------------------------------------------------------------------
def test_images_of_a_sample_attend_to_each_other_but_not_across_samples():
    torch.manual_seed(0)
    model = FaceAnythingModel(ModelConfig(**TINY)).eval()
    for blk in model.backbone.blocks:  # layer scale starts at 1e-5; let the blocks matter
        blk.ls1.gamma.data.fill_(1.0)
        blk.ls2.gamma.data.fill_(1.0)
    x = torch.rand(1, 2, 3, 28, 28)
    y = x.clone()
    y[0, 1] = torch.rand(3, 28, 28)  # change the second image of the sample
    with torch.no_grad():
        a, b = model(x)["canonical"], model(y)["canonical"]
        assert (a[0, 0] - b[0, 0]).abs().max() > 1e-6  # image 0's output depends on image 1
        sep_x, sep_y = x.transpose(0, 1), y.transpose(0, 1)  # the same images as two separate samples
        c, d = model(sep_x)["canonical"], model(sep_y)["canonical"]
    torch.testing.assert_close(c[0], d[0], atol=0, rtol=0)  # another sample's change does not reach it
    assert (c[1] - d[1]).abs().max() > 1e-6


def test_model_rejects_sizes_off_the_patch_grid():
    model = FaceAnythingModel(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.rand(1, 1, 3, 30, 28))


def test_pretrained_dinov2_state_dict_loads_from_a_local_file(tmp_path):
    src = FaceAnythingModel(ModelConfig(**TINY))
    state = {k: v for k, v in src.backbone.state_dict().items() if k != "reference_embed"}
    state["mask_token"] = torch.zeros(1, TINY["dim"])  # DINOv2 extras are ignored
    torch.save({"model": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "dinov2.pth")
    dst = FaceAnythingModel(ModelConfig(**TINY))
    missing = load_pretrained_backbone(dst, tmp_path / "dinov2.pth")
    assert missing == ["reference_embed"]
    torch.testing.assert_close(dst.backbone.blocks[1].attn.qkv.weight, src.backbone.blocks[1].attn.qkv.weight)
    big = {k: torch.zeros(7, 7) for k in state if k.endswith("qkv.weight")}
    torch.save(big, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth: shapes differ"):
        load_pretrained_backbone(dst, tmp_path / "wrong.pth")


def test_cuda_only_paths_are_guarded():
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        assert select_device("auto").type == "cpu"
        from facecanon_data.errors import InputError

        with pytest.raises(InputError, match="no CUDA device"):
            select_device("cuda")
    model = FaceAnythingModel(ModelConfig(**TINY)).train()  # checkpointing is requested but CPU runs plainly
    out = model(torch.rand(1, 2, 3, 28, 28))
    out["depth"].mean().backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


# -- training -----------------------------------------------------------------------------------------
def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_resumed_run_is_bit_identical(store, tmp_path):
    cfg = tiny_config(max_steps=5)
    cfg.data.color_jitter = 0.3
    train(cfg, store, tmp_path / "straight")
    train(cfg, store, tmp_path / "resumed", stop_after=2)  # "killed" after 2 of 5 steps
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 2
    train(cfg, store, tmp_path / "resumed")
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 5 and a["streams"] == b["streams"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(tmp_path / "straight" / "metrics.jsonl") == _metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000
    log = _metrics(tmp_path / "straight" / "metrics.jsonl")
    assert {tuple(r) for row in log for r in row["resolutions"]} <= {(42, 28), (28, 28)}


def test_two_stage_training_adds_the_canonical_head(store, tmp_path):
    stage1 = tiny_config(max_steps=2)
    stage1.model.outputs = ["depth", "ray"]
    train(stage1, store, tmp_path / "stage1")
    stage2 = tiny_config(max_steps=1)
    model = FaceAnythingModel(stage2.model)
    added = init_from_checkpoint(model, tmp_path / "stage1" / "last.pt")
    assert added == ["canonical"]
    depth_only, _ = model_from_checkpoint(tmp_path / "stage1" / "last.pt")
    torch.testing.assert_close(model.heads["depth"].output[-1].weight, depth_only.heads["depth"].output[-1].weight)


def test_checkpoint_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil(), "config": {}}, protocol=2))
    with pytest.raises(ValueError, match="evil.pt: not a readable checkpoint") as info:
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    assert "system" in str(info.value) and "weights_only" not in str(info.value)  # the reason, not the advice


# -- evaluation ---------------------------------------------------------------------------------------
def test_depth_errors_use_median_scale_alignment():
    gt = np.full((1, 20, 20), 1.0) + np.linspace(0, 0.1, 400).reshape(1, 20, 20)
    mask = np.ones_like(gt, bool)
    absrel, rmse = depth_errors(3.0 * gt, gt, mask)  # a pure scale error is aligned away
    assert absrel[0] == pytest.approx(0.0, abs=1e-12) and rmse[0] == pytest.approx(0.0, abs=1e-12)
    flat = np.full_like(gt, 7.0)
    absrel, _ = depth_errors(flat, gt, mask)
    med = np.median(gt)
    assert absrel[0] == pytest.approx(np.mean(np.abs(med - gt) / gt))


def _oracle_pair(shift: int = 0) -> Prediction:
    """Two 30 x 30 images whose labelled pixels carry unique canonical points; image B is A moved 4 px right."""
    h = w = 30
    rng = np.random.default_rng(0)
    mask = np.zeros((2, h, w), bool)
    mask[0, 5:25, 5:20] = rng.random((20, 15)) > 0.5
    mask[1, :, 4:] = mask[0, :, :-4]
    gt = np.zeros((2, h, w, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    gt[0] = np.stack([xx * 1e-2, yy * 1e-2, np.zeros_like(xx)], -1)
    gt[1, :, 4:] = gt[0, :, :-4]
    pred = gt * 10.0  # a perfect predictor (in canonical_scale units) ...
    pred[1] = np.roll(pred[1], shift, axis=1)  # ... or one whose image B is off by ``shift`` pixels
    pred[~mask] = 1e3 if shift == 0 else pred[~mask]
    return Prediction(canonical=pred, gt_canonical=gt, mask=mask, region=np.ones_like(mask))


def test_epe_is_zero_for_a_perfect_predictor_and_the_shift_otherwise():
    rng = np.random.default_rng(0)
    e, cce = correspondence_errors(_oracle_pair(0), 0, 1, gt_match_mm=1.0, max_queries=1000, rng=rng)
    assert len(e) == _oracle_pair(0).mask[0].sum() and e.max() == 0.0 and cce.max() == 0.0
    e, _ = correspondence_errors(_oracle_pair(2), 0, 1, gt_match_mm=1.0, max_queries=1000, rng=rng)
    assert np.median(e) == pytest.approx(2.0)


def test_face_region_is_the_hull_of_labelled_pixels():
    mask = np.zeros((20, 20), bool)
    mask[2, 2] = mask[2, 17] = mask[17, 2] = mask[17, 17] = True
    region = face_region_of_labels(mask)
    assert region[10, 10] and region.sum() == 16 * 16 and not region[0, 0]


def test_evaluate_reports_the_metrics(store, tmp_path):
    cfg = tiny_config(max_steps=1)
    train(cfg, store, tmp_path / "run")
    model, _ = model_from_checkpoint(tmp_path / "run" / "last.pt")
    r = evaluate_model(model, str(store), EvalConfig(subjects=["901"], resolution=[42, 28], gt_match_mm=50,
                                                     frontal_serial="222200042", margins=[10, 20], cross_view=True))
    assert r["subjects"] == ["901"] and r["depth"]["multi_view"]["images"] == 16
    assert r["depth"]["monocular"]["images"] == 4 and 0 < r["depth"]["monocular"]["absrel"] < 1
    assert {"0", "10", "20"} <= set(r["margins"]) and r["margins"]["10"]["correspondences"] > 100
    m = r["margins"]["10"]
    assert m["pairs"] == 3 and r["margins"]["20"]["pairs"] == 2  # frames 0, 10, 20, 30 of the fake subject
    assert 0 <= m["under_3px"] <= m["under_5px"] <= m["under_10px"] <= 1
    with pytest.raises(ValueError, match="none of the evaluation subjects"):
        evaluate_model(model, str(store), EvalConfig(subjects=["999"], resolution=[42, 28]))


@pytest.mark.e2e
def test_cli_train_evaluate_visualize(store, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "facecanon-data")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(_tiny_toml(tmp_path / "run", data='resolutions = [[42, 28]]\nexclude_subjects = ["901"]'))
    r = subprocess.run([exe, "train", "--store", str(store), "--config", str(cfg), "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["step"] == 2
    proto = tmp_path / "eval.toml"
    proto.write_text('subjects = ["901"]\nresolution = [42, 28]\ngt_match_mm = 50.0\nfrontal_serial = "222200042"\n'
                     'margins = [10, 20]\nfirst_frames = 40\n')
    ckpt = str(tmp_path / "run" / "last.pt")
    r = subprocess.run([exe, "evaluate", "--checkpoint", ckpt, "--store", str(store), "--protocol", str(proto), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["subjects"] == ["901"] and out["margins"]["10"]["epe_px"] > 0
    assert out["depth_alignment"] == "per-image median scale"
    assert Path(out["saved"]).is_file() and Path(out["saved"]).parent.parent == store / "evaluations"
    r = subprocess.run([exe, "report", str(store)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| trained |" in r.stdout and "Margin = 10: EPE(2D)" in r.stdout  # the paper's table layout
    r = subprocess.run([exe, "visualize", "--checkpoint", ckpt, "--store", str(store), "--subject", "901",
                        "--out", str(tmp_path / "viz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "viz" / "maps.png").stat().st_size > 5000
    assert (tmp_path / "viz" / "correspondences.png").stat().st_size > 2000
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([exe, "evaluate", "--checkpoint", str(bad), "--store", str(store)], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.pt: not a readable checkpoint" in r.stderr
    cfg.write_text("[model]\ndim = 25\n")
    r = subprocess.run([exe, "train", "--store", str(store), "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "model.dim must be a multiple of model.heads" in r.stderr


@pytest.mark.cluster
def test_ddp_on_two_cpu_processes(store, tmp_path):
    """torchrun with 2 gloo ranks: each rank gets a disjoint share; the ranks end with the same weights."""
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(_tiny_toml(tmp_path / "ddp", data="resolutions = [[28, 28]]\nbatch_size = 1", optim='device = "cpu"'))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "facecanon_data.cli", "train",
                        "--store", str(store), "--config", str(cfg), "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 and all(x["world_size"] == 2 and x["step"] == 2 for x in results)
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["step"] == 2


def test_a_checkpoint_asking_for_a_huge_model_is_refused_before_allocation(tmp_path):
    from facecanon_data.training.config import TrainConfig
    from facecanon_data.training.trainer import model_from_checkpoint

    import dataclasses

    cfg = dataclasses.asdict(TrainConfig())
    cfg.pop("source_file")
    cfg["model"]["dim"], cfg["model"]["heads"] = 3 * 10 ** 6, 3
    path = tmp_path / "bomb.pt"
    torch.save({"model": {}, "config": cfg}, path)
    with pytest.raises(ValueError, match=r"bomb.pt: config: model.dim = 3000000 is outside"):
        model_from_checkpoint(path)
    cfg["model"]["dim"], cfg["model"]["heads"], cfg["model"]["depth"] = 4096, 64, 64
    cfg["model"]["out_layers"] = [1, 2, 3, 4]
    torch.save({"model": {}, "config": cfg}, path)
    with pytest.raises(ValueError, match=r"would hold ~\d+ G parameters"):
        model_from_checkpoint(path)
