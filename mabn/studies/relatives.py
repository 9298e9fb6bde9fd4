"""MABN's relatives from its own literature beside the Fashion-MNIST study (PowerNorm, MimicNorm, BN
with the revisited initialization) and the transformer study (LN, BN, PowerNorm and MABN in a small
ViT): top-1 errors, one verdict per claim with Welch's 95 % interval and the papers' numbers beside
ours, and each norm's price in memory (bytes saved for the backward by a training step of the
study's model, beside BN's). Every cell comes from per-run summaries kept in ``results/``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..benchmark import training_step_saved_bytes
from ..engine.classification import build_model
from ..engine.distributed import Distributed
from ..engine.training import prepare_model
from .reporting import provenance_table, publish
from .successors import BATCHES, load_runs, report

RELATIVES = ("powernorm", "mimicnorm", "bn_small_gamma")
CLAIMS = [
    (
        "PowerNorm at 2 is within noise of MABN at 2 (no paper compares them; both replace the backward's "
        "batch statistic by a running one)",
        ("powernorm", 2),
        ("mabn", 2),
        "zero",
    ),
    (
        "PowerNorm at 2 is better than BN at 2 (its running statistics, in forward and backward, as MABN's)",
        ("bn", 2),
        ("powernorm", 2),
        "positive",
    ),
    (
        "PowerNorm at 2 is within noise of PowerNorm at 32 (as MABN's flat curve)",
        ("powernorm", 2),
        ("powernorm", 32),
        "zero",
    ),
    (
        "MimicNorm at 32 is within noise of BN at 32 (Fei et al., ImageNet top-1 accuracy: ResNet-18 70.15 vs BN "
        "69.76, ResNet-50 76.84 vs 76.48)",
        ("mimicnorm", 32),
        ("bn", 32),
        "zero",
    ),
    (
        "MimicNorm at 2 is within noise of BN at 2 (no paper runs it at a small batch; only its logits' norm sees "
        "the batch)",
        ("mimicnorm", 2),
        ("bn", 2),
        "zero",
    ),
    (
        "BN with gamma started at 0.1 (lr / 100) is better than BN at 32 (Davis and Frank: significant gains, "
        "CIFAR-10 ResNet-18, 15 seeds)",
        ("bn", 32),
        ("bn_small_gamma", 32),
        "positive",
    ),
    (
        "BN with gamma started at 0.1 is better than BN at 2 (no paper runs it at a small batch)",
        ("bn", 2),
        ("bn_small_gamma", 2),
        "positive",
    ),
]
# diagnostic runs (their own norm.label, not the study's recipe): (cell, what it changes, cells to compare with)
DIAGNOSTICS = [
    (
        ("powernorm_noscale", 2),
        "PowerNorm without its group scaling (scaling_groups=None; the authors' layer divides each position's "
        "channels by their root mean square first)",
        [("powernorm", 2), ("bn", 2), ("mabn", 2)],
    ),
    (("powernorm_noscale", 32), "the same at 32", [("powernorm", 32), ("bn", 32)]),
]
KEPT_LABELS = RELATIVES + tuple(dict.fromkeys(cell[0] for cell, _, _ in DIAGNOSTICS))  # the runs this report keeps
TRANSFORMER = ("ln", "bn", "powernorm", "mabn")
TRANSFORMER_CLAIMS = [
    (
        "PowerNorm is better than LN in a transformer (Shen et al.: +0.4 BLEU IWSLT14, +0.6 WMT14, 5.6 and 3.0 "
        "perplexity on PTB and WikiText-103)",
        ("ln", 32),
        ("powernorm", 32),
        "positive",
    ),
    (
        "BN is worse than LN in a transformer (Shen et al.'s motivation; IWSLT14 BLEU, unverified: LN 35.5, BN "
        "34.4, PN 35.9)",
        ("bn", 32),
        ("ln", 32),
        "positive",
    ),
    (
        "PowerNorm at 2 is better than LN (no paper runs a normalization batch of 2)",
        ("ln", 32),
        ("powernorm", 2),
        "positive",
    ),
    ("BN at 2 is worse than LN", ("bn", 2), ("ln", 32), "positive"),
    ("PowerNorm is within noise of MABN at 32 (no paper compares them)", ("powernorm", 32), ("mabn", 32), "zero"),
    ("PowerNorm is within noise of MABN at 2 (no paper compares them)", ("powernorm", 2), ("mabn", 2), "zero"),
]


def summaries(folder: Path) -> list[dict]:
    """The finished runs' summaries kept in ``folder`` (a diverged run, kept with its reason only, is not one)."""
    return [s for path in sorted(folder.glob("*.json")) if "config" in (s := json.loads(path.read_text()))]


def memory_table(kept: list[dict], labels, base: str = "bn", channels: int = 1, classes: int = 10) -> list[str]:
    """Bytes one training step of each label's model saves for its backward (its first kept run at
    the largest normalization batch: its recorded config), per image and vs ``base``'s."""
    configs = {}
    for summary in sorted(kept, key=lambda s: -s["batch"]):
        configs.setdefault(summary.get("label") or summary["norm"], summary["config"])
    device = Distributed(0, 1, 0, torch.device("cpu"))
    measured = {}
    for label in labels:
        if label not in configs:
            continue
        cfg = OmegaConf.create(configs[label])
        torch.manual_seed(0)
        model = prepare_model(build_model(cfg, classes, channels), cfg.norm, device)
        size = cfg.model.options.get("img_size", 28)
        images = torch.randn(cfg.per_device_batch, channels, size, size)
        labels_ = torch.randint(0, classes, (cfg.per_device_batch,))
        measured[label] = training_step_saved_bytes(model, images, labels_) / cfg.per_device_batch
    lines = [f"| norm | saved for the backward per image (KiB) | vs {base} |", "|---|---|---|"]
    for label, per_image in measured.items():
        lines.append(f"| {label} | {per_image / 1024:.1f} | {per_image / measured[base]:.2f} |")
    return lines


def write_report(results: Path) -> str:
    """``fashion_relatives.md`` in ``results``, from the runs kept in ``fashion_relative_runs``,
    ``fashion_study_runs`` and ``fashion_vit_runs``; returns the markdown."""
    kept = results / "fashion_relative_runs"
    vit = results / "fashion_vit_runs"
    runs = load_runs(kept) | load_runs(results / "fashion_study_runs")
    if not load_runs(kept) and not load_runs(vit):
        raise SystemExit(f"error: no run summaries in {kept} or {vit}: run bash scripts/fashion_study.sh first")
    relatives = summaries(kept)
    study = [s for s in summaries(results / "fashion_study_runs") if s.get("label", s["norm"]) in ("bn", "mabn")]
    seeds = max((len(values) for values in runs.values()), default=0)
    lines = [
        "# MABN's relatives: PowerNorm, MimicNorm, BN with the revisited initialization",
        "",
        "Generated by `python scripts/relatives_report.py` from the runs kept in `results/fashion_relative_runs/` "
        "(the commands: the last blocks of `scripts/fashion_study.sh`), `results/fashion_study_runs/` (BN and MABN) "
        "and `results/fashion_vit_runs/` (`scripts/fashion_vit.sh`). A difference is mean [Welch's 95 % interval] "
        "in top-1 error points; a claim is *supported* when the interval lies on its side of 0 (or holds 0, for "
        '"within noise"). The papers\' numbers are other tasks and scales: for the direction only.',
        "",
        "## On the Fashion-MNIST study's recipe (small ResNet)",
        "",
        report(runs, seeds, rows=RELATIVES, claims=CLAIMS, diagnostics=DIAGNOSTICS, batches=BATCHES),
        "",
        "Price in memory: what a training step of the study's model (per-device batch 32) saves for its "
        "backward, counted with saved-tensor hooks (exact, device independent); MimicNorm's paper reports "
        "about 20 % less GPU memory than BN (ResNet-18 5603 vs 8057 MB, ResNet-50 22489 vs 27083 MB).",
        "",
        *memory_table(study + relatives, ("bn", "mabn", *RELATIVES)),
    ]
    transformer = load_runs(vit)
    if transformer:
        vit_summaries = summaries(vit)
        lines += [
            "",
            "## In a transformer (a small ViT on Fashion-MNIST, `experiment=fashion_vit`)",
            "",
            f"Recipe, fixed before the runs: {vit_recipe(vit_summaries[0])}",
            "",
            report(
                transformer,
                max(len(v) for v in transformer.values()),
                rows=TRANSFORMER,
                claims=TRANSFORMER_CLAIMS,
                diagnostics=[],
                batches=(32, 2),
                what="Top-1 error (%) of the ViT by normalization batch (LN ignores it: run at 32)",
            ),
            "",
            "Price in memory (per-device batch 32, vs LN):",
            "",
            *memory_table(vit_summaries, TRANSFORMER, base="ln"),
        ]
    lines += ["", "## Which code made the runs", "", provenance_table(relatives + summaries(vit))]
    text = "\n".join(lines)
    publish(text, results / "fashion_relatives.md")
    return text


def vit_recipe(summary: dict) -> str:
    c = summary["config"]
    m, o = c["model"]["options"], c["optim"]
    return (
        f"ViT with {m['embed_dim']} channels, {m['depth']} blocks, {m['num_heads']} heads, {m['img_size']} px "
        f"images in {m['patch_size']}-px patches; {o.get('name', 'sgd')} lr "
        f"{o['base_lr'] * c['per_device_batch'] / o['reference_batch']:g} at per-device batch {c['per_device_batch']}, "
        f"weight decay {o['weight_decay']}, {o['schedule']['name']} schedule, {c['epochs']} epoch(s); seeds per cell "
        "as the table's n."
    )
