"""engine=detectron2: norm names registered in detectron2, its config, a short train_coco.py run
with preemption and resume, the non-finite-loss stop, ImageNet weight conversion and the
message when detectron2 is missing."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source to run these)")
pytestmark = [pytest.mark.detectron2, pytest.mark.filterwarnings("ignore::DeprecationWarning:detectron2.*")]

import detectron2.layers  # noqa: E402
import detectron2.layers.batch_norm  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from hydra_configs import ROOT, compose_config  # noqa: E402
from run_files import read_metrics, read_summary  # noqa: E402
from torchrun import torchrun  # noqa: E402

import mabn  # noqa: E402
from mabn.config import NormSpec  # noqa: E402
from mabn.detectors import detectron2_registration as registration  # noqa: E402
from mabn.engine.coco.detectron2_config import build_detectron2_cfg  # noqa: E402
from mabn.engine.coco.detectron2_trainer import (  # noqa: E402
    AsDetectron2Hook,
    Trainer,
    build_detectron2_model,
    train,
)
from mabn.engine.coco.detectron2_weights import load_backbone_weights  # noqa: E402
from mabn.engine.hooks import Checkpoints, NonFiniteLoss  # noqa: E402
from mabn.engine.run import Run  # noqa: E402
from mabn.models import build_classifier  # noqa: E402
from mabn.norms.centralization import is_centralized  # noqa: E402
from mabn.norms.wired import NeedsWiring  # noqa: E402
from mabn.registry import norm_layer  # noqa: E402
from mabn.wiring import centralize_weights, conv_norm_pairs  # noqa: E402

WIRED_SUITE_NAMES = {name for name in mabn.NORMS if isinstance(mabn.build_norm(name, 64), NeedsWiring)}

AP_KEYS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
SUITE_NORMS = {
    "mabn": mabn.MABN2d,
    "brn": mabn.BatchRenorm2d,
    "bn": mabn.BatchNorm2d,
    "syncbn": mabn.SyncBatchNorm,
    "powernorm": mabn.PowerNorm2d,
}
USERS_OF_GET_NORM = (
    "detectron2.layers",
    "detectron2.layers.blocks",
    "detectron2.modeling.backbone.resnet",
    "detectron2.modeling.backbone.fpn",
    "detectron2.modeling.backbone.regnet",
    "detectron2.modeling.roi_heads.box_head",
    "detectron2.modeling.roi_heads.mask_head",
    "detectron2.modeling.meta_arch.retinanet",
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Overrides for a tiny fashion_scenes set (generated on first use) and a CPU-sized run."""
    root = tmp_path_factory.mktemp("scenes")
    return [
        "engine=detectron2",
        f"data.root={root}",
        "data.train_images=8",
        "data.val_images=4",
        "data.val_images_limit=2",
        "workers=0",
        "log_every_steps=1",
        "detector.rpn_pre_nms_test=50",
        "detector.detections_per_image=10",
    ]


def build(scenes, tmp_path, *overrides):
    cfg = compose_config("train_coco", [*scenes, *overrides])
    d2cfg = build_detectron2_cfg(cfg, tmp_path)
    return cfg, d2cfg, build_detectron2_model(d2cfg, cfg, NormSpec.from_config(cfg.norm))


def parts(model):
    body = model.backbone.bottom_up
    in_body = {id(m) for m in body.modules()}
    return {
        "body": list(body.modules()),
        "fpn": [m for m in model.backbone.modules() if id(m) not in in_body],
        "box": list(model.roi_heads.box_head.modules()),
        "mask": list(model.roi_heads.mask_head.modules()),
    }


@pytest.mark.parametrize("norm", sorted(SUITE_NORMS))
def test_norm_names_build_suite_layers_in_backbone_fpn_and_heads(norm, scenes, tmp_path):
    cfg, d2cfg, model = build(scenes, tmp_path, f"norm={norm}")
    kind = SUITE_NORMS[norm]
    assert (
        d2cfg.MODEL.RESNETS.NORM
        == d2cfg.MODEL.FPN.NORM
        == d2cfg.MODEL.ROI_BOX_HEAD.NORM
        == d2cfg.MODEL.ROI_MASK_HEAD.NORM
        == {"mabn": "MABN", "brn": "BRN", "bn": "BN_NB", "syncbn": "SyncBN_ANY", "powernorm": "PowerNorm"}[norm]
    )
    counts = {name: sum(isinstance(m, kind) for m in modules) for name, modules in parts(model).items()}
    assert counts == {"body": 20, "fpn": 8, "box": 4, "mask": 4}  # R18: stem + 16 block convs + 3 shortcuts
    assert not any(isinstance(m, kind) for m in model.proposal_generator.modules())  # no norm in the RPN head
    assert not any(
        isinstance(m, (detectron2.layers.FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules()
    )
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0: nothing frozen
    pairs = [(conv, n) for _, conv, _, n in conv_norm_pairs(model) if isinstance(n, kind)]
    assert len(pairs) == 36
    assert all(is_centralized(conv) == (norm == "mabn") for conv, _ in pairs)
    if norm == "mabn":  # options of the config reach every layer
        assert all(n.sma_window == cfg.norm.options.sma_window == 16 for _, n in pairs)


SUCCESSORS = {
    "cbn": ("CBN", mabn.CrossIterationBatchNorm2d),
    "gn_ws": ("GN_WS", mabn.GroupNormWS),
    "evonorm_b0": ("EvoNormB0", mabn.EvoNormB0),
    "evonorm_s0": ("EvoNormS0", timm.layers.EvoNorm2dS0),
    "frn": ("FRN", timm.layers.FilterResponseNormTlu2d),
}


@pytest.mark.parametrize("norm", sorted(SUCCESSORS))
def test_successor_names_build_wire_and_train_through_train_coco(norm, scenes, tmp_path):
    d2_name, kind = SUCCESSORS[norm]
    cfg, d2cfg, model = build(scenes, tmp_path, f"norm={norm}")
    assert d2cfg.MODEL.RESNETS.NORM == d2cfg.MODEL.FPN.NORM == d2cfg.MODEL.ROI_MASK_HEAD.NORM == d2_name
    counts = {name: sum(isinstance(m, kind) for m in modules) for name, modules in parts(model).items()}
    assert counts == {"body": 20, "fpn": 8, "box": 4, "mask": 4}
    body = model.backbone.bottom_up
    if norm in ("evonorm_b0", "evonorm_s0", "frn"):  # the paper's block: the norm takes the ReLU after it
        acts = lambda layer: getattr(layer, "v", getattr(layer, "tau", None)) is not None
        block = body.res2[0]
        assert type(block) is registration.NormActBasicBlock and acts(block.conv1.norm) and not acts(block.conv2.norm)
        x = torch.randn(1, block.in_channels, 8, 8)
        torch.testing.assert_close(block(x), torch.relu(block.conv2(block.conv1(x)) + x))
        assert model.roi_heads.box_head.conv1.activation is None and acts(model.roi_heads.box_head.conv1.norm)
        assert not any(
            acts(m)
            for m in model.backbone.modules()
            if isinstance(m, kind) and id(m) not in {id(n) for n in body.modules()}
        )  # FPN: no activation
    if norm == "cbn":
        assert all(n._conv is not None for n in model.modules() if isinstance(n, kind))
    if norm == "gn_ws":
        assert all(
            parametrize.is_parametrized(conv, "weight")
            for _, conv, _, n in conv_norm_pairs(model)
            if isinstance(n, kind)
        )
    summary = train(compose_config("train_coco", [*scenes, f"norm={norm}", "max_steps=2"]), tmp_path / "run")
    assert summary["engine"] == "detectron2" and summary["steps"] == 2
    assert all(0.0 <= summary[k] <= 100.0 for k in AP_KEYS)
    if norm == "cbn":  # burn-in for 8/12 of the run's steps, as the torchvision engine
        assert summary["norm_schedule"] == {"CrossIterationBatchNorm2d": {"burnin": 1}} and summary["label"] == "cbn"


def test_registration_is_idempotent_and_keeps_detectron2_names():
    registration.register_detectron2_norms()
    registration.register_detectron2_norms()
    original = registration.get_norm.__wrapped__  # detectron2's own function, wrapped once, not twice
    assert original.__module__ == "detectron2.layers.batch_norm" and not hasattr(original, "__wrapped__")
    for name in USERS_OF_GET_NORM:
        assert sys.modules[name].get_norm is registration.get_norm, name
    get_norm = detectron2.layers.get_norm
    with registration.building_with({"mabn": {"sma_window": 8}, "bn": {"normalization_batch": 2}}) as made:
        assert get_norm("MABN", 16).sma_window == 8
        assert get_norm("BN_NB", 16).normalization_batch == 2
    assert len(made) == 2 and get_norm("MABN", 16).sma_window == 16  # outside the block: the defaults
    assert isinstance(get_norm("BRN", 16), mabn.BatchRenorm2d)
    assert type(get_norm("BN", 16)) is type(original("BN", 16)) and isinstance(get_norm("BN", 16), nn.BatchNorm2d)
    assert type(get_norm("GN", 64)) is nn.GroupNorm and get_norm("GN", 64).num_groups == 32
    assert isinstance(get_norm("FrozenBN", 8), detectron2.layers.FrozenBatchNorm2d)
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    with pytest.raises(KeyError):
        get_norm("NOPE", 8)


def plain(node):
    """A config as nested dicts and lists (yaml gives lists where the defaults hold tuples)."""
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    return [plain(v) for v in node] if isinstance(node, (list, tuple)) else node


def test_config_dumps_and_loads_back(scenes, tmp_path):
    cfg = compose_config("train_coco", [*scenes, "norm=mabn"])
    d2cfg = build_detectron2_cfg(cfg, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(d2cfg.dump())
    loaded = get_cfg()
    loaded.merge_from_file(str(path))
    assert plain(loaded) == plain(d2cfg) and loaded.MODEL.RESNETS.NORM == "MABN"
    assert (loaded.MODEL.RESNETS.DEPTH, loaded.MODEL.RESNETS.RES2_OUT_CHANNELS, loaded.MODEL.BACKBONE.FREEZE_AT) == (
        18,
        64,
        0,
    )
    assert (loaded.MODEL.ROI_BOX_HEAD.NUM_CONV, loaded.MODEL.ROI_BOX_HEAD.NUM_FC, loaded.MODEL.ROI_BOX_HEAD.FC_DIM) == (
        4,
        1,
        256,
    )
    assert loaded.SOLVER.IMS_PER_BATCH == 2 and loaded.SOLVER.BASE_LR == pytest.approx(
        0.08 * 2 / 16
    )  # optim/sgd_scenes
    model = build_detectron2_model(loaded, cfg, NormSpec.from_config(cfg.norm))
    assert sum(isinstance(m, mabn.MABN2d) for m in model.modules()) == 36


def cli(*overrides, timeout=300):
    return subprocess.run(
        [sys.executable, "train_coco.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.multiprocess
def test_train_coco_preempted_then_resumed(scenes, tmp_path):
    overrides = [*scenes, "norm=mabn", "max_steps=3", f"hydra.run.dir={tmp_path}"]
    first = cli(*overrides, "debug.preempt_at_step=2")
    assert first.returncode != 0 and "stopped by signal SIGTERM" in first.stderr, first.stderr[-2000:]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "summary.json").exists()
    second = cli(*overrides)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2 of 3" in second.stdout
    summary = read_summary(tmp_path)
    assert summary["engine"] == "detectron2" and summary["steps"] == 3 and summary["norm"] == "mabn"
    assert all(0.0 <= summary[k] <= 100.0 for k in AP_KEYS) and summary["images_per_second"] > 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert {"train/loss_mask", "train/loss_cls", "train/lr", "train/images_per_second"} <= set(records[0])
    assert all(f"final/eval/{k}" in records[-1] for k in AP_KEYS)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    final = torch.load(tmp_path / "model_final.pt", weights_only=True)
    assert any(k.endswith("conv1.parametrizations.weight.original") for k in final)  # centralized convs
    # with workers=0 the resumed run matches an uninterrupted one (not promised in general: see the engine)
    straight = tmp_path / "straight"
    train(compose_config("train_coco", [*scenes, "norm=mabn", "max_steps=3"]), straight)
    losses = lambda d: [r["train/loss"] for r in read_metrics(d) if "train/loss" in r]
    assert losses(straight) == losses(tmp_path)
    straight_final = torch.load(straight / "model_final.pt", weights_only=True)
    assert all(torch.equal(value, straight_final[key]) for key, value in final.items())


def test_stop_at_step_cuts_the_run_and_it_continues_exactly(scenes, tmp_path):
    """stop_at_step=2 of 3: stopped there with the 3-iteration schedules, summary written; the
    same folder without it trains on to the run that never stopped."""
    overrides = [*scenes, "norm=cbn", "max_steps=3", "log_every_steps=1"]
    straight = train(compose_config("train_coco", overrides), tmp_path / "straight")
    stopped = train(compose_config("train_coco", [*overrides, "stop_at_step=2"]), tmp_path / "cut")
    assert stopped["steps"] == 2 and stopped["norm_schedule"] == straight["norm_schedule"]
    train(compose_config("train_coco", overrides), tmp_path / "cut")
    losses = lambda d: [r["train/loss"] for r in read_metrics(d) if "train/loss" in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    final = lambda d: torch.load(d / "model_final.pt", weights_only=True)
    assert all(torch.equal(value, final(tmp_path / "straight")[key]) for key, value in final(tmp_path / "cut").items())


def test_accumulated_micro_batches_make_one_step_and_resume_exactly(scenes, tmp_path):
    """accumulate_steps=2: the loader's 4 images per step in 2 micro-batches; stopped after step 1
    and continued, the run ends as the one that never stopped."""
    overrides = [*scenes, "norm=mabn", "max_steps=3", "log_every_steps=1", "accumulate_steps=2"]
    straight = train(compose_config("train_coco", overrides), tmp_path / "straight")
    assert straight["images_per_step"] == 4 and straight["steps"] == 3
    train(compose_config("train_coco", [*overrides, "stop_at_step=1"]), tmp_path / "cut")
    train(compose_config("train_coco", overrides), tmp_path / "cut")
    losses = lambda d: [r["train/loss"] for r in read_metrics(d) if "train/loss" in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


@pytest.mark.multiprocess
def test_two_process_ddp_with_torchrun(scenes, tmp_path):
    """One process per device started by torchrun (or SLURM), not by detectron2's launch()."""
    result = torchrun("train_coco.py", *scenes, "norm=mabn", "max_steps=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["engine"] == "detectron2"
    assert all(0.0 <= summary[k] <= 100.0 for k in AP_KEYS)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]  # rank 0 alone logs
    assert (result.stdout + result.stderr).count("Start inference on 1 batches") == 2  # 2 val images, 1 per process


def test_unreadable_images_are_replaced_listed_and_evaluated_once(scenes, tmp_path, monkeypatch, capsys):
    own_scenes = [*scenes, f"data.root={tmp_path / 'scenes'}", "data.max_bad_fraction=0.5"]  # one file each broken
    cfg = compose_config("train_coco", [*own_scenes, "norm=bn", "max_steps=4"])  # 4 x 2 images: all 8 drawn
    d2cfg = build_detectron2_cfg(cfg, tmp_path / "run")
    truncated = DatasetCatalog.get(d2cfg.DATASETS.TRAIN[0])[3]["file_name"]
    Path(truncated).write_bytes(Path(truncated).read_bytes()[:100])
    val = DatasetCatalog.get(d2cfg.DATASETS.TEST[0])
    Path(val[0]["file_name"]).unlink()  # val sample 0 becomes a copy of sample 1
    evaluated = []
    monkeypatch.setattr(
        COCOEvaluator,
        "_eval_predictions",
        lambda self, predictions, img_ids=None: evaluated.extend(p["image_id"] for p in predictions),
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 4
    assert (tmp_path / "run" / "unreadable_train.txt").read_text() == truncated + "\n"
    assert (tmp_path / "run" / "unreadable_val.txt").read_text() == val[0]["file_name"] + "\n"
    assert evaluated == [val[1]["image_id"]]  # the stand-in once; the missing image scores as missed
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: cannot read")]
    assert len(warnings) == 2 and truncated in warnings[0]


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, data):
            return {"loss_cls": self.weight.sum() * float("nan")}

    model = NaNModel()
    saved = []
    run = Run()  # the parts of a run that the step and these hooks read
    run.model, run.optimizer = model, torch.optim.SGD(model.parameters(), lr=0.1)
    run.scaler, run.amp, run.accumulate_steps = torch.amp.GradScaler("cpu", enabled=False), False, 1
    run.env, run.run_dir = SimpleNamespace(device=torch.device("cpu")), tmp_path
    run.cfg = SimpleNamespace(checkpoint_every_minutes=10)
    run.evaluates_now = lambda: True  # a checkpoint after every step, were there one
    run.save = lambda: saved.append(run.step)
    trainer = Trainer(run, iter(lambda: [{}], None))
    trainer.register_hooks([AsDetectron2Hook(run, hook) for hook in (NonFiniteLoss(), Checkpoints())])
    with pytest.raises(
        FloatingPointError,
        match=r"loss is nan at step 0: stopped before updating the weights; "
        r"the last good checkpoint is kept at .*checkpoint\.pt",
    ):
        trainer.train(0, 2)
    assert torch.equal(model.weight, torch.ones(3)) and saved == []


def test_imagenet_weights_load_into_detectron2_resnet(scenes, tmp_path):
    """train_imagenet.py's model_final.pt (timm ResNet, centralized convs, MABN) fine-tunes."""
    classifier = build_classifier("resnet18", 10, 3, norm_layer("mabn", sma_window=16))
    centralize_weights(classifier)
    with torch.no_grad():
        for module in classifier.modules():
            if isinstance(module, mabn.MABN2d):
                module.ema_chi2.uniform_(0.5, 2.0)
    path = tmp_path / "model_final.pt"
    torch.save(classifier.state_dict(), path)
    _, _, model = build(scenes, tmp_path, "norm=mabn", "start=finetune", f"weights={path}")
    body = model.backbone.bottom_up
    assert torch.allclose(body.stem.conv1.weight, classifier.conv1.weight)
    assert torch.allclose(body.res5[0].shortcut.weight, classifier.layer4[0].downsample[0].weight)
    assert torch.equal(body.res3[1].conv2.norm.ema_chi2, classifier.layer2[1].bn2.ema_chi2)
    assert is_centralized(body.stem.conv1)
    other = tmp_path / "resnet50.pt"
    torch.save(build_classifier("resnet50", 10, 3, nn.BatchNorm2d).state_dict(), other)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_backbone_weights(body, str(other))


def test_missing_detectron2_is_one_line_naming_both_fixes():
    script = (
        "import sys; sys.modules['detectron2'] = None\n"
        "try:\n    import mabn.engine.coco.detectron2_trainer\n"
        "except ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == registration.MISSING_MESSAGE and len(result.stdout.strip().splitlines()) == 1
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in result.stdout
    assert "engine=torchvision" in result.stdout


def test_paper_r50_fpn_has_the_norm_in_69_places(scenes, tmp_path):
    _, d2cfg, model = build(scenes, tmp_path, "norm=mabn", "detector=r50_fpn")
    counts = {name: sum(isinstance(m, mabn.MABN2d) for m in modules) for name, modules in parts(model).items()}
    assert counts == {"body": 53, "fpn": 8, "box": 4, "mask": 4}
    assert (d2cfg.MODEL.RESNETS.DEPTH, d2cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, d2cfg.MODEL.FPN.OUT_CHANNELS) == (
        50,
        256,
        256,
    )
    assert model.roi_heads.box_head.fc1.out_features == 1024 and not d2cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert model.backbone.bottom_up.res3[0].conv2.stride == (2, 2)  # torchvision's v1.5 stride placement


WIRED_NAMES = sorted(d2 for d2, name in registration.detectron2_names().items() if name in WIRED_SUITE_NAMES)


def test_the_detectron2_names_that_need_wiring():
    assert WIRED_NAMES == ["CBN", "EvoNormB0", "EvoNormS0", "FRN", "GN_WS", "MABN"]


def test_two_models_built_one_after_the_other_each_get_their_own_options(scenes, tmp_path):
    models = {}
    for window in (4, 8):
        cfg = compose_config("train_coco", [*scenes, "norm=mabn", f"norm.options.sma_window={window}"])
        models[window] = build_detectron2_model(
            build_detectron2_cfg(cfg, tmp_path), cfg, NormSpec.from_config(cfg.norm)
        )
    for window, model in models.items():
        assert {m.sma_window for m in model.modules() if isinstance(m, mabn.MABN2d)} == {window}
    d2cfg = build_detectron2_cfg(compose_config("train_coco", [*scenes, "norm=mabn"]), tmp_path)
    assert {m.sma_window for m in build_model(d2cfg).modules() if isinstance(m, mabn.MABN2d)} == {16}  # nothing kept


@pytest.mark.parametrize("name", WIRED_NAMES)
def test_build_model_unwired_refuses_its_first_training_step(name, scenes, tmp_path):
    """As a detectron2 user: the norm string in the config, detectron2's build_model, training."""
    cfg = compose_config("train_coco", [*scenes, "norm=bn"])
    d2cfg = build_detectron2_cfg(cfg, tmp_path)
    for node in (d2cfg.MODEL.RESNETS, d2cfg.MODEL.FPN, d2cfg.MODEL.ROI_BOX_HEAD, d2cfg.MODEL.ROI_MASK_HEAD):
        node.NORM = name
    registration.register_detectron2_norms()
    model = build_model(d2cfg).train()
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match=r"is not wired \(.+\): call mabn\.wire_norms\(model\)") as error:
        model.backbone(images)
    assert "\n" not in str(error.value)
    mabn.wire_norms(model).backbone(images)
