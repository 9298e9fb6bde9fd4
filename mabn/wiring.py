"""Give each norm what it needs from the model around it: ``wire_norms(model)``.

- The conv that feeds it: GN+WS standardizes that conv's weight, CBN reads its weight and
  input (``bind_conv``). "The conv that feeds a norm" is the conv whose output is the norm's
  whole input and nothing else's (``conv_norm_pairs``), found from the dataflow: a symbolic trace
  whose leaves are convs and norms, where the model traces (else its children, each on its own),
  and the structure where it is certain (a conv that applies its own norm: detectron2's
  ``Conv2d(norm=...)``; a plain ``nn.Sequential``'s conv and the norm after it). Never by module
  order: in pre-activation and concatenating networks the conv registered before a norm is often
  another block's. A norm fed by anything else (a sum, a concatenation) is paired with nothing:
  it is not folded, MABN there stays uncentralized (with a warning), CBN and GN+WS refuse.
- Its conv's weight centralized: MABN subtracts no mean, so the conv feeding it trains with
  W - mean(W) per output channel (``centralize_weights``, ``mabn.norms.centralization``).
- The ReLU after it: a norm + activation layer (EvoNorm, FRN + TLU) replaces a norm and the
  ReLU that follows it. Where a ReLU follows the norm directly, the block stops applying it;
  everywhere else (before a residual add, whose ReLU stays, in FPNs, in shortcuts) the layer's
  own activation is turned off. Blocks decide by their type (``ACTIVATED_BLOCKS``: timm's and
  torchvision's ResNets, ``nn.Sequential`` conv-norm-ReLU runs; detectron2's blocks are added
  by ``mabn.detectors.detectron2_registration``); a norm + activation layer in a module of
  another type keeps its activation, with a warning.

A norm that needs any of these (``mabn.norms.wired.NeedsWiring``) refuses to train until
``wire_norms`` has run: a model built with ``norm_layer=`` (timm, torchvision, detectron2's
``build_model``) and trained unwired would otherwise be a different model than the paper's.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import timm.models.resnet as timm_resnet
import torchvision.models.resnet as tv_resnet
from torch import fx, nn
from torch.nn.utils import parametrize
from torchvision.models._utils import IntermediateLayerGetter

from . import norms, registry
from .norms.centralization import Centralize, is_centralized
from .norms.group_norm import load_plain_weight
from .norms.norm_act import NORM_ACT_LAYERS, drop_activation
from .norms.reparametrized_conv import recompute_weight
from .norms.wired import NeedsWiring


def foldable_norms() -> tuple[type, ...]:
    """torch's BN and the norms of ``registry.TABLE`` that fold (per-channel affine in eval mode)."""
    return (nn.modules.batchnorm._BatchNorm, *registry.layers("foldable"))


def paired_norms() -> tuple[type, ...]:
    """Every norm a conv can feed: torch's BN and GN, timm's norm + activation layers, the table's."""
    return (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, *NORM_ACT_LAYERS, *registry.layers())


# ---- which conv feeds which norm: the dataflow ----

# conv types that apply a norm of their own to their output (attribute name): detectron2's Conv2d
CONVS_WITH_NORM: dict[type, str] = {}


def register_conv_with_norm(conv_type: type, attribute: str = "norm") -> None:
    """Teach the pairing a conv type whose forward applies ``conv.<attribute>`` to its own output
    (detectron2's ``Conv2d(norm=...)``, registered by ``mabn.detectors.detectron2_registration``)."""
    CONVS_WITH_NORM[conv_type] = attribute


MODULE_DICTS = ("_parameters", "_buffers", "_modules")


class _PairTracer(fx.Tracer):
    """A symbolic trace whose leaves are the convs and the norms (as torch's conv-BN fusion traces)."""

    def __init__(self):
        super().__init__()
        self.norms = paired_norms()
        self.leaves = (nn.Conv2d, norms.TokenNorm, *self.norms)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaves) or super().is_leaf_module(module, qualified_name)


def _owned_norm(conv: nn.Module):
    """The norm a conv of a ``CONVS_WITH_NORM`` type applies (its subclasses too: a centralized
    conv's class is a parametrized subclass), or None."""
    attribute = next((name for kind, name in CONVS_WITH_NORM.items() if isinstance(conv, kind)), None)
    norm = getattr(conv, attribute, None) if attribute else None
    return norm if isinstance(norm, paired_norms()) else None


def _trace(module: nn.Module, tracer: fx.Tracer) -> fx.Graph:
    """The symbolic trace of ``module``, its modules' attributes as they were before it (a forward
    run on proxies may set some: torchvision's ``MultiScaleRoIAlign`` caches its scales)."""
    kept = [(m, dict(vars(m)), {name: dict(vars(m)[name]) for name in MODULE_DICTS}) for m in module.modules()]
    try:
        return tracer.trace(module)
    finally:
        for m, attributes, dicts in kept:
            vars(m).clear()
            vars(m).update(attributes)
            for name, entries in dicts.items():
                getattr(m, name).clear()
                getattr(m, name).update(entries)


def _traced_pairs(module: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """(conv name, norm name) where the norm's only input is the conv's output and nothing else reads
    that output, in the symbolic trace of ``module``; a module that does not trace (control flow on
    its input) is split into its children, each traced on its own, and a plain ``nn.Sequential``'s
    conv followed by a norm pairs by its order (its forward is the chain)."""
    tracer = _PairTracer()
    try:
        graph = _trace(module, tracer)
    except Exception:  # any failure of the trace only means no dataflow is known at this level
        children = list(module.named_children())
        pairs = []
        if type(module).forward is nn.Sequential.forward:
            pairs = [
                (f"{prefix}{conv}", f"{prefix}{norm}")
                for (conv, first), (norm, second) in zip(children, children[1:])
                if isinstance(first, nn.Conv2d) and _owned_norm(first) is None and isinstance(second, tracer.norms)
            ]
        for name, child in children:
            if not isinstance(child, tracer.leaves):
                pairs += _traced_pairs(child, f"{prefix}{name}.")
        return pairs
    calls = [node for node in graph.nodes if node.op == "call_module"]
    times_called = Counter(node.target for node in calls)
    pairs = []
    for node in calls:
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(module.get_submodule(node.target), tracer.norms) and isinstance(source, fx.Node)):
            continue
        conv = module.get_submodule(source.target) if source.op == "call_module" else None
        if (
            isinstance(conv, nn.Conv2d)
            and _owned_norm(conv) is None
            and len(source.users) == 1
            and times_called[source.target] == times_called[node.target] == 1
        ):
            pairs.append((f"{prefix}{source.target}", f"{prefix}{node.target}"))
    return pairs


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.Module]]:
    """(conv name, conv, norm name, norm) for each norm whose input is exactly one ``nn.Conv2d``'s
    output, which nothing else reads (the module docstring says how that is found), in the
    norms' module order. Every other norm is paired with nothing."""
    modules = dict(model.named_modules())
    name_of = {id(module): name for name, module in modules.items()}
    conv_of = {name_of[id(norm)]: name for name, conv in modules.items() if (norm := _owned_norm(conv)) is not None}
    conv_of.update((norm, conv) for conv, norm in _traced_pairs(model))
    return [(conv_of[name], modules[conv_of[name]], name, norm) for name, norm in modules.items() if name in conv_of]


def _unpaired(model: nn.Module, pairs, wants) -> list[str]:
    """Names of the norms for which ``wants(norm)`` holds that no conv feeds (over maps: a
    ``TokenNorm``'s norm sees tokens, never a conv's output)."""
    paired = {id(norm) for *_, norm in pairs}
    paired.update(id(module.norm) for module in model.modules() if isinstance(module, norms.TokenNorm))
    return [name for name, module in model.named_modules() if wants(module) and id(module) not in paired]


def _unfed(model: nn.Module, names: list[str]) -> str:
    """ "<Layer> at <first name> (and N more) is fed by no conv ...", for a one-line message."""
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return (
        f"{type(model.get_submodule(names[0])).__name__} at {names[0]}{more} is fed by no conv (its input is a sum, "
        "a concatenation or another op's output: mabn.wiring.conv_norm_pairs)"
    )


def bind_convs(model: nn.Module) -> nn.Module:
    """Hand every norm that needs its conv (``bind_conv``: GN+WS, CBN) that conv; refuse, in one
    line, a model where one is fed by no conv."""
    pairs = conv_norm_pairs(model)
    for _, conv, _, norm in pairs:
        if hasattr(norm, "bind_conv"):
            norm.bind_conv(conv)
    unfed = _unpaired(model, pairs, lambda module: hasattr(module, "bind_conv"))
    if unfed:
        raise ValueError(f"{_unfed(model, unfed)}: it needs that conv; use another norm for this model")
    return model


def centralize_weights(model: nn.Module) -> nn.Module:
    """Centralize (as a parametrization, so gradients flow through it) the weight of every
    conv feeding a layer whose class asks for it (``centralize_conv = True``: MABN, which subtracts
    no mean). A layer that no conv feeds normalizes uncentralized, as ``centralize=False`` leaves
    every layer, with a warning that names it. Idempotent. State dicts of the plain model still load."""
    pairs = conv_norm_pairs(model)
    for _, conv, _, norm in pairs:
        if not getattr(norm, "centralize_conv", False) or is_centralized(conv):
            continue
        parametrize.register_parametrization(conv, "weight", Centralize())
        conv.register_load_state_dict_pre_hook(load_plain_weight)
    unfed = _unpaired(model, pairs, lambda module: getattr(module, "centralize_conv", False))
    if unfed:
        warnings.warn(f"{_unfed(model, unfed)}: it normalizes there uncentralized", stacklevel=2)
    for module in model.modules():
        if getattr(module, "centralize_conv", False):
            module.wired = True  # a layer no conv feeds (over tokens) needs nothing more
    return model


# ---- norm + activation layers: which ReLU each takes over ----


def _is_norm_act(module) -> bool:
    return isinstance(module, NORM_ACT_LAYERS)


class TorchvisionBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock whose first norm applies the activation itself."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + identity)


class TorchvisionBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck whose first two norms apply the activation themselves."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return self.relu(out + identity)


def _swap_class(new_class, *norm_paths):
    """A rule that gives the block ``new_class`` (same state) if its norms at ``norm_paths``
    all activate, and returns those norms."""

    def rule(block):
        taken = [block.get_submodule(path) for path in norm_paths]
        if not all(_is_norm_act(n) for n in taken):
            return []
        block.__class__ = new_class
        return taken

    return rule


def _identity_after(*pairs):
    """A rule that replaces the activation module after each (norm, activation) attribute pair."""

    def rule(block):
        taken = []
        for norm_name, act_name in pairs:
            norm = getattr(block, norm_name, None)
            if _is_norm_act(norm) and isinstance(getattr(block, act_name, None), (nn.ReLU, nn.Identity)):
                setattr(block, act_name, nn.Identity())
                taken.append(norm)
        return taken

    return rule


def _sequential(block):
    """conv-norm-ReLU runs of an ``nn.Sequential`` (torchvision's Conv2dNormActivation)."""
    children, taken = list(block.named_children()), []
    for (_, module), (name, after) in zip(children, children[1:]):
        if _is_norm_act(module) and isinstance(after, nn.ReLU):
            setattr(block, name, nn.Identity())
            taken.append(module)
    return taken


ACTIVATED_BLOCKS: dict[type, Callable[[nn.Module], list]] = {
    timm_resnet.ResNet: _identity_after(("bn1", "act1")),
    timm_resnet.BasicBlock: _identity_after(("bn1", "act1")),
    timm_resnet.Bottleneck: _identity_after(("bn1", "act1"), ("bn2", "act2")),
    tv_resnet.ResNet: _identity_after(("bn1", "relu")),
    IntermediateLayerGetter: _identity_after(("bn1", "relu")),  # a torchvision trunk inside an FPN backbone
    tv_resnet.BasicBlock: _swap_class(TorchvisionBasicBlock, "bn1"),
    tv_resnet.Bottleneck: _swap_class(TorchvisionBottleneck, "bn1", "bn2"),
}


def register_activated_block(block_type: type, rule: Callable[[nn.Module], list]) -> None:
    """Teach ``wire_norms`` a block type: ``rule(block)`` makes the block stop applying the ReLU
    after its norm + activation layers and returns those layers."""
    ACTIVATED_BLOCKS[block_type] = rule


def fuse_activations(model: nn.Module) -> nn.Module:
    """Let each norm + activation layer take the place of the ReLU after it (see the module
    docstring); idempotent."""
    taken, kept = set(), set()
    for module in list(model.modules()):
        rule = ACTIVATED_BLOCKS.get(type(module))
        if rule is None and isinstance(module, nn.Sequential):
            rule = _sequential
        if rule is not None:
            taken.update(id(layer) for layer in rule(module))
        else:
            new = [child for child in module.children() if _is_norm_act(child) and not getattr(child, "wired", False)]
            if new:
                kept.add(type(module).__name__)
                taken.update(id(child) for child in new)
    for module in model.modules():
        if _is_norm_act(module) and not getattr(module, "wired", False):
            if id(module) not in taken:
                drop_activation(module)
            module.wired = True
    if kept:
        warnings.warn(
            f"norm + activation layers in {sorted(kept)} keep their activation: check that these "
            "modules apply no other after them (or teach mabn.wiring.register_activated_block)",
            stacklevel=2,
        )
    return model


def wire_norms(model: nn.Module, centralize: bool = True, recompute_weights: bool = False) -> nn.Module:
    """Give every norm what it needs of the model around it: ``bind_convs``, then
    ``centralize_weights`` (``centralize=False``: the ablation that trains MABN without it),
    then ``fuse_activations``; every layer that needs wiring is then marked ``wired`` (until then
    it refuses to train). ``recompute_weights``: the convs whose weight is computed (MABN's
    centralized, GN+WS's standardized) recompute it in the backward instead of keeping it
    (``mabn.norms.reparametrized_conv``: BN's memory, at a time cost where weights outweigh activations).
    Call once a model is built with any norm (``convert_model`` and the suite's entry points do);
    idempotent. Returns the model."""
    bind_convs(model)
    if centralize:
        centralize_weights(model)
    fuse_activations(model)
    for module in model.modules():
        if isinstance(module, NeedsWiring):
            module.wired = True
        if recompute_weights:
            recompute_weight(module)
    return model
