"""This suite's norms as detectron2 norm names: ``MODEL.RESNETS.NORM: MABN`` and so on.

detectron2's ``get_norm(norm, out_channels)`` maps strings to classes in a dict built inside
the function, and every module that uses it binds its own name (``from detectron2.layers
import get_norm``). ``register_detectron2_norms`` wraps the original once and rebinds the
wrapper in every loaded detectron2 module that holds it (and in ``detectron2.layers``, where
modules imported later take it from). Importing this module registers them. A build inside
``with building_with(options):`` gives the layers those options, and no state outlives the block:
two models built one after the other each get their own. The yacs config keeps plain strings, so
``cfg.dump()`` still works (detectron2 also takes a callable as a norm, but its yacs config, merged
and dumped as text, holds only primitives, and its modules bind ``get_norm`` by name: the names
must reach those bindings).

Names added: the detectron2 name of every norm of ``mabn.registry.TABLE`` that detectron2 does
not build itself (``detectron2_names()``: ``MABN``, ``BRN``, ``BN_NB`` for BN with a normalization
batch, ``SyncBN_ANY`` for the global-batch BN that runs on CPU (gloo) and CUDA, ``CBN``,
``EvoNormB0``, ``EvoNormS0``, ``FRN``, ``GN_WS``, ``PowerNorm``), each built with the options
given under the suite's name. ``mabn.wire_norms(model)`` then gives CBN and GN+WS their convs
and lets EvoNorm and FRN take the ReLU after them: this module teaches it detectron2's stem,
blocks and ``Conv2d(norm=..., activation=...)``. detectron2's own names (``DETECTRON2_OWN``)
are untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..norms.norm_act import NORM_ACT_LAYERS
from ..registry import TABLE, norm_layer
from ..wiring import register_activated_block, register_conv_with_norm


class Detectron2NotInstalled(ImportError, ConfigError):
    """detectron2 is missing (an ImportError, and a ConfigError so entry points print one line)."""


MISSING_MESSAGE = (
    "detectron2 is not installed: install it from source (https://github.com/facebookresearch/"
    "detectron2, `pip install 'git+https://github.com/facebookresearch/detectron2.git'`) "
    "or use engine=torchvision"
)

try:
    import detectron2.layers.batch_norm as _batch_norm
    import detectron2.modeling  # noqa: F401  (loads every module that binds get_norm)
    from detectron2.layers import Conv2d
    from detectron2.modeling.backbone import resnet as _resnet
except ImportError as error:  # detectron2 itself, or a compiled part of it, is missing
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] != "detectron2":
        raise
    raise Detectron2NotInstalled(MISSING_MESSAGE) from None

# the names detectron2's own get_norm builds (its "GN" is the table's gn); the others are added here
DETECTRON2_OWN = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "LN")


def detectron2_names() -> dict[str, str]:
    """detectron2 name -> this suite's name, for every norm of ``mabn.registry.TABLE`` with a
    detectron2 name that detectron2 does not build itself."""
    return {e.detectron2: name for name, e in TABLE.items() if e.detectron2 and e.detectron2 not in DETECTRON2_OWN}


# (options by this suite's name, the layers made) of the build under way in this context, if any
_build: contextvars.ContextVar[tuple[dict, list] | None] = contextvars.ContextVar("mabn_detectron2_build", default=None)


def _original_get_norm():
    current = _batch_norm.get_norm
    return getattr(current, "__wrapped__", current)


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` plus the names of ``detectron2_names()``, built with the options of
    the ``building_with`` block under way (none outside one: the layers' defaults)."""
    if isinstance(norm, str) and norm in (names := detectron2_names()):
        name = names[norm]
        options, made = _build.get() or ({}, [])
        module = norm_layer(name, **options.get(name, {}))(out_channels)
        made.append(module)
        return module
    return get_norm.__wrapped__(norm, out_channels)


def register_detectron2_norms() -> None:
    """Make the names of ``detectron2_names()`` valid detectron2 norm strings: rebind the wrapped
    ``get_norm`` in every loaded detectron2 module that holds the original. Idempotent."""
    original = get_norm.__wrapped__ = _original_get_norm()
    for name, module in list(sys.modules.items()):
        if (name == "detectron2" or name.startswith("detectron2.")) and module is not None:
            bound = getattr(module, "get_norm", None)
            if bound is not None and getattr(bound, "__wrapped__", bound) is original:
                module.get_norm = get_norm


@contextlib.contextmanager
def building_with(norm_options: dict[str, dict] | None = None):
    """A detectron2 build whose added names take ``norm_options`` (keyed by this suite's names:
    ``{<name>: {<option>: <value>}}``); yields the list of the layers built through them. The
    options hold inside the block only: the next model gets its own."""
    register_detectron2_norms()  # detectron2 modules loaded since the import bind the original
    made: list = []
    token = _build.set(({name: dict(options) for name, options in (norm_options or {}).items()}, made))
    try:
        yield made
    finally:
        _build.reset(token)


# ---- norm + activation layers in detectron2's modules (mabn.wiring) ----


class NormActStem(_resnet.BasicStem):
    """detectron2's stem whose norm applies the activation itself."""

    def forward(self, x):
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class NormActBasicBlock(_resnet.BasicBlock):
    """detectron2's BasicBlock whose first norm applies the activation itself."""

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv2(self.conv1(x)) + shortcut)


class NormActBottleneckBlock(_resnet.BottleneckBlock):
    """detectron2's BottleneckBlock whose first two norms apply the activation themselves."""

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv3(self.conv2(self.conv1(x))) + shortcut)


def _swap_block(new_class, *convs):
    def rule(block):
        norms = [getattr(block, name).norm for name in convs]
        if not all(isinstance(n, NORM_ACT_LAYERS) for n in norms):
            return []
        block.__class__ = new_class
        return norms

    return rule


def _conv_activation(conv):
    """``Conv2d(norm=..., activation=ReLU)`` (box and mask heads): the norm takes the ReLU."""
    relu = isinstance(conv.activation, nn.ReLU) or conv.activation in (F.relu, F.relu_)
    if isinstance(conv.norm, NORM_ACT_LAYERS) and relu:
        conv.activation = None
        return [conv.norm]
    return []


register_activated_block(_resnet.BasicStem, _swap_block(NormActStem, "conv1"))
register_activated_block(_resnet.BasicBlock, _swap_block(NormActBasicBlock, "conv1"))
register_activated_block(_resnet.BottleneckBlock, _swap_block(NormActBottleneckBlock, "conv1", "conv2"))
register_activated_block(Conv2d, _conv_activation)
register_conv_with_norm(Conv2d)  # its forward applies .norm to its own output

register_detectron2_norms()  # importing the module makes the names valid
