"""The layers on CUDA: every norm trains as on the CPU in float64 (which tests/norms/test_norms.py and
tests/norms/test_cross_iteration.py check against the papers' formulas), grouped and ungrouped,
contiguous and channels_last; fp16/bf16 autocast keeps the statistics in fp32; folding, the
probe, the compiled kernels (MABN_FUSED_CUDA=1) against the eager ones, a short training run
with AMP, and SyncBN over NCCL against BN on the global batch. Skipped without a GPU
(``bash scripts/gpu_check.sh`` runs them on one)."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra_configs import ROOT
from torch import nn
from torchrun import free_port

import mabn
from mabn.probes import BatchStatisticsProbe

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device visible to torch: run on a GPU machine (bash scripts/gpu_check.sh)", allow_module_level=True
    )
pytestmark = pytest.mark.cuda

NORMS = {
    "bn": {},
    "syncbn": {},
    "gn": {"num_groups": 4},
    "ln": {},
    "in": {},
    "brn": {"warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 3},
    "mabn": {"sma_window": 3, "warmup_iters": 2, "renorm_warmup_iters": 3},
    "cbn": {"burnin": 1},
    "evonorm_b0": {},
    "evonorm_s0": {"groups": 4},
    "frn": {},
    "gn_ws": {"num_groups": 4},
}
GROUPED = {"bn", "brn", "mabn", "cbn", "evonorm_b0"}  # the norms that take a normalization batch


def small_model(name, options):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        mabn.build_norm(name, 8, **options),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        mabn.build_norm(name, 8, **options),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return mabn.wire_norms(model)


def train(model, device, dtype, steps=5, channels_last=False):
    """SGD steps on fixed data; returns the losses."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=generator).to(device, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 4, (8,), generator=generator).to(device)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_trains_as_cpu_float64(name, options, channels_last=False):
    reference = small_model(name, options).double()
    cuda = small_model(name, options).cuda()
    if channels_last:
        cuda = cuda.to(memory_format=torch.channels_last)
    expected = train(reference, "cpu", torch.float64)
    got = train(cuda, "cuda", torch.float32, channels_last=channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    for (key, a), b in zip(reference.state_dict().items(), cuda.state_dict().values()):
        assert b.device.type == "cuda", key
        torch.testing.assert_close(b.cpu().to(a.dtype), a, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "name,grouped",
    [(name, grouped) for name in sorted(NORMS) for grouped in ((False, True) if name in GROUPED else (False,))],
)
def test_every_norm_trains_on_cuda_as_on_cpu_in_float64(name, grouped, channels_last):
    options = NORMS[name] | ({"normalization_batch": 2} if grouped else {})
    assert_trains_as_cpu_float64(name, options, channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "cbn", "evonorm_b0"])
def test_autocast_keeps_statistics_in_fp32(name, dtype):
    model = small_model(name, NORMS[name] | {"normalization_batch": 2}).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = model(x)
    assert torch.isfinite(y).all()
    reference(x)
    for (key, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, expected, rtol=2e-2, atol=2e-2, msg=key)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "cbn"])
def test_folding_on_cuda_keeps_eval_outputs(name):
    model = small_model(name, NORMS[name] | {"normalization_batch": 2}).cuda()
    train(model, "cuda", torch.float32)
    model.eval()
    x = torch.randn(4, 3, 6, 6, device="cuda")
    expected = model(x)
    torch.testing.assert_close(mabn.fold_norms(model)(x), expected, rtol=1e-4, atol=1e-5)


def test_the_probe_records_on_cuda():
    model = small_model("mabn", NORMS["mabn"] | {"normalization_batch": 2}).cuda()
    with BatchStatisticsProbe(model, layers=2, channels=4, every=1, batches=[2, 8]) as probe:
        probe.step(1)
        train(model, "cuda", torch.float32, steps=1)
    stats = {record["stat"] for record in probe.records}
    assert {"chi2_sma", "ema_chi2", "psi_sma"} <= stats and len(stats) > 3, stats
    assert all(torch.isfinite(torch.tensor(record["values"])).all() for record in probe.records)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_compiled_kernels_on_cuda_match_the_eager_ones(name, monkeypatch):
    options = NORMS[name] | {"normalization_batch": 2}
    monkeypatch.setenv("MABN_FUSED", "0")
    eager = train(small_model(name, options).cuda(), "cuda", torch.float32)
    monkeypatch.setenv("MABN_FUSED", "1")
    monkeypatch.setenv("MABN_FUSED_CUDA", "1")
    torch._dynamo.reset()
    compiled = train(small_model(name, options).cuda(), "cuda", torch.float32)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_a_short_training_run_with_amp_and_channels_last(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train_imagenet.py",
            "norm=mabn",
            "batch=2",
            "data=synthetic",
            "workers=0",
            "max_steps=20",
            "amp=true",
            "channels_last=true",
            "device=cuda",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "summary.json").is_file()


def nccl_worker(rank, world, port):
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        torch.manual_seed(0)
        norm = mabn.build_norm("syncbn", 4).cuda()
        reference = copy.deepcopy(norm)
        data = [torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(r)) * (1 + r) + r for r in range(world)]
        x = data[rank].cuda().detach().requires_grad_(True)
        norm(x).square().sum().backward()
        xs = torch.cat(data).cuda().detach().requires_grad_(True)
        nn.functional.batch_norm(
            xs, reference.running_mean, reference.running_var, reference.weight, reference.bias, True, 0.1
        ).square().sum().backward()
        torch.testing.assert_close(x.grad, xs.grad[rank * 4 : (rank + 1) * 4], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_syncbn_over_nccl_is_bn_on_the_global_batch():
    """One process per visible GPU (one GPU is a world of size 1)."""
    world = torch.cuda.device_count()
    mp.spawn(nccl_worker, args=(world, free_port()), nprocs=world)
