"""The normalization layers of the comparison: BN, BRN and MABN with a normalization batch,
SyncBN, GN, LN and IN, MABN's successors: CBN, EvoNorm-B0/S0, FRN + TLU, GN + WS, and its
relative PowerNorm.

One module per family: ``kernels`` (the normalization batch and one-pass kernels),
``batch_norm`` (BN, BRN, SyncBN), ``moving_average`` (MABN), ``cross_iteration`` (CBN),
``group_norm`` (GN, LN, IN, GN + WS), ``norm_act`` (timm's EvoNorm and FRN layers),
``power_norm`` (PowerNorm, and ``TokenNorm``: any of them over a transformer's tokens);
``accumulation`` (what the layers count under gradient accumulation: ``set_micro_batch``).

Every layer takes the channel count first and accepts ``device``/``dtype``, so that timm,
torchvision and detectron2 can build it through ``norm_layer(channels)``.

Normalization batch: a per-device batch of N samples is split into N / b consecutive
groups of b samples, each normalized with its own statistics (b >= N, or None, is the
ordinary behaviour). This is how the paper simulates "batch 2" at an SGD batch of 32.

Kernels: in fp32 on CPU, once turned on, BN with groups, BRN and MABN train through ``mabn.norms.fused``
(the plain formulas of ``batch_norm_train``/``batch_norm_backward`` and ``mabn_train``/``mabn_backward``,
compiled), CBN takes its statistics and backward there (``group_moments``,
``compensated_backward``) and GN+WS its weight standardization; elsewhere through eager code
around torch's batch-norm kernels. PowerNorm and the norm + activation layers run their own plain
formulas, eager or compiled alike. Both kernels are checked
against each other (tests/norms/test_fused.py, tests/norms/test_norm_act.py) and the eager code against
references from the papers' formulas (tests/norms/test_norms.py, tests/norms/test_power_norm.py).

None of the layers subclasses ``nn.BatchNorm2d``: torch's SyncBN conversion and
detectron2's FrozenBN conversion decide by ``isinstance(m, BatchNorm2d)`` and would
silently replace them. Parameter and buffer names follow ``nn.BatchNorm2d`` where the
meaning is the same, so BN checkpoints load into ``BatchNorm2d``/``BatchRenorm2d``.
"""

from .accumulation import set_micro_batch
from .batch_norm import BatchNorm2d, BatchRenorm2d, SyncBatchNorm
from .cross_iteration import CrossIterationBatchNorm2d
from .group_norm import GroupNorm, GroupNormWS, InstanceNorm2d, LayerNorm2d
from .moving_average import MABN2d
from .norm_act import EvoNormB0, evonorm_s0, frn
from .power_norm import PowerNorm2d, TokenNorm

__all__ = [
    "BatchNorm2d",
    "BatchRenorm2d",
    "SyncBatchNorm",
    "CrossIterationBatchNorm2d",
    "GroupNorm",
    "GroupNormWS",
    "InstanceNorm2d",
    "LayerNorm2d",
    "MABN2d",
    "PowerNorm2d",
    "TokenNorm",
    "EvoNormB0",
    "evonorm_s0",
    "frn",
    "set_micro_batch",
]
