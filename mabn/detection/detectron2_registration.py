"""This suite's norms as detectron2 norm names: ``MODEL.RESNETS.NORM: MABN`` and so on.

detectron2's ``get_norm(norm, out_channels)`` maps strings to classes in a dict built inside
the function, and every module that uses it binds its own name (``from detectron2.layers
import get_norm``). ``register_detectron2_norms`` wraps the original once and rebinds the
wrapper in every loaded detectron2 module that holds it (and in ``detectron2.layers``, where
modules imported later take it from). Importing this module registers them with default
options; call ``register_detectron2_norms(options)`` to set options. The yacs config keeps
plain strings, so ``cfg.dump()`` still works; the options live here, set by the latest call.

Names added (detectron2's own, "BN", "SyncBN", "GN", "FrozenBN", ..., are untouched):

- ``MABN``: ``mabn.MABN2d`` (options of ``norm_options["mabn"]``)
- ``BRN``: ``mabn.BatchRenorm2d`` (``norm_options["brn"]``)
- ``BN_NB``: ``mabn.BatchNorm2d``, BN with a normalization batch (``norm_options["bn"]``)
- ``SyncBN_ANY``: ``mabn.SyncBatchNorm``, global-batch BN that runs on CPU (gloo) and CUDA
  (``norm_options["syncbn"]``)
"""

from __future__ import annotations

import contextlib
import sys

from ..config import ConfigError
from ..registry import norm_layer


class Detectron2NotInstalled(ImportError, ConfigError):
    """detectron2 is missing (an ImportError, and a ConfigError so entry points print one line)."""


MISSING_MESSAGE = ("detectron2 is not installed: install it from source (https://github.com/facebookresearch/"
                   "detectron2, `pip install 'git+https://github.com/facebookresearch/detectron2.git'`) "
                   "or use engine=torchvision")

try:
    import detectron2.layers.batch_norm as _batch_norm
    import detectron2.modeling  # noqa: F401  (loads every module that binds get_norm)
except ImportError as error:  # detectron2 itself, or a compiled part of it, is missing
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] != "detectron2":
        raise
    raise Detectron2NotInstalled(MISSING_MESSAGE) from None

# detectron2 name -> this suite's registry name
DETECTRON2_NAMES = {"MABN": "mabn", "BRN": "brn", "BN_NB": "bn", "SyncBN_ANY": "syncbn"}

_options: dict[str, dict] = {}
_recorders: list[list] = []


def _original_get_norm():
    current = _batch_norm.get_norm
    return getattr(current, "__wrapped__", current)


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` plus the names of ``DETECTRON2_NAMES``."""
    if isinstance(norm, str) and norm in DETECTRON2_NAMES:
        name = DETECTRON2_NAMES[norm]
        module = norm_layer(name, **_options.get(name, {}))(out_channels)
        for made in _recorders:
            made.append(module)
        return module
    return get_norm.__wrapped__(norm, out_channels)


def register_detectron2_norms(norm_options: dict[str, dict] | None = None) -> None:
    """Make "MABN", "BRN", "BN_NB" and "SyncBN_ANY" valid detectron2 norm strings, built with
    ``norm_options[name]`` (keyed by this suite's names: ``{"mabn": {"sma_window": 16}}``).
    Idempotent; a later call replaces all options of the earlier one."""
    original = get_norm.__wrapped__ = _original_get_norm()
    _options.clear()
    _options.update({name: dict(options) for name, options in (norm_options or {}).items()})
    for name, module in list(sys.modules.items()):
        if (name == "detectron2" or name.startswith("detectron2.")) and module is not None:
            bound = getattr(module, "get_norm", None)
            if bound is not None and getattr(bound, "__wrapped__", bound) is original:
                module.get_norm = get_norm


@contextlib.contextmanager
def recording_norms():
    """Collects every norm layer built through the added names while the block runs."""
    made: list = []
    _recorders.append(made)
    try:
        yield made
    finally:
        _recorders.remove(made)


register_detectron2_norms()  # importing the module makes the names valid (with default options)
