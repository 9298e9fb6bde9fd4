"""The transformer family: model=vit_tiny with its LayerNorms replaced by any norm, each
normalizing a channel over the batch and the tokens, and ln staying the per-token LayerNorm."""

import pytest
import torch
from hydra_configs import compose_config
from run_files import read_summary
from torch import nn

import mabn
import mabn.norms.centralization
from mabn.engine.classification import train
from mabn.models import vit_tiny
from mabn.norms import TokenNorm

SMALL = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 2, "num_heads": 3}


def token_norms(model):
    return [m for m in model.modules() if isinstance(m, (TokenNorm, nn.LayerNorm))]


@pytest.mark.parametrize("name", ["ln", "bn", "powernorm", "mabn", "gn"])
def test_every_layernorm_of_every_block_is_replaced(name):
    model = mabn.wire_norms(vit_tiny(10, 1, mabn.norm_layer(name), **SMALL))
    norms = token_norms(model)
    assert len(norms) == 2 * SMALL["depth"] + 1  # norm1 and norm2 of each block, the final norm
    for block in model.blocks:
        for norm in (block.norm1, block.norm2):
            assert isinstance(norm, nn.LayerNorm if name == "ln" else TokenNorm)
            if name != "ln":
                assert isinstance(norm.norm, type(mabn.build_norm(name, 96)))
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_bn_over_tokens_is_batchnorm_over_every_token_of_the_batch_and_gn_is_groupnorm_over_the_tokens():
    x = torch.randn(4, 16, 48, dtype=torch.float64, requires_grad=True)  # (B, T, C)
    bn = TokenNorm(mabn.build_norm("bn", 48, dtype=torch.float64))
    reference = nn.BatchNorm1d(48, dtype=torch.float64)
    torch.testing.assert_close(bn(x), reference(x.reshape(-1, 48)).reshape(x.shape))
    torch.testing.assert_close(bn.norm.running_var, reference.running_var)
    gn = TokenNorm(mabn.build_norm("gn", 48, num_groups=8, dtype=torch.float64))
    torch.testing.assert_close(gn(x), nn.functional.group_norm(x.transpose(1, 2), 8).transpose(1, 2))
    grouped = TokenNorm(mabn.build_norm("bn", 48, normalization_batch=2, dtype=torch.float64))
    halves = [reference_bn(part) for part in x.split(2)]
    torch.testing.assert_close(grouped(x), torch.cat(halves))


def reference_bn(x):
    flat = x.reshape(-1, x.shape[-1])
    return ((flat - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt()).reshape(x.shape)


def test_the_patch_embedding_is_not_taken_for_the_conv_that_feeds_mabn():
    model = mabn.centralize_weights(vit_tiny(10, 1, mabn.norm_layer("mabn"), **SMALL))
    assert not mabn.norms.centralization.is_centralized(model.patch_embed.proj)


@pytest.mark.parametrize("norm", ["ln", "bn", "powernorm", "mabn"])
def test_model_vit_tiny_trains_with_each_norm(norm, tmp_path):
    options = [f"model.options.{key}={value}" for key, value in SMALL.items() if key not in ("img_size", "patch_size")]
    cfg = compose_config(
        "train_imagenet",
        ["model=vit_tiny", *options, f"norm={norm}", "batch=2", "data=synthetic", "workers=0", "per_device_batch=8"]
        + ["max_steps=3", "log_every_steps=1"],
    )
    assert cfg.model.options.img_size == 28 and cfg.model.options.patch_size == 4
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 3 and 0 <= summary["top1_error"] <= 100
    assert read_summary(tmp_path)["label"] == norm
