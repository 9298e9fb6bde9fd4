"""Each layer against a slow reference written from the paper's formulas, or against torch's
own layer where the definition is torch's (BN)."""

import copy

import pytest
import torch
from reference_norms import ReferenceBRN, ReferenceMABN, assert_close, batches, forward_backward
from torch import nn

import mabn
from mabn.benchmark import saved_bytes
from mabn.norms import BatchNorm2d, BatchRenorm2d, MABN2d

pytestmark = pytest.mark.usefixtures("standalone_layers")  # each layer on its own, outside a model

ALL_NORMS = {
    "bn": {"normalization_batch": 2},
    "syncbn": {},
    "gn": {"num_groups": 4},
    "ln": {},
    "in": {},
    "brn": {"normalization_batch": 2, "warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 3},
    "mabn": {"normalization_batch": 2, "sma_window": 3, "warmup_iters": 2, "renorm_warmup_iters": 3},
    "powernorm": {"normalization_batch": 2, "warmup_iters": 2},
}


@pytest.mark.parametrize("normalization_batch", [None, 8, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_full_batch_is_nn_batchnorm(normalization_batch, channels_last):
    ours = BatchNorm2d(5, normalization_batch=normalization_batch).double()
    torch_bn = nn.BatchNorm2d(5).double()
    for x, dy in batches(3, (8, 5, 4, 3)):
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        for a, b in zip(forward_backward(ours, x, dy), forward_backward(torch_bn, x, dy)):
            assert_close(a, b)
    assert_close(ours.running_mean, torch_bn.running_mean)
    assert_close(ours.running_var, torch_bn.running_var)
    assert ours.num_batches_tracked == torch_bn.num_batches_tracked == 3


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(8, 5, 4, 3), (32, 64, 16, 8)])  # the second: shifted sums on CPU
def test_bn_groups_are_per_group_batchnorm(channels_last, shape):
    ours = BatchNorm2d(shape[1], normalization_batch=2, momentum=0.3).double()
    torch_bn = nn.BatchNorm2d(shape[1], momentum=0.3).double()
    for x, dy in batches(3, shape):
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y, dx, dw, db = forward_backward(ours, x, dy)
        torch_bn.zero_grad()
        xr = x.clone().requires_grad_(True)
        yr = torch.cat([torch_bn(chunk) for chunk in xr.split(2)])
        yr.backward(dy)
        assert_close(y, yr.detach())
        assert_close(dx, xr.grad)
        assert_close(dw, torch_bn.weight.grad)
        assert_close(db, torch_bn.bias.grad)
        assert_close(ours.running_mean, torch_bn.running_mean)
        assert_close(ours.running_var, torch_bn.running_var)
    assert ours.num_batches_tracked == torch_bn.num_batches_tracked == 3 * shape[0] // 2


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_indivisible_batch_names_batch_and_normalization_batch(name):
    layer = mabn.build_norm(name, 4, normalization_batch=4)
    with pytest.raises(ValueError, match=r"per-device batch 6 is not divisible by normalization batch 4"):
        layer(torch.randn(6, 4, 2, 2))


@pytest.mark.parametrize(
    "batch,normalization_batch,window",
    [
        (8, 2, 3),  # four groups per batch, window shorter than a batch
        (8, 2, 6),  # window spans the previous iteration
        (6, 3, 4),
        (4, 4, 5),  # normalization batch = batch: one step per iteration
        (4, 4, 3),  # one step per iteration, window full before warm-up ends
        (4, 4, 8),  # one step per iteration, warm-up over before the window is full
        (4, 1, 16),  # normalization batch 1 (the paper's smallest)
    ],
)
def test_mabn_matches_step_by_step_reference(batch, normalization_batch, window):
    channels = 3
    layer = MABN2d(
        channels,
        normalization_batch=normalization_batch,
        sma_window=window,
        warmup_iters=5,
        renorm_warmup_iters=12,
        r_max=1.08,
    ).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.7, -1.2]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    reference = ReferenceMABN(channels, window, warmup_iters=5, renorm_warmup_iters=12, r_max=1.08)
    clipped = 0
    for x, dy in batches(40, (batch, channels, 3, 2)):
        ema_before = reference.ema.clone()
        expected = reference.step(x, dy, layer.weight.detach(), layer.bias.detach(), normalization_batch)
        for got, want in zip(forward_backward(layer, x, dy), expected):
            assert_close(got, want)
        assert_close(layer.ema_chi2, reference.ema)
        if reference.iteration > 12:
            raw = torch.stack(reference.chi2_history[-window:]).mean(0) / ema_before
            clipped += int(((raw.sqrt() - 1).abs() > 0.08).sum())
    assert layer.num_iterations == 40
    assert_close(layer.chi2_window, torch.stack(reference.chi2_history[-window:]))
    assert_close(layer.psi_window, torch.stack(reference.psi_history[-window:]))
    assert clipped > 0, "the test data never reached the r clipping boundary"


@pytest.mark.parametrize(
    "name,options",
    [
        ("mabn", {"normalization_batch": 2, "sma_window": 3, "warmup_iters": 1, "renorm_warmup_iters": 2}),
        ("mabn", {"sma_window": 2, "warmup_iters": 1, "renorm_warmup_iters": 2}),
        ("brn", {"normalization_batch": 2, "warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 3}),
    ],
)
def test_channels_last_inputs_give_the_contiguous_results(name, options):
    contiguous = mabn.build_norm(name, 5, **options).double()
    channels_last = copy.deepcopy(contiguous)
    for x, dy in batches(5, (8, 5, 4, 3)):
        x_cl, dy_cl = (t.to(memory_format=torch.channels_last) for t in (x, dy))
        for a, b in zip(forward_backward(contiguous, x, dy), forward_backward(channels_last, x_cl, dy_cl)):
            assert_close(b, a)
    for (key, a), b in zip(contiguous.state_dict().items(), channels_last.state_dict().values()):
        assert_close(b, a, msg=key)


@pytest.mark.parametrize("normalization_batch", [2, None])
@pytest.mark.parametrize(
    "options", [{"forward_stat": "batch"}, {"forward_stat": "ema"}, {"backward_stat": "batch"}, {"renorm": False}]
)
def test_mabn_ablations_match_reference(options, normalization_batch):
    layer = MABN2d(
        3,
        normalization_batch=normalization_batch,
        sma_window=3,
        warmup_iters=2,
        renorm_warmup_iters=4,
        r_max=1.1,
        **options,
    ).double()
    reference = ReferenceMABN(3, 3, warmup_iters=2, renorm_warmup_iters=4, r_max=1.1, **options)
    for x, dy in batches(10, (4, 3, 3, 2)):
        expected = reference.step(x, dy, layer.weight.detach(), layer.bias.detach(), normalization_batch or 4)
        for got, want in zip(forward_backward(layer, x, dy), expected):
            assert_close(got, want)
        assert_close(layer.ema_chi2, reference.ema)


@pytest.mark.parametrize("normalization_batch", [2, 4])
def test_mabn_window_one_without_renorm_is_the_true_gradient(normalization_batch):
    layer = MABN2d(3, normalization_batch=normalization_batch, sma_window=1, warmup_iters=0, renorm=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.7, -1.2]))
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def forward(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(forward, (x, weight, bias))


@pytest.mark.parametrize("name", ["bn", "brn"])
@pytest.mark.parametrize("normalization_batch", [2, None])
@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (32, 128, 8, 8)])  # torch's statistics kernel; shifted sums
def test_fp32_group_statistics_stay_accurate_when_the_mean_dwarfs_the_spread(name, normalization_batch, shape):
    """mean / std = 1e3: a one-pass E[x^2] - E[x]^2 in fp32 would lose the variance."""
    layer = mabn.build_norm(name, shape[1], normalization_batch=normalization_batch)
    x = 1000.0 + torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.cat(
        [
            (g - g.mean((0, 2, 3), keepdim=True)) / (g.var((0, 2, 3), correction=0, keepdim=True) + layer.eps).sqrt()
            for g in x.split(normalization_batch or len(x))
        ]
    )
    torch.testing.assert_close(layer(x.float()).double(), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("normalization_batch", [2, None])
def test_brn_without_relaxation_is_bn(normalization_batch):
    brn = BatchRenorm2d(
        4,
        normalization_batch=normalization_batch,
        momentum=0.2,
        r_max=1.0,
        d_max=0.0,
        warmup_iters=0,
        r_max_iters=0,
        d_max_iters=0,
    ).double()
    bn = BatchNorm2d(4, normalization_batch=normalization_batch, momentum=0.2).double()
    for x, dy in batches(4, (8, 4, 3, 3)):
        for a, b in zip(forward_backward(brn, x, dy), forward_backward(bn, x, dy)):
            assert_close(a, b)
    assert_close(brn.running_mean, bn.running_mean)
    assert_close(brn.running_var, bn.running_var)


@pytest.mark.parametrize("normalization_batch", [2, 8])
def test_brn_matches_reference_across_schedule(normalization_batch):
    options = dict(momentum=0.3, r_max=1.3, d_max=0.4, warmup_iters=2, r_max_iters=8, d_max_iters=5)
    layer = BatchRenorm2d(3, normalization_batch=normalization_batch, **options).double()
    reference = ReferenceBRN(3, eps=1e-5, **options)
    gamma = torch.tensor([1.2, -0.5, 0.8], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(gamma)
    for x, dy in batches(12, (8, 3, 3, 2)):
        y, dx, dw, db = forward_backward(layer, x, dy)
        xr = x.clone().requires_grad_(True)
        gr = gamma.clone().requires_grad_(True)
        br = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        yr = reference.forward(xr, gr, br, normalization_batch)
        yr.backward(dy)
        for got, want in zip((y, dx, dw, db), (yr.detach(), xr.grad, gr.grad, br.grad)):
            assert_close(got, want)
        assert_close(layer.running_mean, reference.mean)
        assert_close(layer.running_var, reference.var)
    assert reference.clipped > 0, "the schedule never clipped r: the test would not see the clip"


def small_model(name, options):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        mabn.build_norm(name, 8, **options),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        mabn.build_norm(name, 8, **options),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=generator)
        target = torch.randint(0, 4, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name", sorted(ALL_NORMS))
def test_state_dict_mid_training_continues_bit_identically(name):
    model = small_model(name, ALL_NORMS[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, 4, seed=1)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    resumed = small_model(name, ALL_NORMS[name])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    expected = train_steps(model, optimizer, 4, seed=2)
    got = train_steps(resumed, resumed_optimizer, 4, seed=2)
    assert torch.equal(got, expected)
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", sorted(ALL_NORMS))
def test_eval_mode_changes_no_buffer(name):
    model = small_model(name, ALL_NORMS[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, optimizer, 3, seed=1)
    before = copy.deepcopy(model.state_dict())
    model.eval()
    model(torch.randn(8, 3, 6, 6))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "name,options",
    [
        ("bn", {}),
        ("bn", {"normalization_batch": 2}),
        ("brn", {"normalization_batch": 2}),
        ("mabn", {"normalization_batch": 2, "sma_window": 2, "warmup_iters": 0}),
    ],
)
def test_autocast_bf16_keeps_statistics_in_fp32(name, options):
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    norm = mabn.build_norm(name, 8, **options)
    reference_norm = copy.deepcopy(norm)
    x = torch.randn(8, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        y = norm(features)
    assert features.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    reference_norm(features.float())
    for (key, value), expected in zip(norm.state_dict().items(), reference_norm.state_dict().values()):
        assert value.dtype == expected.dtype, key
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def assert_compiled_training_matches_eager(name, overrides=None, **compile_options):
    torch._dynamo.reset()  # each case compiles afresh: no recompile limit reached across cases
    eager = mabn.centralize_weights(
        small_model(name, ALL_NORMS[name] | (overrides or {}))
    )  # the convs feeding MABN, as in training
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, **compile_options)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_compiled = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):  # crosses the warm-up boundaries of ALL_NORMS' brn and mabn
        x = torch.randn(8, 3, 6, 6, generator=generator)
        for model, optimizer in ((eager, opt_eager), (compiled, opt_compiled)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    # compiled graphs may decompose torch's batch-norm kernel and round differently (an ulp per
    # op, 1e-6 after 5 steps); a window advanced twice or a wrong schedule differs by 1e-2 or more
    for (key, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", sorted(ALL_NORMS))
def test_torch_compile_gives_eager_results(name):
    assert_compiled_training_matches_eager(name, backend="aot_eager", fullgraph=True)  # no graph break


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_torch_compile_gives_eager_results_with_one_group(name):
    assert_compiled_training_matches_eager(name, {"normalization_batch": None}, backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_a_layer_built_in_float64_trains_in_float64(name):
    layer = mabn.build_norm(name, 3, normalization_batch=2, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        y = layer(x)
        y.square().sum().backward()
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == torch.float64


def test_inductor_compiles_mabn_without_graph_breaks_and_matches_eager():
    """The default backend (inductor, C++ on CPU) on the layer with a custom backward and
    window buffers advanced in forward and backward."""
    assert_compiled_training_matches_eager("mabn", fullgraph=True)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
@pytest.mark.parametrize("normalization_batch", [32, 2, 1])
def test_the_backward_saves_no_more_than_x_and_per_group_channel_values(name, normalization_batch):
    channels, groups = 16, 32 // normalization_batch
    x = torch.randn(32, channels, 12, 12, requires_grad=True)
    layer = mabn.norm_layer(name, normalization_batch=normalization_batch)(channels)
    per_channel = channels * 4  # bytes of one fp32 value per channel
    window = 2 * layer.sma_window * per_channel if name == "mabn" else 0
    extra = saved_bytes(layer, x, torch.randn_like(x)) - x.numel() * x.element_size()
    assert 0 <= extra <= 8 * groups * per_channel + window


@pytest.mark.parametrize("name", sorted(set(mabn.NORMS) - {"mimicnorm"}))  # mimicnorm's layer is a bias alone
def test_gamma_init_starts_every_norms_gamma_there(name):
    """Davis and Frank's revisited initialization, for any norm by name."""
    options = {"num_groups": 4} if name in ("gn", "gn_ws") else {"groups": 4} if name == "evonorm_s0" else {}
    layer = mabn.build_norm(name, 8, gamma_init=0.1, **options)
    assert torch.equal(layer.weight.detach(), torch.full((8,), 0.1))
    assert not torch.equal(mabn.build_norm(name, 8, **options).weight.detach(), torch.full((8,), 0.1))
