"""The compiled (fused) training math of BN, BRN, MABN, CBN, GN+WS and PowerNorm against the eager layers, which the
reference tests check against the paper's formulas: outputs, gradients and every buffer, step
by step across warm-up, window and schedule boundaries."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import mabn
from mabn.norms import fused

pytestmark = pytest.mark.usefixtures("standalone_layers")  # each layer on its own, outside a model

CASES = [
    ("bn", {"normalization_batch": 2}),
    ("bn", {"normalization_batch": 4, "momentum": 0.3}),
    (
        "brn",
        {
            "normalization_batch": 2,
            "warmup_iters": 2,
            "r_max_iters": 5,
            "d_max_iters": 4,
            "r_max": 1.5,
            "d_max": 0.5,
            "momentum": 0.2,
        },
    ),
    ("brn", {"normalization_batch": None, "warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 1, "momentum": 0.2}),
    ("mabn", {"normalization_batch": 2, "sma_window": 3, "warmup_iters": 2, "renorm_warmup_iters": 3, "r_max": 1.2}),
    ("mabn", {"normalization_batch": None, "sma_window": 4, "warmup_iters": 3, "renorm_warmup_iters": 2}),
    (
        "mabn",
        {"normalization_batch": 2, "sma_window": 2, "warmup_iters": 0, "forward_stat": "ema", "backward_stat": "batch"},
    ),
    ("mabn", {"normalization_batch": 4, "sma_window": 2, "warmup_iters": 0, "forward_stat": "batch", "renorm": False}),
    ("powernorm", {"normalization_batch": 2, "warmup_iters": 3, "alpha_fwd": 0.8, "alpha_bkw": 0.7}),
    ("powernorm", {"normalization_batch": None, "warmup_iters": 2, "scaling_groups": None}),
]


def train_steps(layer, inputs, mode, monkeypatch):
    """Per step: y, x.grad, weight.grad, bias.grad and the buffers after the step, with
    MABN_FUSED=mode."""
    monkeypatch.setenv("MABN_FUSED", mode)
    records = []
    for x, dy in inputs:
        x = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(x)
        y.backward(dy)
        records.append(
            [
                y.detach(),
                x.grad,
                layer.weight.grad.clone(),
                layer.bias.grad.clone(),
                *[b.clone() for b in layer.buffers()],
            ]
        )
    return records


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name,options", CASES)
def test_fused_steps_match_the_eager_layer(name, options, channels_last, monkeypatch):
    torch.manual_seed(1)
    layer = mabn.norm_layer(name, **options)(5)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # shifting statistics from step to step, so that r, d and the windows matter
    inputs = [
        ((0.5 + step / 4) * torch.randn(8, 5, 4, 3) + step / 3).contiguous(memory_format=memory_format)
        for step in range(7)
    ]
    inputs = [(x, torch.randn_like(x)) for x in inputs]
    eager = train_steps(copy.deepcopy(layer), inputs, "0", monkeypatch)
    assert_same_steps(train_steps(layer, inputs, "1", monkeypatch), eager)


def assert_same_steps(compiled, eager):
    assert not fused._broken
    for step, (expected, actual) in enumerate(zip(eager, compiled)):
        for index, (e, a) in enumerate(zip(expected, actual)):
            torch.testing.assert_close(
                a, e, rtol=2e-5, atol=2e-5, msg=lambda m, step=step, index=index: f"step {step}, value {index}: {m}"
            )


@pytest.mark.parametrize(
    "mode,normalization_batch,channels_last",
    [("1", 2, False), ("1", 2, True), ("1", None, False), ("1", None, True), ("dynamic", None, False)],
)
def test_fused_cbn_steps_match_the_eager_layer(mode, normalization_batch, channels_last, monkeypatch):
    """CBN's compiled statistics and backward against its eager ones, after a conv whose weight moves:
    across burn-in (plain BN) and the buffer's fill; outputs, every gradient and buffer, step by
    step; with MABN_FUSED=dynamic (train_coco.py) for inputs whose size changes."""
    from mabn.norms.cross_iteration import _CompensatedNormFunction

    calls = []
    compiled = _CompensatedNormFunction.fused_backward
    monkeypatch.setattr(_CompensatedNormFunction, "fused_backward", counted(compiled, calls))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    sizes = (
        [(8, 3, 4, 3)] * 6 if mode == "1" else [(2, 3, 6, 8), (2, 3, 7, 5), (9, 3, 4, 4), (3, 3, 6, 8), (5, 3, 4, 4)]
    )

    def setup():
        torch.manual_seed(1)
        norm = mabn.CrossIterationBatchNorm2d(5, normalization_batch=normalization_batch, buffer_num=3, burnin=2)
        # no conv bias: through a norm its gradient is nearly 0, round-off against round-off
        model = mabn.wire_norms(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, bias=False), norm))
        model.to(memory_format=memory_format)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        inputs = (
            ((0.5 + step / 4) * torch.randn(*size) + step / 3).contiguous(memory_format=memory_format)
            for step, size in enumerate(sizes)
        )
        return model, inputs

    eager = sgd_steps(setup, "0", monkeypatch)
    assert not calls
    assert_same_steps(sgd_steps(setup, mode, monkeypatch), eager)
    assert len(calls) == len(sizes)


@pytest.mark.parametrize("mode", ["1", "dynamic"])
def test_fused_weight_standardization_matches_the_eager_one(mode, monkeypatch):
    """GN+WS's standardized conv weights, compiled, against the eager formulas: outputs and every
    gradient over SGD steps, two convs of different shapes."""
    from mabn.norms import group_norm

    calls = []
    compiled = group_norm.STANDARDIZE.compiled
    monkeypatch.setattr(group_norm.STANDARDIZE, "compiled", tuple(counted(f, calls) for f in compiled))

    def setup():
        torch.manual_seed(3)
        layers = [torch.nn.Conv2d(3, 8, 3), mabn.GroupNormWS(8, 4), torch.nn.Conv2d(8, 8, 1), mabn.GroupNormWS(8, 2)]
        return mabn.wire_norms(torch.nn.Sequential(*layers)), (torch.randn(4, 3, 6, 6) for _ in range(4))

    eager = sgd_steps(setup, "0", monkeypatch)
    assert not calls
    assert_same_steps(sgd_steps(setup, mode, monkeypatch), eager)
    # forward and backward, two convs, four steps, and a forward each when wire_norms registers them
    assert len(calls) == 2 * 2 * 4 + 2


def sgd_steps(setup, mode, monkeypatch):
    """Per SGD step (lr 0.1) of the model ``setup()`` builds, on each input it gives, against a
    random dy: y, x.grad, every parameter's gradient and the buffers after the step, with
    MABN_FUSED=mode (set before the model is built: wiring runs it once)."""
    monkeypatch.setenv("MABN_FUSED", mode)
    model, inputs = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for x in inputs:  # drawn one by one, each after the last step's dy
        x.requires_grad_()
        optimizer.zero_grad()
        y = model(x)
        y.backward(torch.randn_like(y))
        records.append([y.detach(), x.grad, *[p.grad.clone() for p in model.parameters()]])
        records[-1] += [b.clone() for b in model.buffers()]
        optimizer.step()
    return records


def counted(function, calls):
    """``function``, appending to ``calls`` at each call."""
    return lambda *args: calls.append(1) or function(*args)


@pytest.mark.parametrize("name,options", [case for case in CASES if case[1]["normalization_batch"] is None])
def test_dynamic_mode_serves_inputs_whose_size_changes(name, options, monkeypatch):
    """MABN_FUSED=dynamic (train_coco.py): a few graphs serve every size of detection's images and RoIs."""
    torch.manual_seed(2)
    layer = mabn.norm_layer(name, **options)(5)
    sizes = [(2, 6, 8), (2, 7, 5), (9, 4, 4), (3, 6, 8), (2, 10, 3), (5, 4, 4), (2, 6, 8)]
    inputs = [(1 + step / 3) * torch.randn(n, 5, h, w) + step / 4 for step, (n, h, w) in enumerate(sizes)]
    inputs = [(x, torch.randn_like(x)) for x in inputs]
    eager = train_steps(copy.deepcopy(layer), inputs, "0", monkeypatch)
    graphs = counters["stats"]["unique_graphs"]
    assert_same_steps(train_steps(layer, inputs, "dynamic", monkeypatch), eager)
    # forward and backward each: a graph for the first size, then one more each time another
    # dimension starts to vary (N, H and W here), not one per size (6 distinct sizes)
    assert counters["stats"]["unique_graphs"] - graphs <= 2 * (1 + 3)
    assert not fused.applies(torch.randn(4, 5, 2, 2), 2)  # grouped layers stay eager there


def test_fused_statistics_stay_accurate_when_the_mean_dwarfs_the_spread(monkeypatch):
    monkeypatch.setenv("MABN_FUSED", "1")
    x64 = 1000.0 + torch.randn(8, 3, 5, 5, dtype=torch.float64)
    y = mabn.norm_layer("bn", normalization_batch=2)(3)(x64.float())
    groups = x64.view(4, 2, 3, 25)
    reference = (groups - groups.mean(dim=(1, 3), keepdim=True)) / torch.sqrt(
        groups.var(dim=(1, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(y.double(), reference.view_as(x64), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_fused_backward_saves_x_and_per_group_channel_values(name, monkeypatch):
    monkeypatch.setenv("MABN_FUSED", "1")
    x = torch.randn(32, 16, 12, 12, requires_grad=True)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t, lambda t: t
    ):
        y = mabn.norm_layer(name, normalization_batch=2)(16)(x)
    y.sum().backward()
    extra = sum(saved.values()) - x.numel() * 4
    assert 0 <= extra <= 8 * 16 * 16 * 4


def test_fused_is_off_for_other_dtypes_inside_compile_and_with_the_switch(monkeypatch):
    x = torch.randn(4, 3, 2, 2)
    monkeypatch.setenv("MABN_FUSED", "1")
    assert fused.applies(x, 2) and not fused.applies(x.double(), 2) and not fused.applies(x.bfloat16(), 2)
    monkeypatch.setenv("MABN_FUSED", "0")
    assert not fused.applies(x, 2)


def test_only_the_first_shapes_compile(monkeypatch):
    monkeypatch.setenv("MABN_FUSED", "1")
    monkeypatch.setattr(fused, "_shapes", set())
    monkeypatch.setattr(fused, "SHAPES", 2)
    assert fused.applies(torch.randn(4, 3, 2, 2), 2) and fused.applies(torch.randn(4, 3, 2, 3), 2)
    assert not fused.applies(torch.randn(4, 3, 2, 4), 2)
    assert fused.applies(torch.randn(4, 3, 2, 2), 2)


def test_a_failed_compilation_warns_once_and_the_layers_go_eager(monkeypatch):
    monkeypatch.setenv("MABN_FUSED", "1")
    failing = lambda *args: (_ for _ in ()).throw(RuntimeError("no C++ compiler"))
    monkeypatch.setattr(torch, "compile", lambda fn, **options: failing)
    broken = fused.Fused(lambda x: x + 1)
    monkeypatch.setattr(fused, "_broken", False)
    x = torch.randn(4, 3, 2, 2)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(broken(x), x + 1)  # the plain function, eagerly
    assert not fused.applies(x, 2)


def test_a_run_compiles_only_when_it_is_long_enough_unless_mabn_fused_says(monkeypatch):
    monkeypatch.setattr(fused, "_chosen", None)
    monkeypatch.delenv("MABN_FUSED", raising=False)
    assert fused.mode() == "0" and not fused.enabled()  # a library user, nothing chosen: eager
    assert fused.use("1") == "1" and fused.enabled()  # opted in (the benchmarks)
    assert fused.choose_for_run(400, 2000) == "0" and not fused.enabled()  # the quick start: eager
    assert fused.choose_for_run(3750, 2000) == "1" and fused.enabled()  # the study: compiled
    monkeypatch.setenv("MABN_FUSED", "dynamic")  # the user's (or train_coco's) choice wins
    assert fused.choose_for_run(400, 2000) == "dynamic"
