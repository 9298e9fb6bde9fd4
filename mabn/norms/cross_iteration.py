"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), docs/papers.md (later small-batch remedies)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from . import fused
from .accumulation import StepCounted
from .batch_norm import _GroupedBatchStats
from .kernels import gradient_sums, group_view, normalize, num_groups, per_sample
from .wired import NeedsWiring


def _input_gradient_terms(weight, mean, denom, share, scale: float, eps: float, sum_dy, sum_dy_xhat, count: int):
    """``dx = gain * dy + slope * x + offset`` per (group, channel), from the sums of dy and of dy * xhat
    (xhat = (x - mean) / denom) over the group: dL/dmu and dL/dnu, through denom = sqrt(var) + eps (0
    where var was clamped) and mean, spread over the group's count values."""
    std = denom - eps
    d_var = torch.where(std > 0, -weight * sum_dy_xhat / (denom * 2 * std.clamp_min(1e-30)), 0.0)
    d_mean = -weight * sum_dy / denom - 2 * scale * mean * d_var
    # dx = gamma * dy / denom + d_mu / n + 2 x d_nu / n, d_mu = share * d_mean, d_nu = share * scale * d_var
    return weight / denom, 2 * share * scale * d_var / count, share * d_mean / count


def compensated_backward(dy, x, weight, mean, denom, share, scale: float, eps: float):
    """``_CompensatedNormFunction``'s backward in plain tensor ops, compiled by ``mabn.norms.fused``: one
    reduction over dy and x, one pass that writes dx; returns dx, d gamma, d beta."""
    groups = len(mean)
    xg, dyg = group_view(x, groups), group_view(dy, groups)
    count = xg.shape[1] * xg.shape[3]
    sum_dy = dyg.sum(dim=(1, 3))
    sum_dy_xhat = (dyg * (xg - mean[:, None, :, None])).sum(dim=(1, 3)) / denom
    gain, slope, offset = (
        t[:, None, :, None]
        for t in _input_gradient_terms(weight, mean, denom, share, scale, eps, sum_dy, sum_dy_xhat, count)
    )
    return (dyg * gain + xg * slope + offset).view(x.shape), sum_dy_xhat.sum(0), sum_dy.sum(0)


class _CompensatedNormFunction(torch.autograd.Function):
    """``y = (x - mean) / (sqrt(var) + eps) * gamma + beta`` per (group, channel), with
    ``mean = past_mean + share * mu`` and ``var = scale * (past_second + share * nu - mean^2)``
    (clamped at 0): mu and nu, the group's own mean and second moment, are the only terms with
    a gradient; the past sums and the shares (1 / number of entries kept) are constants. The
    backward is compiled where ``mabn.norms.fused`` applies, else torch's batch-norm kernels."""

    fused_backward = fused.Fused(compensated_backward)

    @staticmethod
    def forward(ctx, x, weight, bias, mu, nu, past_mean, past_second, share, scale, eps):
        mean = past_mean + share * mu
        var = (scale * (past_second + share * nu - mean.square())).clamp_min(0)
        denom = var.sqrt() + eps
        ctx.save_for_backward(x, weight.detach(), mean, denom, share)  # a plain tensor: one compiled graph
        ctx.scale, ctx.eps = scale, eps
        groups = len(mu)
        return normalize(x, mean, denom.square(), weight.expand(groups, -1), bias.expand(groups, -1), 0.0)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, denom, share = ctx.saved_tensors
        groups, channels = mean.shape
        if fused.applies(x, groups):
            dx, dweight, dbias = _CompensatedNormFunction.fused_backward(
                dy, x, weight, mean, denom, share, ctx.scale, ctx.eps
            )
            return dx, dweight, dbias, *[None] * 7
        sum_dy, sum_dy_xhat = gradient_sums(dy, x, mean, denom.square(), 0.0)
        count = x.numel() // (groups * channels)
        gain, slope, offset = _input_gradient_terms(
            weight, mean, denom, share, ctx.scale, ctx.eps, sum_dy, sum_dy_xhat, count
        )
        dx = normalize(dy, torch.zeros_like(mean), torch.ones_like(mean), gain, offset, 0.0)
        dx.addcmul_(x, per_sample(slope, len(x)))
        return dx.to(dy.dtype), sum_dy_xhat.sum(0), sum_dy.sum(0), *[None] * 7


class CrossIterationBatchNorm2d(StepCounted, NeedsWiring, _GroupedBatchStats):
    """Cross-Iteration BN (CBN), the authors' ``CBatchNorm2d`` (``two_stage=True``,
    ``out_p=False``), with a normalization batch.

    Per channel, each normalization batch takes its own mean mu and second moment nu and those
    of the ``buffer_num`` preceding normalization batches, compensated to today's weight W of
    the conv that feeds the layer by one Taylor step, ``mu_old + rho * dmu_old/dW . (W -
    W_old)`` (the same for nu). Entries whose nu - mu^2 < 0 are dropped, the rest averaged:
    ``mean = avg(mu)``, ``var = avg(nu) - mean^2``; past entries carry no gradient. ``y = (x -
    mean) / (sqrt(var) + eps) * gamma + beta`` (eps outside the root, as ``out_p=False``).
    Burn-in: for the first ``burnin`` training iterations, and for an input without gradient
    (frozen layers), plain BN with the unbiased batch variance, buffer untouched. The buffer
    starts empty after burn-in and fills one iteration at a time. Running statistics: BN's
    rule with the current batch's mean and unbiased variance; inference uses ``(x -
    running_mean) / (sqrt(running_var) + eps)``.

    Groups of a batch are consecutive steps, as MABN's (its preceding groups, whose weight is
    today's, enter uncompensated); so are the micro-batches of an accumulated step, while the
    burn-in counts optimizer steps (``mabn.norms.accumulation``). The derivatives are closed forms of a conv's weight
    gradient (``dmu_c/dW[c]`` is the mean input patch, ``dnu_c/dW[c] = 2 mean(y_c * patch)``;
    for a grouped or depthwise conv, over the input channels of c's group, as the authors'
    ``autograd.grad`` gives them), computed only for the groups that stay in the buffer, where the authors call
    ``autograd.grad`` twice per layer and step. The layer needs its conv: ``bind_conv`` (done by
    ``mabn.wire_norms`` for every model of the suite) records the conv's input and weight at
    each forward. Defaults are the numbers of the authors' shipped configs (``buffer_num=3,
    burnin=8, rho=1``), but their ``burnin`` counts epochs (their tools/train.py multiplies it by
    the iterations per epoch: the window starts after 8 of the 1x schedule's 12 epochs), where
    this layer's counts iterations: the suite's runs set it to 8/12 of the run
    (configs/norm/cbn.yaml, ``run_fractions``; mabn/schedules.py). gamma starts at 1 (their
    ConvModule's init, not the layer's uniform draw).
    """

    schedule_options = ("burnin",)

    wiring = "the conv feeding it read at each step"

    def __init__(
        self,
        num_features,
        normalization_batch=None,
        buffer_num=3,
        burnin=8,
        rho=1.0,
        eps=1e-5,
        momentum=0.1,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, normalization_batch, eps, momentum, device, dtype)
        if buffer_num < 0 or burnin < 0:
            raise ValueError(f"cbn buffer_num and burnin must be >= 0, got {buffer_num} and {burnin}")
        if momentum is None:
            raise ValueError("cbn needs a float momentum (running-statistics update rate)")
        self.buffer_num, self.burnin, self.rho = buffer_num, burnin, rho
        self.register_buffer("num_iterations", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("past_count", torch.tensor(0, dtype=torch.long, device=device))
        self._allocate_buffer(0, device=device)
        self._conv = None  # (stride, padding, dilation, weight shape, groups) of the bound conv
        self._captured = None  # the bound conv's (input, weight) of the current forward
        self._burned_in = False  # host-side cache of num_iterations > burnin

    def extra_repr(self):
        return f"{super().extra_repr()}, buffer_num={self.buffer_num}, burnin={self.burnin}, rho={self.rho}"

    BUFFER_NAMES = ("past_mean", "past_second", "past_mean_offset", "past_second_offset", "past_dmean", "past_dsecond")

    def _allocate_buffer(self, patch_size: int, conv_groups: int = 1, device=None):
        """The past entries, oldest first: mean and second moment (k, C); their derivatives with
        respect to the conv weight, (k, G K) (the mean input patch: the same for every channel
        of a conv group, the group's K-long slice for a grouped conv) and (C, k, K); and the
        derivatives dotted with the weight they were taken at, (k, C), so that a compensation is
        ``dmu/dW . W - offset`` without keeping old weights. ``past_count`` of them (the newest)
        are real."""
        k, c = self.buffer_num, self.num_features
        like = {"device": device if device is not None else self.running_mean.device, "dtype": self.running_mean.dtype}
        shapes = ((k, c), (k, c), (k, c), (k, c), (k, conv_groups * patch_size), (c, k, patch_size))
        for name, shape in zip(self.BUFFER_NAMES, shapes):
            self.register_buffer(name, torch.zeros(shape, **like))

    def bind_conv(self, conv: nn.Conv2d) -> None:
        """Take the weight and input of ``conv``, the conv that feeds this layer (idempotent)."""
        if self._conv is not None:
            return
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"cbn needs a conv with zero padding given as numbers; got padding={conv.padding!r} "
                f"({conv.padding_mode}): use another norm here"
            )
        self._conv = (conv.stride, conv.padding, conv.dilation, tuple(conv.weight.shape), conv.groups)
        self._allocate_buffer(conv.weight[0].numel(), conv.groups, conv.weight.device)
        conv.register_forward_pre_hook(self._capture)  # a bound method: deepcopy maps it to the copy

    def _capture(self, conv, args):
        if self.training:
            self._captured = (args[0], conv.weight, conv.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A BatchNorm2d checkpoint loads too (iteration 0, empty buffer)."""
        for name in ("num_iterations", "past_count", *self.BUFFER_NAMES):
            state_dict.setdefault(prefix + name, getattr(self, name))
        self._burned_in = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _eval_forward(self, x):
        scale = self.weight / (self.running_var.sqrt() + self.eps)
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]

    def inference_affine(self):
        """(scale, shift) of the eval-mode layer, for folding into its conv."""
        scale = self.weight / (self.running_var.sqrt() + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        self.check_wired()
        captured, self._captured = self._captured, None
        if not self.training:
            return self._eval_forward(x)
        groups = num_groups(x.shape[0], self.normalization_batch)
        if self.first_micro_batch():  # iterations are optimizer steps (mabn.norms.accumulation)
            self.num_iterations.add_(1)
        if not self._burned_in:
            self._burned_in = int(self.num_iterations) > self.burnin
        var, mean, count = self._group_stats(x, groups)
        self._running_states(var, mean, count, last_only=True)
        second = var + mean.square()
        if not (self._burned_in and x.requires_grad):  # plain BN, unbiased variance
            zero = torch.zeros_like(mean)
            return _CompensatedNormFunction.apply(
                x,
                self.weight,
                self.bias,
                mean,
                second,
                zero,
                zero,
                torch.ones_like(mean),
                count / max(count - 1, 1),
                self.eps,
            )
        if captured is None:
            raise RuntimeError("cbn needs the conv that feeds it: build the model, then call mabn.wire_norms(model)")
        conv_input, weight, bias = captured
        # the conv's weight and bias at the precision it ran at (rounded under autocast), in the buffers' dtype
        weight, bias = (
            None if t is None else t.detach().to(x.dtype).to(self.past_dsecond.dtype) for t in (weight, bias)
        )
        past_mean, past_second, share = self._window(mean, second, weight.flatten(1))
        y = _CompensatedNormFunction.apply(
            x, self.weight, self.bias, mean, second, past_mean, past_second, share, 1.0, self.eps
        )
        self._push(conv_input.detach(), weight, bias, x, mean, second)
        return y

    def _dot_mean_patch(self, dmean, weight):
        """(k, C): each entry's mean input patch (k, G K) dotted with each channel's weight
        (C, K), over the channel's conv group only."""
        conv_groups = self._conv[4]
        k, per_group = len(dmean), len(weight) // conv_groups
        patches = dmean.view(k, conv_groups, weight.shape[1])
        return torch.einsum("kgi,gci->kgc", patches, weight.view(conv_groups, per_group, -1)).reshape(k, len(weight))

    @torch.no_grad()
    def _window(self, mean, second, weight):
        """Per group (G, C): the sums of the kept past entries' mean and second moment, and
        1 / the number of entries kept (the group's own included)."""
        k = self.buffer_num
        moved_mean = self._dot_mean_patch(self.past_dmean, weight) - self.past_mean_offset  # dmu/dW . (W - W_old)
        moved_second = torch.bmm(self.past_dsecond, weight.unsqueeze(-1))[..., 0].T - self.past_second_offset
        means = torch.cat([self.past_mean + self.rho * moved_mean, mean])
        seconds = torch.cat([self.past_second + self.rho * moved_second, second])
        real = torch.arange(k, device=mean.device) >= k - self.past_count
        kept = torch.cat([real.to(mean.dtype)[:, None].expand(k, mean.shape[1]), torch.ones_like(mean)]) * (
            seconds >= means.square()
        )
        # windows of k + 1 entries ending at each group: k before it (constants), then its own
        windows = [t.unfold(0, k + 1, 1) for t in (means * kept, seconds * kept, kept)]  # (G, C, k + 1)
        past_means, past_seconds = (w[..., :k].sum(-1) for w in windows[:2])
        entries = windows[2].sum(-1)
        own = windows[2][..., k]
        return past_means / entries, past_seconds / entries, own / entries

    @torch.no_grad()
    def _push(self, conv_input, weight, bias, y, mean, second):
        """Append the last min(k, G) groups' statistics and their derivatives, each written in
        its slot of the buffer (the older entries moved to the front first)."""
        k, groups = self.buffer_num, len(mean)
        kept = min(k, groups)
        if kept == 0:
            return
        first = k - kept  # the new entries' first slot
        if first:
            for name in self.BUFFER_NAMES:
                entries = getattr(self, name)
                if name == "past_dsecond":  # (C, k, K): the entries on dim 1
                    entries = entries.transpose(0, 1)
                entries[:first] = entries[kept:].clone()
        dtype = self.past_dsecond.dtype
        stride, padding, dilation, shape, conv_groups = self._conv
        size = len(y) // groups
        outputs = y[(groups - kept) * size :].to(dtype)
        inputs = conv_input[(groups - kept) * size :].to(dtype)
        self.past_dmean[first:] = mean_patch(inputs, kept, shape[2:], stride, padding, dilation, outputs.shape[2:])
        positions = size * outputs[0, 0].numel()
        input_moment = _input_moment_is_cheaper(shape, padding, conv_groups, positions)
        for index in range(kept):
            rows, slot = slice(index * size, (index + 1) * size), self.past_dsecond[:, first + index]
            if input_moment:
                pixels = inputs[rows, :, :: stride[0], :: stride[1]].transpose(0, 1).reshape(shape[1], -1)
                moment = weight.flatten(1) @ (pixels @ pixels.T / positions)
                if bias is not None:
                    moment.addcmul_(bias[:, None], self.past_dmean[first + index, None])
                torch.mul(moment, 2.0, out=slot)
            else:
                gradient = conv2d_weight(inputs[rows], shape, outputs[rows], stride, padding, dilation, conv_groups)
                torch.mul(gradient.flatten(1), 2.0 / positions, out=slot)  # scaled after: the weight's size
        # each derivative dotted with the weight it was taken at, in closed form: y_c = W[c] . patch + b_c
        # gives dmu_c/dW[c] . W[c] = mu_c - b_c and dnu_c/dW[c] . W[c] = 2 mean(y_c (y_c - b_c)) = 2 (nu_c - b_c mu_c)
        new_mean, new_second = mean[-kept:].to(dtype), second[-kept:].to(dtype)
        shift = 0.0 if bias is None else bias
        self.past_mean[first:] = new_mean
        self.past_second[first:] = new_second
        self.past_mean_offset[first:] = new_mean - shift
        self.past_second_offset[first:] = 2 * (new_second - shift * new_mean)
        self.past_count.copy_((self.past_count + kept).clamp(max=k))


def _input_moment_is_cheaper(shape, padding, conv_groups, positions) -> bool:
    """Whether a 1x1 conv's (no padding, one group) ``d mean(y^2) / dW = 2 E[y x^T]`` is cheaper as
    ``2 (W E[x x^T] + b E[x]^T)``, in^2 (positions + out) multiply-adds, than as the weight
    gradient, in out positions: only when in < out and the positions outnumber the channels."""
    out, in_ = shape[:2]
    return shape[2:] == (1, 1) and padding == (0, 0) and conv_groups == 1 and in_ * (positions + out) < out * positions


def mean_patch(x, groups, kernel_size, stride, padding, dilation, output_size):
    """d mean(y_c) / d W[c] of a conv with zero padding, per group of consecutive samples of x
    (groups, in_channels kh kw): the input patch averaged over the group's samples and output
    positions, flattened as (in_channels, kh, kw); for a grouped conv, channel c's is the slice of
    its group's input channels."""
    total = F.pad(x.unflatten(0, (groups, -1)).sum(1), (padding[1], padding[1], padding[0], padding[0]))
    rows, cols = output_size
    patch = [
        total[
            ...,
            i * dilation[0] : i * dilation[0] + stride[0] * (rows - 1) + 1 : stride[0],
            j * dilation[1] : j * dilation[1] + stride[1] * (cols - 1) + 1 : stride[1],
        ].sum((2, 3))
        for i in range(kernel_size[0])
        for j in range(kernel_size[1])
    ]
    return torch.stack(patch, 2).flatten(1) / (len(x) // groups * rows * cols)
