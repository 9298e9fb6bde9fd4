"""Slow, obvious references written from the formulas (docs/method.md; docs/papers.md, training setups).

They loop over normalization batches one at a time and never call the library's layers."""

import torch


def batches(steps, shape, dtype=torch.float64, seed=0):
    """Inputs whose scale and offset drift between iterations, so statistics move."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        scale = 0.5 + 2.0 * torch.rand(1, generator=generator, dtype=dtype)
        offset = torch.randn(1, shape[1], 1, 1, generator=generator, dtype=dtype) * 0.3
        x = torch.randn(*shape, generator=generator, dtype=dtype) * scale + offset
        dy = torch.randn(*shape, generator=generator, dtype=dtype)
        yield x, dy


def forward_backward(layer, x, dy):
    """Forward and backward of one iteration; returns y, dx, dweight, dbias."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def assert_close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10, **kw)


class ReferenceMABN:
    """MABN step by step: every normalization batch is one step of the SMA windows."""

    def __init__(
        self,
        channels,
        window,
        momentum=0.02,
        eps=1e-5,
        warmup_iters=100,
        renorm_warmup_iters=1000,
        r_max=5.0,
        forward_stat="sma",
        backward_stat="sma",
        renorm=True,
        dtype=torch.float64,
    ):
        self.window, self.momentum, self.eps = window, momentum, eps
        self.forward_stat, self.backward_stat, self.renorm = forward_stat, backward_stat, renorm
        self.warmup_iters, self.renorm_warmup_iters, self.r_max = warmup_iters, renorm_warmup_iters, r_max
        self.chi2_history, self.psi_history = [], []
        self.ema = torch.ones(channels, dtype=dtype)
        self.iteration = 0

    def step(self, x, dy, gamma, beta, normalization_batch):
        """One training iteration: returns y, dx, dgamma, dbeta, and records the statistics."""
        self.iteration += 1
        groups = x.split(normalization_batch)
        grads = dy.split(normalization_batch)
        used, tracked = [], []
        ema_before = self.ema.clone()
        for xg in groups:
            chi2 = (xg * xg).mean(dim=(0, 2, 3))
            self.chi2_history.append(chi2)
            smoothed = len(self.chi2_history) >= self.window and self.iteration >= self.warmup_iters
            sma = torch.stack(self.chi2_history[-self.window :]).mean(0) if smoothed else chi2
            tracked.append(sma)
            if self.forward_stat == "batch":
                var = chi2
            elif self.forward_stat == "ema":
                var = ema_before if smoothed else chi2
            else:
                var = sma
            used.append((var, smoothed))
        tracked = torch.stack(tracked).mean(0)
        if self.iteration == 1:
            self.ema = tracked
        else:
            self.ema = (1 - self.momentum) * self.ema + self.momentum * tracked
        ys, dxs = [], []
        dgamma = torch.zeros_like(gamma)
        dbeta = torch.zeros_like(beta)
        for xg, dyg, (var, smoothed) in zip(groups, grads, used):
            std = torch.sqrt(var + self.eps).view(1, -1, 1, 1)
            r = std / torch.sqrt(ema_before + self.eps).view(1, -1, 1, 1)
            if self.renorm and self.iteration > self.renorm_warmup_iters:
                r = r.clamp(1 / self.r_max, self.r_max)
            else:
                r = torch.ones_like(r)
            z = xg / std
            ys.append(gamma.view(1, -1, 1, 1) * r * z + beta.view(1, -1, 1, 1))
            g = dyg * gamma.view(1, -1, 1, 1) * r
            psi = (g * z).mean(dim=(0, 2, 3))
            self.psi_history.append(psi)
            if smoothed and self.backward_stat == "sma":
                psi = torch.stack(self.psi_history[-self.window :]).mean(0)
            dxs.append((g - z * psi.view(1, -1, 1, 1)) / std)
            dgamma += (dyg * r * z).sum(dim=(0, 2, 3))
            dbeta += dyg.sum(dim=(0, 2, 3))
        return torch.cat(ys), torch.cat(dxs), dgamma, dbeta


class ReferenceBRN:
    """Batch Renormalization (Ioffe 2017) applied to each normalization batch in turn."""

    def __init__(
        self, channels, momentum, eps, r_max, d_max, warmup_iters, r_max_iters, d_max_iters, dtype=torch.float64
    ):
        self.momentum, self.eps = momentum, eps
        self.r_max, self.d_max = r_max, d_max
        self.warmup_iters, self.r_max_iters, self.d_max_iters = warmup_iters, r_max_iters, d_max_iters
        self.mean = torch.zeros(channels, dtype=dtype)
        self.var = torch.ones(channels, dtype=dtype)
        self.iterations_done = 0
        self.clipped = 0

    def limit(self, final, start, end):
        if self.iterations_done < self.warmup_iters:
            return start
        if end <= self.warmup_iters:
            return final
        frac = min(1.0, (self.iterations_done - self.warmup_iters) / (end - self.warmup_iters))
        return start + (final - start) * frac

    def forward(self, x, gamma, beta, normalization_batch):
        """Differentiable forward (r and d detached) of one iteration."""
        r_max = self.limit(self.r_max, 1.0, self.r_max_iters)
        d_max = self.limit(self.d_max, 0.0, self.d_max_iters)
        ys = []
        for xg in x.split(normalization_batch):
            mu = xg.mean(dim=(0, 2, 3))
            var = ((xg - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
            sigma_b = torch.sqrt(var + self.eps)
            sigma = torch.sqrt(self.var + self.eps)
            raw_r = sigma_b.detach() / sigma
            r = raw_r.clamp(1 / r_max, r_max)
            d = ((mu.detach() - self.mean) / sigma).clamp(-d_max, d_max)
            self.clipped += int((r != raw_r).sum())
            xhat = (xg - mu.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1)
            ys.append(
                gamma.view(1, -1, 1, 1) * (xhat * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)) + beta.view(1, -1, 1, 1)
            )
            n = xg.numel() // xg.shape[1]
            with torch.no_grad():
                self.mean = (1 - self.momentum) * self.mean + self.momentum * mu
                self.var = (1 - self.momentum) * self.var + self.momentum * var * n / (n - 1)
        self.iterations_done += 1
        return torch.cat(ys)


class ReferencePowerNorm:
    """PowerNorm step by step as the authors' layer computes it (docs/papers.md, relatives): every
    normalization batch is one step t; group scaling by the formula (its gradient by autograd),
    the rest by the written-out forward and approximate backward."""

    def __init__(self, channels, alpha_fwd=0.9, alpha_bkw=0.9, eps=1e-5, warmup_iters=10000, scaling_groups=1):
        self.alpha_fwd, self.alpha_bkw, self.eps, self.warmup = alpha_fwd, alpha_bkw, eps, warmup_iters
        self.scaling_groups = scaling_groups
        self.phi = torch.ones(channels, dtype=torch.float64)
        self.u = torch.zeros(channels, dtype=torch.float64)
        self.t = 0

    def scale(self, x):
        if self.scaling_groups is None:
            return x
        parts = []
        for part in x.chunk(self.scaling_groups, dim=1):  # each group of channels, at each position
            parts.append(part / (part.pow(2).mean(dim=1, keepdim=True) + 1e-5).sqrt())
        return torch.cat(parts, dim=1)

    def step(self, x, dy, gamma, beta, normalization_batch):
        """One training iteration: y, dx, dgamma, dbeta; advances phi, u and t."""
        ys, dxs = [], []
        dgamma, dbeta = torch.zeros_like(gamma), torch.zeros_like(beta)
        per_channel = lambda v: v[None, :, None, None]
        for xk, dyk in zip(x.split(normalization_batch or len(x)), dy.split(normalization_batch or len(x))):
            self.t += 1
            xk = xk.detach().clone().requires_grad_(True)
            scaled = self.scale(xk)
            with torch.no_grad():
                s = scaled.pow(2).mean(dim=(0, 2, 3))
                divisor = s if self.t <= self.warmup else self.phi.clone()
                if self.t < self.warmup:
                    self.phi = self.phi * (self.t - 1) / self.t + s / self.t
                self.phi = self.alpha_fwd * self.phi + (1 - self.alpha_fwd) * s
                z = scaled / per_channel((divisor + self.eps).sqrt())
                ys.append(per_channel(gamma) * z + per_channel(beta))
                approximate = dyk * per_channel(gamma) - (1 - self.alpha_bkw) * per_channel(self.u) * z
                self.u = self.u + (approximate * z).mean(dim=(0, 2, 3))
                dscaled = approximate / per_channel((s + self.eps).sqrt())
                dgamma += (dyk * z).sum(dim=(0, 2, 3))
                dbeta += dyk.sum(dim=(0, 2, 3))
            (dx,) = torch.autograd.grad(scaled, xk, dscaled) if self.scaling_groups else (dscaled,)
            dxs.append(dx)
        return torch.cat(ys), torch.cat(dxs), dgamma, dbeta

    def eval(self, x, gamma, beta):
        with torch.no_grad():
            scaled = self.scale(x)
            return (
                gamma[None, :, None, None] * scaled / (self.phi + self.eps).sqrt()[None, :, None, None]
                + beta[None, :, None, None]
            )
