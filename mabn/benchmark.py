"""Measuring what a norm costs: bytes saved for the backward (counted with saved-tensor hooks, so
exact and device independent), for one layer or a model's whole training step."""

from __future__ import annotations

import torch
from torch import nn


def saved_bytes(layer, x, dy, dtype=None) -> int:
    """Bytes of the tensors the layer saves for its backward (each storage counted once;
    values kept as attributes of an autograd Function's ctx are not seen)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None),
    ):
        out = layer(x)
    out.backward(dy)
    if x.is_cuda:
        torch.cuda.synchronize()
    return sum(storages.values())


def training_step_saved_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes a classifier's training step (forward, cross-entropy, backward) saves for its backward."""
    loss = _Loss(model, labels)
    return saved_bytes(loss, images, torch.ones(()))


class _Loss(nn.Module):
    def __init__(self, model: nn.Module, labels: torch.Tensor):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, images):
        return nn.functional.cross_entropy(self.model(images), self.labels)
