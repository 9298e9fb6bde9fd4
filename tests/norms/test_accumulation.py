"""Gradient accumulation as the paper's protocol in another form: k micro-batches of one
normalization batch each (``mabn.set_micro_batch``) compute what one batch of k normalization
batches does, for every norm with state: outputs, weight gradients and every buffer, step by step
across warm-up, window, schedule and burn-in boundaries, with the conv's weight moving between
steps (CBN compensates for it)."""

import copy

import pytest
import torch
from torch import nn

import mabn
from mabn.norms import set_micro_batch

CASES = [
    ("bn", {"normalization_batch": 2, "momentum": 0.3}),
    ("brn", {"normalization_batch": 2, "warmup_iters": 2, "r_max_iters": 5, "d_max_iters": 4, "momentum": 0.2}),
    ("mabn", {"normalization_batch": 2, "sma_window": 3, "warmup_iters": 2, "renorm_warmup_iters": 3, "r_max": 1.2}),
    ("mabn", {"normalization_batch": 2, "sma_window": 6, "warmup_iters": 4, "renorm_warmup_iters": 1}),
    ("cbn", {"normalization_batch": 2, "buffer_num": 3, "burnin": 2}),
    ("powernorm", {"normalization_batch": 2, "warmup_iters": 3, "alpha_fwd": 0.8, "alpha_bkw": 0.7}),
]
STEPS, MICRO, K = 7, 2, 4  # 7 steps of 4 micro-batches of 2 samples against 7 of 8


def conv_norm(name: str, options: dict, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), mabn.norm_layer(name, **options)(5)).to(dtype)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return mabn.wire_norms(model)


def train(model: nn.Module, inputs, micro_batches: int) -> list:
    """Per step: y, the gradients and the norm's saved buffers after the step; then an SGD step."""
    records = []
    for x, dy in inputs:
        model.zero_grad()
        ys = []
        for index, (xi, dyi) in enumerate(zip(x.chunk(micro_batches), dy.chunk(micro_batches))):
            set_micro_batch(model, index, micro_batches)
            y = model(xi)
            y.backward(dyi)
            ys.append(y.detach())
        records.append([torch.cat(ys), *[p.grad.clone() for p in model.parameters()]])
        records[-1] += [b.clone() for b in model[1].state_dict(keep_vars=True).values() if not b.requires_grad]
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
    return records


# eager in float64 (equal up to rounding); compiled in float32 (where they run; its rounding,
# amplified where a small statistic divides, reached 9e-5 in y) for MABN, whose compiled kernels see
# the micro-batch (BRN counts its steps outside them, the others count normalization batches;
# tests/norms/test_fused.py checks every compiled kernel against the eager one)
EAGER = [(name, options, "0", torch.float64, 1e-10) for name, options in CASES]
COMPILED = [(name, options, "1", torch.float32, 2e-4) for name, options in CASES if name == "mabn"]


@pytest.mark.parametrize("name,options,fused,dtype,tolerance", EAGER + COMPILED)
def test_micro_batches_train_as_one_batch_of_normalization_batches(name, options, fused, dtype, tolerance, monkeypatch):
    monkeypatch.setenv("MABN_FUSED", fused)
    generator = torch.Generator().manual_seed(1)
    inputs = [
        (
            ((0.5 + step / 4) * torch.randn(MICRO * K, 3, 6, 5, generator=generator) + step / 3).to(dtype),
            torch.randn(MICRO * K, 5, 6, 5, generator=generator).to(dtype),
        )
        for step in range(STEPS)
    ]
    whole = conv_norm(name, options, dtype)
    accumulated = copy.deepcopy(whole)
    for step, (one, many) in enumerate(zip(train(whole, inputs, 1), train(accumulated, inputs, K)), 1):
        for a, b in zip(one, many):
            torch.testing.assert_close(
                b, a, rtol=tolerance, atol=tolerance, msg=lambda m, step=step: f"step {step}: {m}"
            )


def test_a_micro_batch_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="micro-batch 2 of 2 does not exist"):
        set_micro_batch(nn.Sequential(), 2, 2)
