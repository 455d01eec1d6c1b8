"""Any timm classifier whose trunk is a sequence of blocks, seen as a :class:`BlockModel`.

The view is derived from the model's own structure, not written per architecture:

- **blocks**: the trunk is ``stages`` or ``layers`` (hierarchical models: ConvNeXt, Swin,
  MaxViT, ...), a ``blocks`` list (ViT, EVA, BEiT; EfficientNet and MobileNet group theirs in
  one list per stage), or the stage modules that ``feature_info`` names (ResNet's
  ``layer1..4``, RegNet's ``s1..s4``). A stage's own ``blocks`` list holds its blocks; its other
  children (a downsample, a norm) go with the block they run next to.
- **stem / head**: one traced ``forward_features`` says which of the net's modules run before
  the first block, between blocks (stage transitions: they join the block that follows) and
  after the last one. The stem is timm's own ``forward_features`` stopped at the first block, so
  class/register tokens and position embeddings are timm's; the head runs the modules after the
  last block, then timm's ``forward_head``.
- **block arguments** other than the features (EVA's rotary embedding) must be constants of
  the input size; they are stored with the block.

A model that does not fit is refused with one line naming what is supported, and a built view
is checked once against the timm model's own forward.

Why it is long: the derivation above is one algorithm (find the trunk, trace where each module
runs, assign it, check the result); its steps share the traced order and the model's
structure, and split they would be read in four places for one question ("why did my model
become these blocks?").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from freezecache.core.errors import FreezecacheError, ModelOptionError
from freezecache.models import BlockModel, divisors, eval_mode, unsupported_option

log = logging.getLogger(__name__)

SUPPORTED = (
    "supported: timm models whose forward_features runs a stem, then blocks listed in "
    "`stages`, `layers`, `blocks` or feature_info's stages (each block taking and returning one "
    "tensor), then norms — e.g. resnet, regnet, convnext, efficientnet, mobilenetv3, vit/deit, "
    "eva, beit, swin, maxvit"
)
_CONTAINERS = (nn.Sequential, nn.ModuleList)
_STAGE_ATTRS = ("stages", "layers")
_HUB_OPTIONS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
_CONSTANT_TYPES = (type(None), bool, int, float, str)


class _Reached(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Raised at the first block to end the stem's run (BaseException: timm code that catches
    ``Exception`` to fall back must not swallow it)."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = x


def _brief(err: BaseException) -> str:
    """``Type: message`` of a timm/torch error on one line (their messages may span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _stop(_module: nn.Module, args: tuple) -> None:
    raise _Reached(args[0])


class TimmStem(nn.Module):
    """What ``net.forward_features`` does before its first block, run by timm's own code.

    Registers the net's stem modules and its own tensors (class token, position embedding, ...)
    so they count, move and freeze with the stem; the net itself is held unregistered (all of
    its modules are registered in the stem, the blocks or the head).
    """

    def __init__(self, net: nn.Module, modules: Iterable[tuple[str, nn.Module]], first: nn.Module):
        super().__init__()
        object.__setattr__(self, "_net", net)
        object.__setattr__(self, "_first", first)
        for name, module in modules:
            self.add_module(name, module)
        for name, param in net.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in net.named_buffers(recurse=False):
            persistent = name not in net._non_persistent_buffers_set
            self.register_buffer(name, buf, persistent=persistent)

    def forward(self, x: Tensor) -> Tensor:
        net = self._net
        net.training = self.training
        # Module.to() replaces buffers (parameters are updated in place): give the net ours.
        for name in net._buffers:
            net._buffers[name] = self._buffers[name]
        handle = self._first.register_forward_pre_hook(_stop)
        try:
            net.forward_features(x)
        except _Reached as reached:
            return reached.x
        finally:
            handle.remove()
        raise FreezecacheError(
            f"timm {type(net).__name__}.forward_features never reached its first block — "
            f"{SUPPORTED}"
        )


class TimmBlock(nn.Module):
    """One timm block, with the modules that run just before it (a stage's downsample) or just
    after it (a stage's final norm), and its constant call arguments."""

    def __init__(
        self,
        block: nn.Module,
        pre: list[nn.Module],
        post: list[nn.Module],
        constants: dict[str, object],
        tensors: dict[str, Tensor],
    ) -> None:
        super().__init__()
        self.pre = nn.ModuleList(pre)
        self.block = block
        self.post = nn.ModuleList(post)
        self._constants = constants
        self._tensor_args = list(tensors)
        for name, value in tensors.items():  # e.g. a rotary embedding: moves with the model
            self.register_buffer(f"arg_{name}", value.detach().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.pre:
            x = module(x)
        kwargs = {name: getattr(self, f"arg_{name}") for name in self._tensor_args}
        x = self.block(x, **self._constants, **kwargs)
        for module in self.post:
            x = module(x)
        return x


class TimmHead(nn.Module):
    """The modules ``forward_features`` runs after the last block, then ``net.forward_head``."""

    def __init__(
        self,
        net: nn.Module,
        post: list[tuple[str, nn.Module]],
        rest: list[tuple[str, nn.Module]],
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_net", net)
        for name, module in [*post, *rest]:
            self.add_module(name, module)
        self._post = [name for name, _ in post]

    def forward(self, x: Tensor) -> Tensor:
        self._net.training = self.training
        for name in self._post:
            x = self._modules[name](x)
        return self._net.forward_head(x)


@dataclasses.dataclass
class _Stage:
    name: str
    module: nn.Module
    blocks: list[tuple[str, nn.Module]]
    others: list[tuple[str, nn.Module]]  # non-block children: downsample, norm, ...


@dataclasses.dataclass
class _Call:
    name: str
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class _Unit:
    name: str
    block: nn.Module
    stage: int
    pre: list[str] = dataclasses.field(default_factory=list)
    post: list[str] = dataclasses.field(default_factory=list)
    call: _Call | None = None


def _stage(name: str, module: nn.Module) -> _Stage:
    """A stage's blocks: its ``blocks`` list if it has one, else all its children."""
    inner = getattr(module, "blocks", None)
    if isinstance(inner, _CONTAINERS) and inner is not module:
        blocks = [(f"{name}.blocks.{k}", m) for k, m in inner.named_children()]
        others = [(f"{name}.{k}", m) for k, m in module.named_children() if m is not inner]
    else:
        blocks, others = [(f"{name}.{k}", m) for k, m in module.named_children()], []
    return _Stage(name, module, blocks, others)


def _holds_blocks(module: nn.Module) -> bool:
    """A stage container: a Sequential, or children all of one type (RegNet's RegStage)."""
    children = list(module.children())
    one_type = len({type(c) for c in children}) == 1
    return isinstance(module, nn.Sequential) or (one_type and any(c._modules for c in children))


def _find_stages(net: nn.Module) -> tuple[list[_Stage], set[str]]:
    """The trunk's stages and the names of the net's children that hold them."""
    for attr in _STAGE_ATTRS:
        seq = getattr(net, attr, None)
        if isinstance(seq, _CONTAINERS) and len(seq) > 0:
            return [_stage(f"{attr}.{k}", s) for k, s in seq.named_children()], {attr}
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, _CONTAINERS) and len(blocks) > 0:
        if all(isinstance(b, nn.Sequential) for b in blocks):  # EfficientNet, MobileNet
            return [_stage(f"blocks.{k}", s) for k, s in blocks.named_children()], {"blocks"}
        return [_stage("blocks", blocks)], {"blocks"}
    children = dict(net.named_children())
    names = [info["module"] for info in getattr(net, "feature_info", [])]
    found = [n for n in names if n in children and _holds_blocks(children[n])]
    if not found:
        raise FreezecacheError(
            f"timm {type(net).__name__} has no stages, layers or blocks to cut — {SUPPORTED}"
        )
    return [_stage(n, children[n]) for n in found], set(found)


def _trace(net: nn.Module, modules: dict[str, nn.Module], x: Tensor) -> list[_Call]:
    """The calls of ``modules`` (with their arguments) in one ``net.forward_features(x)``."""
    calls: list[_Call] = []

    def record(name: str, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(_Call(name, args, kwargs))

    handles = [
        m.register_forward_pre_hook(functools.partial(record, name), with_kwargs=True)
        for name, m in modules.items()
    ]
    try:
        net.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _assign(
    calls: list[_Call], stages: list[_Stage], owner: dict[str, int | None], model_name: str
) -> tuple[list[str], list[_Unit], list[str]]:
    """(stem modules, blocks with what joins them, modules after the last block), by call order.

    Before the first block: the net's own modules are the stem. A stage's children before its
    first block, and anything between blocks, join the next block; a stage's children after
    its last block join that block.
    """
    units = [_Unit(n, m, k) for k, st in enumerate(stages) for n, m in st.blocks]
    index = {u.name: i for i, u in enumerate(units)}
    stage_end = {u.stage: u for u in units}  # the last block of each stage
    repeated = [n for n, c in Counter(c.name for c in calls).items() if c > 1]
    order = [index[c.name] for c in calls if c.name in index]
    if repeated or order != list(range(len(units))):
        what = f"{repeated[:3]} run more than once" if repeated else "its blocks run out of order"
        raise FreezecacheError(f"timm model {model_name}: {what} — {SUPPORTED}")
    stem: list[str] = []
    pending: list[str] = []
    last: _Unit | None = None
    for call in calls:
        if call.name in index:
            last = units[index[call.name]]
            last.pre, last.call, pending = pending, call, []
        elif last is None and not pending and owner[call.name] is None:
            stem.append(call.name)
        elif (
            last is not None
            and not pending
            and stage_end[last.stage] is last
            and (owner[call.name] == last.stage)
        ):
            last.post.append(call.name)
        else:
            pending.append(call.name)
    return stem, units, pending


def _block_arguments(unit: _Unit, again: _Call | None, model_name: str) -> tuple[dict, dict]:
    """(constants, tensors) a block is called with besides its features, checked constant."""
    call = unit.call
    assert call is not None
    if not call.args or not isinstance(call.args[0], Tensor) or len(call.args) > 1:
        raise FreezecacheError(
            f"timm model {model_name}: block {unit.name} is not called with one tensor — "
            f"{SUPPORTED}"
        )
    constants, tensors = {}, {}
    for key, value in call.kwargs.items():
        if isinstance(value, _CONSTANT_TYPES):
            constants[key] = value
            continue
        varies = again is None or not torch.equal(value, again.kwargs.get(key))
        if not isinstance(value, Tensor) or value.requires_grad or varies:
            raise FreezecacheError(
                f"timm model {model_name}: block {unit.name} takes {key}= computed from the "
                f"input or from weights, which a cached feature cannot carry — {SUPPORTED}"
            )
        tensors[key] = value
    return constants, tensors


def _random_input(in_chans: int, img_size: int, seed: int, batch: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, img_size, img_size, generator=g)


def _traced(net: nn.Module, modules: dict[str, nn.Module], x: Tensor, model_name: str) -> list:
    """:func:`_trace` in eval mode with grad on (so tensors derived from weights show it)."""
    try:
        with eval_mode(net), torch.enable_grad():
            return _trace(net, modules, x)
    except FreezecacheError:
        raise
    except Exception as err:  # timm raises many types for an input it cannot take
        raise FreezecacheError(
            f"timm model {model_name} cannot run a {tuple(x.shape[1:])} input "
            f"({_brief(err)}) — change img_size or the model options "
            "(e.g. patch_size, window_size)"
        ) from None


class TimmBlockModel(BlockModel):
    """A timm classifier cut into :class:`TimmStem`, :class:`TimmBlock` s and :class:`TimmHead`.

    ``timm_net`` stays the timm model (unregistered; each of its modules is registered once
    here), so checkpoints with timm's key names are renamed onto this view by tensor identity.
    """

    def __init__(self, net: nn.Module, *, name: str, in_chans: int, img_size: int) -> None:
        stages, trunk = _find_stages(net)
        _check_holds_no_tensors([st.module for st in stages], name)
        owner: dict[str, int | None] = {k: None for k, _ in net.named_children() if k not in trunk}
        owner |= {n: i for i, st in enumerate(stages) for n, _ in st.others}
        watched = {n: net.get_submodule(n) for n in owner}
        watched |= {n: m for st in stages for n, m in st.blocks}
        calls = _traced(net, watched, _random_input(in_chans, img_size, seed=0), name)
        stem, units, after = _assign(calls, stages, owner, name)
        blocks = _blocks(net, watched, units, in_chans, img_size, name)
        used = {*stem, *after, *(n for u in units for n in (*u.pre, *u.post))}
        rest = [(k, m) for k, m in net.named_children() if k not in trunk and k not in used]
        first = blocks[0].pre[0] if len(blocks[0].pre) else blocks[0].block
        super().__init__(
            TimmStem(net, [(n, watched[n]) for n in stem], first),
            blocks,
            TimmHead(net, [(n.replace(".", "_"), watched[n]) for n in after], rest),
            layout="nchw",  # set from the features below
            in_chans=in_chans,
            img_size=img_size,
            num_classes=net.num_classes,
        )
        object.__setattr__(self, "timm_net", net)
        self.block_names = [u.name for u in units]
        self.block_joins = [[*u.pre, *u.post] for u in units]
        self._from_timm = _key_map(net, self, name)
        self.layout = _layout(net, _check_same_forward(self, net, name), name)
        if self.layout == "tokens":
            self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0))
        self._classifier = _module_paths(net, self, _cfg_names(net, "classifier"))
        self._first_convs = [
            self._from_timm[f"{n}.weight"]
            for n in _cfg_names(net, "first_conv")
            if f"{n}.weight" in self._from_timm
        ]

    def is_classifier_key(self, key: str) -> bool:
        """Keys of timm's classifier (``pretrained_cfg['classifier']``), as named in this view."""
        return any(key.startswith(path + ".") for path in self._classifier)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename timm-named checkpoints onto this view (after timm's own checkpoint filter:
        position-embedding and patch resampling, format conversions) and fit the first conv to
        ``in_chans`` as timm does (``adapt_input_conv``: a 1-channel input sums RGB filters)."""
        own = self.state_dict()
        timm_named = sum(k in self._from_timm for k in state_dict)
        if timm_named > sum(k in own for k in state_dict):
            state_dict = _timm_filtered(self.timm_net, state_dict, self.name)
            state_dict = {self._from_timm.get(k, k): v for k, v in state_dict.items()}
        return _fit_input_convs(state_dict, own, self._first_convs)


def _blocks(
    net: nn.Module,
    watched: dict[str, nn.Module],
    units: list[_Unit],
    in_chans: int,
    img_size: int,
    name: str,
) -> list[TimmBlock]:
    """The :class:`TimmBlock` of each unit; a second trace checks tensor arguments constant."""
    again: dict[str, _Call] = {}
    if any(isinstance(v, Tensor) for u in units for v in u.call.kwargs.values()):
        second = _traced(net, watched, _random_input(in_chans, img_size, seed=1), name)
        again = {c.name: c for c in second}
    blocks = []
    for unit in units:
        constants, tensors = _block_arguments(unit, again.get(unit.name), name)
        pre, post = [watched[n] for n in unit.pre], [watched[n] for n in unit.post]
        blocks.append(TimmBlock(unit.block, pre, post, constants, tensors))
    return blocks


def _check_holds_no_tensors(modules: list[nn.Module], name: str) -> None:
    """Stage containers are not registered in the view, so they must own no tensors."""
    for module in modules:
        own = [*module._parameters, *module._buffers]
        if own:
            raise FreezecacheError(
                f"timm model {name}: a stage holds its own tensors {own[:3]} — {SUPPORTED}"
            )


def _key_map(net: nn.Module, model: nn.Module, name: str) -> dict[str, str]:
    """timm state-dict key -> this view's key, matched by tensor identity."""
    ours = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    theirs = net.state_dict(keep_vars=True)
    lost = [k for k, t in theirs.items() if id(t) not in ours]
    if lost or len(ours) != len(theirs):
        raise FreezecacheError(
            f"timm model {name}: tensors {lost[:3]} fall outside the block view — {SUPPORTED}"
        )
    return {k: ours[id(t)] for k, t in theirs.items()}


def _layout(net: nn.Module, shapes: list[tuple[int, ...]], name: str) -> str:
    """``tokens`` for (N, D) features, else ``nhwc`` where timm says so, else ``nchw``."""
    ranks = {len(shape) for shape in shapes}
    if ranks == {2}:
        return "tokens"
    if ranks == {3}:
        return "nhwc" if getattr(net, "output_fmt", "NCHW") == "NHWC" else "nchw"
    raise FreezecacheError(
        f"timm model {name}: features change rank between blocks ({sorted(ranks)}) — one layout "
        f"(NCHW, NHWC or tokens) is needed; {SUPPORTED}"
    )


def _cfg_names(net: nn.Module, key: str) -> list[str]:
    """Module names timm's pretrained config lists under ``key`` (first_conv, classifier)."""
    value = getattr(net, "pretrained_cfg", {}).get(key) or ()
    return [value] if isinstance(value, str) else list(value)


def _module_paths(net: nn.Module, model: nn.Module, names: list[str]) -> list[str]:
    """Where the net's modules ``names`` sit in the view (missing ones are skipped)."""
    paths = {id(m): path for path, m in model.named_modules()}
    found = []
    for name in names:
        try:
            found.append(paths[id(net.get_submodule(name))])
        except (AttributeError, KeyError):
            continue
    return found


def _check_same_forward(model: BlockModel, net: nn.Module, name: str) -> list[tuple[int, ...]]:
    """The view must compute what the timm model computes (eval mode, two random images).

    Returns the per-sample shapes of the stem's and each block's output on the way.
    """
    shapes: list[tuple[int, ...]] = []

    def record(_module: nn.Module, _args: tuple, out: object) -> None:
        shapes.append(tuple(out.shape[1:]) if isinstance(out, Tensor) else ())

    x = _random_input(model.in_chans, model.img_size, seed=3, batch=2)
    handles = [m.register_forward_hook(record) for m in (model.stem, *model.blocks)]
    try:
        with torch.no_grad(), eval_mode(net), eval_mode(model):
            expected, got = net(x), model(x)
    finally:
        for handle in handles:
            handle.remove()
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise FreezecacheError(
            f"timm model {name}: the block view does not reproduce the model's forward — "
            f"{SUPPORTED}"
        )
    return shapes


def _timm_filtered(net: nn.Module, state_dict: dict[str, Tensor], name: str) -> dict:
    """timm's own ``checkpoint_filter_fn`` for the net's module, where it has one."""
    module = sys.modules.get(type(net).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, net)
    except Exception as err:  # the filters assume formats and raise many types
        raise FreezecacheError(
            f"timm could not convert the checkpoint for model {name} ({_brief(err)}) — "
            "save it from the same architecture"
        ) from None


def _fit_input_convs(
    state_dict: dict[str, Tensor], own: dict[str, Tensor], keys: list[str]
) -> dict[str, Tensor]:
    """Adapt first-conv weights with another input-channel count (timm's adapt_input_conv)."""
    from timm.models import adapt_input_conv

    out = dict(state_dict)
    for key in keys:
        weight, mine = out.get(key), own.get(key)
        if weight is None or mine is None or weight.ndim != 4 or weight.shape == mine.shape:
            continue
        if weight.shape[0] == mine.shape[0] and weight.shape[2:] == mine.shape[2:]:
            log.info(
                "adapting checkpoint %s from %d to %d input channels",
                key,
                weight.shape[1],
                mine.shape[1],
            )
            out[key] = adapt_input_conv(mine.shape[1], weight)
    return out


def build_timm_net(
    name: str, *, num_classes: int, in_chans: int, img_size: int, **kwargs: object
) -> nn.Module:
    """``timm.create_model(name)`` with random weights (never a download); ``img_size`` is
    passed where the architecture takes it (ViTs, Swin), and left out for CNNs."""
    import timm

    hub = sorted(k for k in kwargs if k in _HUB_OPTIONS)
    if hub:
        raise ModelOptionError(
            f"kwargs.{hub[0]}",
            f"model {name}: options {hub} would load weights from the hub — drop them and set "
            "model.checkpoint to a local file",
        )
    args = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans, **kwargs}
    try:
        try:
            net = timm.create_model(name, img_size=img_size, **args)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            net = timm.create_model(name, **args)  # a CNN: no img_size option
    except TypeError as err:  # timm's way of rejecting an unknown option
        raise unsupported_option(name, err, kwargs) from None
    except Exception as err:  # timm asserts and raises many types on bad option values
        raise ModelOptionError(
            "kwargs",
            f"model {name}: timm cannot build it with {kwargs} ({_brief(err)}) — "
            "change the model options",
        ) from None
    _check_patches(net, name)
    return net


def _check_patches(net: nn.Module, name: str) -> None:
    """Refuse patches that do not tile the image: timm's patch embedding builds anyway and
    drops the last pixels of every row and column without a word."""
    from timm.layers import PatchEmbed

    for path, m in net.named_modules():
        if not isinstance(m, PatchEmbed) or m.img_size is None or m.dynamic_img_pad:
            continue
        size, patch = m.img_size[0], m.patch_size[0]
        if size % patch or m.img_size[1] % m.patch_size[1]:
            raise ModelOptionError(
                "kwargs.patch_size",
                f"model {name}: patch size {patch} does not divide the {size}-pixel input of "
                f"{path} (timm would drop the last {size % patch} pixels of each row and "
                f"column) — use a patch_size that divides it: {divisors(size)}",
            )


def timm_model(
    name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs: object
) -> TimmBlockModel:
    """Any timm model ``name`` as a block view; ``kwargs`` go to ``timm.create_model``."""
    net = build_timm_net(
        name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
    )
    return TimmBlockModel(net, name=name, in_chans=in_chans, img_size=img_size)
