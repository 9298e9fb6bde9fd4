"""Probes of the four batch statistics of the paper (docs/method.md) during training.

For a few channels of a few norm layers of any model, every ``every`` training steps:

- forward: ``mu`` (mean of x) and ``sigma2`` (biased variance of x) of each normalization
  batch;
- backward: ``g`` = gamma * mean(dL/dy) and ``psi`` = gamma * mean(dL/dy * x_hat), with
  x_hat = (x - mu) / sqrt(sigma2 + eps) the group's normalized input (the authors'
  ``cls/stat_util.py`` probe, with x_hat where they use y);
- MABN layers also: the smoothed statistics that the layer uses: ``chi2_sma`` (window mean
  of the second moment, after the step's forward), ``psi_sma`` (window mean of psi as the
  step starts: the layer advances it in its backward) and ``ema_chi2``;
- BRN layers also: the step's ``r_max`` and ``d_max`` (the relaxation schedule).

Each statistic is computed for every normalization batch size in ``batches`` from the same
activations (groups of b consecutive samples), so one run at per-device batch 32 shows how
noisy each estimate is at b = 1 ... 32. The probe is opt-in: nothing is registered until
``attach()``, and ``detach()`` removes every hook.
"""

from __future__ import annotations

import torch
from torch import nn

from . import registry
from .norms import BatchRenorm2d, MABN2d
from .norms.norm_act import NORM_ACT_LAYERS


# every per-channel norm of the suite: the probe records its input's and gradient's statistics
def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the model's normalization layers with a per-channel weight."""
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, *NORM_ACT_LAYERS, *registry.layers())
    return [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, kinds) or hasattr(m, "normalization_batch")) and getattr(m, "weight", None) is not None
    ]


def group_statistics(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, batch: int, eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """mu, sigma2, g, psi of each group of ``batch`` consecutive samples: (groups, channels)."""
    n, c = x.shape[:2]
    groups = n // batch
    xg = x[: groups * batch].double().reshape(groups, batch, c, -1)
    dg = dy[: groups * batch].double().reshape(groups, batch, c, -1)
    mu = xg.mean(dim=(1, 3))
    sigma2 = xg.var(dim=(1, 3), unbiased=False)
    x_hat = (xg - mu[:, None, :, None]) * torch.rsqrt(sigma2 + eps)[:, None, :, None]
    gamma = weight.detach().double()
    return {"mu": mu, "sigma2": sigma2, "g": gamma * dg.mean(dim=(1, 3)), "psi": gamma * (dg * x_hat).mean(dim=(1, 3))}


class BatchStatisticsProbe:
    """Records batch statistics of ``channels`` channels of the first ``layers`` norm layers
    (or those named in ``layer_names``) every ``every`` steps into ``self.records``.

    Call ``step(k)`` before each training step k (1-based, as the engine counts): hooks are
    active only on recorded steps. Each record is one dict per (step, layer, statistic,
    batch) with ``values`` a list of per-group lists (groups x channels)."""

    def __init__(
        self,
        model: nn.Module,
        layers: int = 3,
        channels: int = 4,
        every: int = 20,
        batches=(1, 2, 4, 8, 16, 32),
        layer_names: list[str] | None = None,
    ):
        found = norm_layers(model)
        if layer_names:
            found = [(n, m) for n, m in found if n in layer_names]
        else:  # spread over the depth of the main path (first, middle, last ...)
            found = [(n, m) for n, m in found if "downsample" not in n] or found
            picks = sorted({round(i * (len(found) - 1) / max(layers - 1, 1)) for i in range(layers)})
            found = [found[i] for i in picks] if found else []
        if not found:
            raise ValueError("the probe found no normalization layer with a weight in the model")
        self.layers, self.channels, self.every, self.batches = found, channels, every, tuple(batches)
        self.records: list[dict] = []
        self._handles: list = []
        self._current_step: int | None = None

    def attach(self) -> BatchStatisticsProbe:
        for name, module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._before(name, module)))
            self._handles.append(module.register_forward_hook(self._after(name, module)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    def step(self, step: int) -> None:
        """Announce training step ``step``: it is recorded when ``step % every == 0`` or 1."""
        self._current_step = step if step == 1 or step % self.every == 0 else None

    def _active(self, module) -> bool:
        return self._current_step is not None and module.training and torch.is_grad_enabled()

    def _before(self, name, module):
        def hook(mod, args):
            if self._active(mod) and isinstance(mod, BatchRenorm2d):
                r_max, d_max = mod.limits()
                self._add(name, "r_max", 0, [[float(r_max)]])
                self._add(name, "d_max", 0, [[float(d_max)]])

        return hook

    def _after(self, name, module):
        def hook(mod, args, output):
            if not self._active(mod) or not output.requires_grad:
                return
            step, k = self._current_step, self.channels
            x = args[0].detach()[:, :k].float()
            weight = mod.weight[:k]
            eps = getattr(mod, "eps", 1e-5)
            if isinstance(mod, MABN2d):
                self._add(name, "chi2_sma", 0, [mod.chi2_window[:, :k].mean(0).tolist()])
                self._add(name, "ema_chi2", 0, [mod.ema_chi2[:k].tolist()])

            if isinstance(mod, MABN2d):  # psi's window advances in the backward: as it enters the step
                self._add(name, "psi_sma", 0, [mod.psi_window[:, :k].mean(0).tolist()])

            def backward_hook(dy):
                dy = dy.detach()[:, :k].float()
                for batch in self.batches:
                    if batch <= len(x):
                        for stat, values in group_statistics(x, dy, weight, batch, eps).items():
                            self._add(name, stat, batch, values.tolist(), step)

            output.register_hook(backward_hook)

        return hook

    def _add(self, layer, stat, batch, values, step=None):
        self.records.append(
            {"step": step or self._current_step, "layer": layer, "stat": stat, "batch": batch, "values": values}
        )
