"""MABN (Yan et al., ICLR 2020): moving-average statistics in forward and backward, renormalized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .accumulation import StepCounted
from .kernels import accumulation_dtype, gradient_sums, group_view, normalize, num_groups, per_sample
from .wired import NeedsWiring


class _MABNFunction(torch.autograd.Function):
    """MABN's normalization with its own backward (docs/method.md).

    Forward ``y = gamma * r * x * inv_std + beta`` per (group, channel), with
    ``inv_std = 1 / sqrt(var + eps)`` and r constants. Backward ``dx = (g - z * psi) * inv_std``
    with ``g = dy * gamma * r``, ``z = x * inv_std`` and psi the window average (or batch
    value) of ``mean(g * z)``; the window buffer ``psi_window`` is advanced here, in place.
    The forward writes y in one pass; the backward reads dy and x once for the sums, then writes
    ``g * inv_std`` and subtracts ``z * psi * inv_std`` in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, psi_window, use_window, eps):
        ctx.save_for_backward(x, weight, var, r, use_window)
        ctx.psi_window = psi_window  # state advanced by backward, not a saved value
        ctx.eps = eps
        return normalize(x, torch.zeros_like(var), var, weight * r, bias.expand_as(var), eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, var, r, use_window = ctx.saved_tensors
        groups, channels = var.shape
        zero = torch.zeros_like(var)
        sum_dy, dy_z = gradient_sums(dy, x, zero, var, ctx.eps)
        gain = weight * r
        psi = gain * dy_z / (x.numel() // (groups * channels))
        psi_sma, history = window_average(ctx.psi_window, psi)
        ctx.psi_window.copy_(history)
        psi = torch.where(use_window, psi_sma, psi)
        dx = normalize(dy, zero, var, gain, zero, ctx.eps)  # g * inv_std
        dx.addcmul_(x, per_sample(psi.div(var + ctx.eps).neg_(), len(x)))  # - z * psi * inv_std
        return dx.to(dy.dtype), (r * dy_z).sum(0), sum_dy.sum(0), None, None, None, None, None


def window_average(history: torch.Tensor, current: torch.Tensor):
    """Simple moving average over the last m steps for each of G new steps.

    ``history`` (m, C) holds the previous m step statistics, oldest first; ``current``
    (G, C) the new ones in order. Returns the (G, C) averages of the m most recent values at
    each new step, and the new (m, C) history.
    """
    window = history.shape[0]
    sequence = torch.cat([history, current.to(history.dtype)])
    averages = sequence.unfold(0, window, 1)[1:].mean(-1)
    return averages, sequence[-window:]


class MABN2d(StepCounted, NeedsWiring, nn.Module):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020), docs/method.md.

    Per channel, with chi2 the second moment mean(x^2) of a normalization batch and psi the
    backward statistic mean(g * z): no mean subtraction (pair with weight centralization of
    the conv that feeds it: ``mabn.convert_model``); chi2 and psi averaged over the last
    ``sma_window`` normalization batches (SMA); ``y = gamma * r * x / sqrt(chi2_sma + eps) +
    beta`` with ``r = sqrt(chi2_sma + eps) / sqrt(ema_chi2 + eps)`` clipped to
    [1/r_max, r_max] and without gradient; inference uses ``gamma * x / sqrt(ema_chi2 + eps) +
    beta``.

    Groups of a batch are consecutive steps of the window (as the authors' ImageNet code), so
    any per-device batch divisible by the normalization batch works. Relation to the
    authors' ``MABN.py``:

    - batch statistics (no SMA) while ``num_iterations < warmup_iters`` (100, as MABN.py) or
      while the window does not yet hold ``sma_window`` real statistics (MABN.py waits one
      iteration longer: ``iteration <= buffer_size``);
    - r is held at 1 while ``num_iterations <= renorm_warmup_iters`` (1000 = MABN.py's
      ``max(1000, warmup_iters)``), then clipped to [1/5, 5];
    - ``ema_chi2`` is updated once per iteration with the mean over groups of the statistic
      used to normalize, momentum 0.02 in PyTorch's convention (the paper's 0.98), and is set
      to that value on the first iteration (the ImageNet code; MABN.py starts it at 1);
    - eps = 1e-5.

    Under gradient accumulation (``mabn.norms.accumulation``) each micro-batch's groups are the
    next steps of the windows, while the iteration count and the EMA advance once per
    optimizer step: k micro-batches of one group compute what one batch of k groups does.

    The authors' ImageNet layer (cls/networks/MABN.py) uses each group's own statistics on
    iteration 1, the window from iteration 2 on, and r = 1 for 99 iterations:
    ``warmup_iters=2, renorm_warmup_iters=99`` (``norm=mabn_imagenet_code``). The iteration
    counts scale with the run length on request (``mabn.schedules``).

    Ablations: ``forward_stat`` "sma" (default), "batch" (current group only) or "ema"
    (normalize by the EMA after warm-up, r = 1); ``backward_stat`` "sma" (default) or
    "batch"; ``renorm=False`` holds r at 1. Weight centralization is a property of the conv,
    see ``mabn.wire_norms``.

    Training uses no host synchronization (no ``.item()``, no branch on tensor values).
    Gradient checkpointing would advance the windows twice per step: not supported.
    """

    schedule_options = ("warmup_iters", "renorm_warmup_iters")
    centralize_conv = True  # no mean is subtracted: the conv that feeds it is centralized (mabn.wire_norms)
    wiring = "the conv feeding it centralized"

    def __init__(
        self,
        num_features,
        normalization_batch=None,
        sma_window=16,
        momentum=0.02,
        eps=1e-5,
        warmup_iters=100,
        renorm_warmup_iters=1000,
        r_max=5.0,
        forward_stat="sma",
        backward_stat="sma",
        renorm=True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if forward_stat not in ("sma", "batch", "ema"):
            raise ValueError(f"mabn forward_stat must be sma, batch or ema, got {forward_stat!r}")
        if backward_stat not in ("sma", "batch"):
            raise ValueError(f"mabn backward_stat must be sma or batch, got {backward_stat!r}")
        if sma_window < 1:
            raise ValueError(f"mabn sma_window must be >= 1, got {sma_window}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.normalization_batch = normalization_batch
        self.sma_window = sma_window
        self.momentum = momentum
        self.eps = eps
        self.warmup_iters = warmup_iters
        self.renorm_warmup_iters = renorm_warmup_iters
        self.r_max = r_max
        self.forward_stat = forward_stat
        self.backward_stat = backward_stat
        self.renorm = renorm
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("ema_chi2", torch.ones(num_features, device=device))
        self.register_buffer("chi2_window", torch.zeros(sma_window, num_features, device=device))
        self.register_buffer("psi_window", torch.zeros(sma_window, num_features, device=device))
        self.register_buffer("num_iterations", torch.tensor(0, dtype=torch.long, device=device))
        # within an accumulated step only (a checkpoint falls between steps): not saved
        self.register_buffer("step_offset", torch.tensor(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("chi2_sum", torch.zeros(num_features, device=device), persistent=False)

    def extra_repr(self):
        return (
            f"{self.num_features}, normalization_batch={self.normalization_batch}, "
            f"sma_window={self.sma_window}, momentum={self.momentum}, eps={self.eps}, "
            f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
            f"r_max={self.r_max}, forward_stat={self.forward_stat}, "
            f"backward_stat={self.backward_stat}, renorm={self.renorm}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A BatchNorm2d checkpoint loads too: its second moment var + mean^2 seeds the EMA."""
        if prefix + "running_var" in state_dict and prefix + "ema_chi2" not in state_dict:
            mean = state_dict.pop(prefix + "running_mean")
            state_dict[prefix + "ema_chi2"] = state_dict.pop(prefix + "running_var") + mean.square()
            state_dict.pop(prefix + "num_batches_tracked", None)
            for name in ("chi2_window", "psi_window", "num_iterations"):
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def inference_scale(self):
        """Per-channel multiplier of the eval-mode layer (its shift is ``bias``)."""
        return self.weight * torch.rsqrt(self.ema_chi2 + self.eps)

    def forward(self, x):
        self.check_wired()
        if not self.training:
            zero = torch.zeros_like(self.ema_chi2)
            return F.batch_norm(x, zero, self.ema_chi2, self.weight, self.bias, False, 0.0, self.eps)
        groups = num_groups(x.shape[0], self.normalization_batch)
        if fused.applies(x, groups):
            return _FusedMABNFunction.apply(
                x,
                self.weight,
                self.bias,
                self.ema_chi2,
                self.chi2_window,
                self.psi_window,
                self.num_iterations,
                groups,
                self._options(),
                self.backward_stat == "batch",
                self._micro(groups),
            )
        with torch.no_grad():
            var, r, use_window = mabn_statistics(
                x, groups, self.ema_chi2, self.chi2_window, self.num_iterations, *self._options(), self._micro(groups)
            )
        if self.backward_stat == "batch":
            use_window = torch.zeros_like(use_window)
        return _MABNFunction.apply(x, self.weight, self.bias, var, r, self.psi_window, use_window, self.eps)

    def _micro(self, groups: int):
        """``mabn_statistics``'s ``micro`` for the current micro-batch (None without accumulation)."""
        index, count = self.micro_batch
        if count == 1:
            return None
        self.step_offset.fill_(index * groups)  # the step's groups before this micro-batch
        return index == 0, index == count - 1, count, self.step_offset, self.chi2_sum

    def _options(self):
        """The statistics options of ``mabn_statistics``, in its order."""
        return (
            self.momentum,
            self.eps,
            self.warmup_iters,
            self.renorm_warmup_iters,
            self.r_max,
            self.forward_stat,
            self.renorm,
        )


def window_in_use(iteration, groups: int, sma_window: int, warmup_iters: int, micro=None):
    """(G, 1): whether each group's step (G steps per iteration; under accumulation, ``micro``,
    G per micro-batch) uses the window averages: the window holds ``sma_window`` real statistics
    and warm-up is over."""
    if micro is None:
        if groups == 1:
            return (iteration >= max(sma_window, warmup_iters)).view(1, 1)
        step = (iteration - 1) * groups + torch.arange(1, groups + 1, device=iteration.device)
    else:
        _, _, count, offset, _ = micro
        step = (iteration - 1) * groups * count + offset + torch.arange(1, groups + 1, device=iteration.device)
    return ((step >= sma_window) & (iteration >= warmup_iters)).unsqueeze(1)


def mabn_statistics(
    x,
    groups: int,
    ema_chi2,
    chi2_window,
    num_iterations,
    momentum: float,
    eps: float,
    warmup_iters: int,
    renorm_warmup_iters: int,
    r_max: float,
    forward_stat: str,
    renorm: bool,
    micro=None,
):
    """MABN2d's forward statistics: advance the chi2 window, the EMA and the iteration count (in
    place); return the normalizing chi2, r and the SMA mask, (G, C), (G, C), (G, 1). Under
    gradient accumulation, ``micro`` is (first, last, count, offset, chi2_sum) of the micro-batch
    (``MABN2d._micro``): the iteration counts once per step, at the first micro-batch, and the
    EMA moves once, at the last, to the mean over all the step's groups, as in one batch."""
    if micro is None or micro[0]:
        num_iterations.add_(1)
    iteration = num_iterations
    count = x.numel() // (groups * x.shape[1])
    squares = torch.linalg.vector_norm(x, dim=(2, 3), dtype=accumulation_dtype(x)).square()
    chi2 = squares.view(groups, -1, x.shape[1]).sum(1) / count
    chi2_sma, history = window_average(chi2_window, chi2)
    chi2_window.copy_(history)
    use_window = window_in_use(iteration, groups, chi2_window.shape[0], warmup_iters, micro)
    smoothed = torch.where(use_window, chi2_sma, chi2)
    ema_before = ema_chi2.clone()
    if micro is None:
        target = smoothed.mean(0)  # set on the first iteration, then moved by momentum
    else:
        first, last, count, _, chi2_sum = micro
        chi2_sum.copy_(smoothed.sum(0) if first else chi2_sum + smoothed.sum(0))
        target = chi2_sum / (groups * count)
    if micro is None or last:
        moved = torch.lerp(ema_before, target.to(ema_before.dtype), momentum)
        ema_chi2.copy_(torch.where(iteration == 1, target, moved))
    if forward_stat == "batch":
        var = chi2
    elif forward_stat == "ema":
        var = torch.where(use_window, ema_before, chi2)
    else:
        var = smoothed
    if not renorm:
        return var, torch.ones_like(var), use_window
    r = ((var + eps) / (ema_before + eps)).sqrt_()
    clipped = torch.where(iteration > renorm_warmup_iters, r.clamp_(1.0 / r_max, r_max), 1.0)
    return var, clipped, use_window


def mabn_train(
    x, weight, bias, ema_chi2, chi2_window, num_iterations, groups: int, options, batch_backward: bool, micro=None
):
    """MABN2d's training forward in plain tensor ops: y, and the normalizing chi2, r and the
    backward's SMA mask (``mabn_statistics``, whose ``options`` and ``micro`` these are)."""
    var, r, use_window = mabn_statistics(x, groups, ema_chi2, chi2_window, num_iterations, *options, micro)
    if batch_backward:
        use_window = torch.zeros_like(use_window)
    gain = weight * r * torch.rsqrt(var + options[1])
    y = group_view(x, groups) * gain[:, None, :, None] + bias[:, None]
    return y.view(x.shape), var, r, use_window


def mabn_backward(dy, x, weight, var, r, psi_window, use_window, eps: float):
    """``_MABNFunction``'s backward in plain tensor ops; advances ``psi_window`` in place."""
    groups = var.shape[0]
    xg, dyg = group_view(x, groups), group_view(dy, groups)
    inv_std = torch.rsqrt(var + eps)
    sum_dy, dy_z = dyg.sum(dim=(1, 3)), (dyg * xg).sum(dim=(1, 3)) * inv_std
    gain = weight * r
    psi = gain * dy_z / (xg.shape[1] * xg.shape[3])
    psi_sma, history = window_average(psi_window, psi)
    psi_window.copy_(history)
    psi = torch.where(use_window, psi_sma, psi)
    dx = (gain * inv_std)[:, None, :, None] * dyg - xg * (psi / (var + eps))[:, None, :, None]
    return dx.view(x.shape), (r * dy_z).sum(0), sum_dy.sum(0)


class _FusedMABNFunction(torch.autograd.Function):
    """``mabn_train`` and ``mabn_backward``, compiled (``mabn.norms.fused``); saves x and (G, C) values."""

    fused_forward, fused_backward = fused.Fused(mabn_train), fused.Fused(mabn_backward)

    @staticmethod
    def forward(
        ctx, x, weight, bias, ema_chi2, chi2_window, psi_window, num_iterations, groups, options, batch_backward, micro
    ):
        y, var, r, use_window = _FusedMABNFunction.fused_forward(
            x, weight, bias, ema_chi2, chi2_window, num_iterations, groups, options, batch_backward, micro
        )
        ctx.save_for_backward(x, weight.detach(), var, r, use_window)  # a plain tensor: one compiled graph
        ctx.psi_window = psi_window  # state advanced by backward, not a saved value
        ctx.eps = options[1]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, var, r, use_window = ctx.saved_tensors
        dx, dweight, dbias = _FusedMABNFunction.fused_backward(
            dy, x, weight, var, r, ctx.psi_window, use_window, ctx.eps
        )
        return dx, dweight, dbias, *[None] * (len(ctx.needs_input_grad) - 3)
