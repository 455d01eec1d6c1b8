"""FLOPs of freezing states (the paper's Appendix A.1, Tables 1-2, A.1, A.2).

The paper counts per-sample forward cost with ptflops, which reports MACs; we report FLOPs = 2 x
ptflops MACs and cross-check against ``torch.utils.flop_counter.FlopCounterMode``. Both counters
miss attention out of the box on this stack (ptflops drops the qkv/proj linears of timm's
``Attention`` and never sees ``F.scaled_dot_product_attention``; FlopCounterMode has no formula
for the CPU flash-attention kernel), so this module adds the missing terms. ptflops also misses
timm layers that compute through functions (BEiT/EVA's ``F.linear`` qkv with a separate bias;
``StdConv2d``-like conv subclasses, since it maps exact types only) and counts broadcast
products wrongly (EVA's rotary embedding): those are counted or fixed here too. ptflops is
imported where it counts, so training never loads it; a missing or broken ptflops is one line
(:func:`ptflops`), which the training stages check before they train.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import io
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from freezecache.core.errors import FreezecacheError, first_line, optional
from freezecache.models import split

log = logging.getLogger(__name__)

# Backward costs about twice the forward (grad w.r.t. inputs + grad w.r.t. weights), so one
# training step of a layer that is trained costs ~3x its forward.
TRAIN_STEP_FACTOR = 3
STATES = ("full", "freeze", "discard")
# Attributes ptflops attaches to the model it counts and never removes.
_PTFLOPS_LEFTOVERS = (
    "start_flops_count",
    "stop_flops_count",
    "reset_flops_count",
    "compute_average_flops_cost",
    "__batch_counter__",
)


# What needs ptflops; no setting turns FLOP accounting off.
PTFLOPS_NEEDED_FOR = "the training stages and the plan count FLOPs with it (costs.json)"


# Packages ptflops imports, if it can, only to map one layer type of each (torchvision's
# DeformConv2d, timm's Attention): 2 s of every training stage's start-up on this CPU (torchvision
# pulls torch._dynamo and sympy). A model holds such a layer only if its package is imported
# already (building a timm model imports timm); :func:`_custom_hooks` maps both then.
PTFLOPS_PROBES = ("torchvision", "timm")


class _NotYetImported(importlib.abc.MetaPathFinder):
    """Refuses to import ``names`` (packages not imported yet), as if they were not installed."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname}: not imported while ptflops loads")
        return None


def ptflops(submodule: str = "ptflops"):
    """``ptflops`` (or one of its modules), or one line naming the package and what needs it.

    It loads without the packages of :data:`PTFLOPS_PROBES` that are not imported yet."""
    if submodule.partition(".")[0] in sys.modules:
        return importlib.import_module(submodule)
    blocked = {name for name in PTFLOPS_PROBES if name not in sys.modules}
    finder = _NotYetImported(blocked)
    sys.meta_path.insert(0, finder)
    try:
        return optional(submodule, "ptflops", why=PTFLOPS_NEEDED_FOR)
    finally:
        sys.meta_path.remove(finder)


def _sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """MACs of the attention core: Q K^T plus A V, for (..., heads, N, head_dim) inputs."""
    *lead, n_q, d_qk = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    batch_heads = 1
    for size in lead:
        batch_heads *= size
    return batch_heads * n_q * n_k * (d_qk + d_v)


class _MissedMacCounter(TorchFunctionMode):
    """Adds up the MACs of calls ptflops does not see, with ptflops' conventions.

    - every ``F.scaled_dot_product_attention`` (timm's fused attention);
    - ``F.linear`` and ``F.conv1d/2d/3d`` called outside a module ptflops counts: functional
      projections (BEiT's and EVA's qkv with a separate bias) and subclasses of ``nn.Conv2d``
      that run their own forward (timm's ``StdConv2d``, ``ScaledStdConv2d``, ``Conv2dSame``),
      which ptflops skips because it maps exact types only.

    ``inside`` counts the ptflops-counted modules currently running (see
    :func:`_track_counted_modules`), so calls from their own forward are not counted twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.inside = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            self.macs += _sdpa_macs(q.shape, k.shape, v.shape)
        elif self.inside == 0 and func is F.linear:
            self.macs += _functional_linear_macs(*args, **kwargs)
        elif self.inside == 0 and func in _CONVS:
            self.macs += _functional_conv_macs(out, *args, **kwargs)
        return out


_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _functional_linear_macs(input, weight, bias=None) -> int:  # noqa: A002 (torch's names)
    """MACs of ``F.linear``: every row times (in x out, plus the bias adds)."""
    rows = input.numel() // input.shape[-1]
    return rows * (weight.shape[0] * weight.shape[1] + (weight.shape[0] if bias is not None else 0))


def _functional_conv_macs(out: torch.Tensor, input, weight, bias=None, *args, **kwargs) -> int:  # noqa: A002
    """MACs of ``F.convNd``: each output element costs (in/groups) x kernel, plus a bias add."""
    per_output = weight[0].numel()  # (in_channels / groups) x kernel size
    return out.numel() * (per_output + (1 if bias is not None else 0))


def _broadcast_elementwise_flops(input, other, *args, **kwargs) -> int:  # noqa: A002
    """ptflops' hook for ``torch.mul``/``torch.add`` with torch's broadcasting (trailing axes
    aligned); ptflops aligns leading axes, which inflates e.g. EVA's rotary products 256x."""
    shapes = [t.shape for t in (input, other) if isinstance(t, torch.Tensor)]
    if not shapes:
        return 1
    return int(torch.Size(torch.broadcast_shapes(*shapes)).numel())


@contextlib.contextmanager
def _fixed_elementwise_hooks() -> Iterator[None]:
    """Swap ptflops' elementwise hooks for :func:`_broadcast_elementwise_flops` while counting.

    Same numbers where both shapes have the same rank (all the registered models), right ones
    where a lower-rank operand broadcasts.
    """
    ops = (torch.mul, torch.Tensor.mul, torch.add, torch.Tensor.add)
    ptflops_ops = ptflops("ptflops.pytorch_ops")

    saved = {op: ptflops_ops.TENSOR_OPS_MAPPING[op] for op in ops}
    ptflops_ops.TENSOR_OPS_MAPPING.update(dict.fromkeys(ops, _broadcast_elementwise_flops))
    try:
        yield
    finally:
        ptflops_ops.TENSOR_OPS_MAPPING.update(saved)


@contextlib.contextmanager
def _track_counted_modules(module: nn.Module, counter: _MissedMacCounter) -> Iterator[None]:
    """Keep ``counter.inside`` = the number of ptflops-counted modules running right now."""
    ptflops_ops = ptflops("ptflops.pytorch_ops")

    counted = (*ptflops_ops.MODULES_MAPPING, *_custom_hooks())

    def enter(*_: object) -> None:
        counter.inside += 1

    def leave(*_: object) -> None:
        counter.inside -= 1

    handles = []
    for m in module.modules():
        if type(m) in counted:
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _linear_macs(linear: nn.Linear, tokens: int) -> int:
    """MACs of a Linear over ``tokens`` rows, with ptflops' convention (bias adds count)."""
    bias = linear.out_features if linear.bias is not None else 0
    return tokens * (linear.in_features * linear.out_features + bias)


def _timm_attention_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """ptflops hook for timm ``Attention``: the MACs of all its linears (qkv, proj, ...).

    ptflops treats a mapped module as a leaf, so its built-in timm hook loses qkv/proj. The
    attention core is not added here: the fused path calls SDPA (``_SdpaMacCounter`` counts it)
    and the unfused path's ``q @ k`` / ``attn @ v`` go through ptflops' patched matmul.
    """
    batch, tokens, _ = inputs[0].shape  # (B, N, C)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    module.__flops__ += sum(_linear_macs(m, batch * tokens) for m in linears)


def _custom_hooks() -> dict:
    """Module hooks ptflops lacks or may not have mapped (:data:`PTFLOPS_PROBES`): timm's
    Attention and torchvision's DeformConv2d, each only when its package is imported already
    (a model holding one imported it; importing them costs every stage 2 s of start-up)."""
    hooks = {}
    if "timm" in sys.modules:
        try:
            from timm.layers import Attention as TimmAttention
        except Exception as err:  # noqa: BLE001 (broken by its torchvision)
            log.info("timm is not usable (%s): FLOPs are counted without its attention hook",
                     first_line(err))  # fmt: skip
        else:
            hooks[TimmAttention] = _timm_attention_hook
    if "torchvision" in sys.modules:
        try:
            from torchvision.ops import DeformConv2d
        except Exception:  # noqa: BLE001, S110 (no usable torchvision: no such layer either)
            pass
        else:
            ops = ptflops("ptflops.pytorch_ops")
            hooks[DeformConv2d] = ops.deformable_conv_flops_counter_hook
    return hooks


@contextlib.contextmanager
def _modes_restored(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (a frozen BN may be in eval)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def forward_macs_ptflops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Per-sample forward MACs of ``module`` by ptflops, with attention, functional linears
    and convs (outside the modules ptflops counts) and broadcast products counted in full.

    ``input_shape`` has no batch dim: ``(3, 32, 32)`` for images, ``(N, D)`` for tokens.
    ptflops switches the model to eval(); every submodule's mode is restored afterwards.
    Not thread-safe: ptflops patches torch functions globally while it counts.
    """
    missed = _MissedMacCounter()
    printed = io.StringIO()  # ptflops reports failures with print(); keep them for the log
    try:
        with (
            _modes_restored(module),
            contextlib.redirect_stdout(printed),
            _fixed_elementwise_hooks(),
            _track_counted_modules(module, missed),
            missed,
        ):
            macs, _ = ptflops().get_model_complexity_info(
                module,
                tuple(input_shape),
                as_strings=False,
                print_per_layer_stat=False,
                backend="pytorch",
                custom_modules_hooks=_custom_hooks(),
            )
    finally:
        for name in _PTFLOPS_LEFTOVERS:
            module.__dict__.pop(name, None)
    if macs is None:
        log.debug("ptflops output:\n%s", printed.getvalue())
        raise FreezecacheError(
            f"ptflops could not run {type(module).__name__} on input shape {tuple(input_shape)}"
            " — pass the per-sample shape without the batch dim"
        )
    return int(macs) + missed.macs


def _cpu_flash_sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """FlopCounterMode formula for the CPU flash-attention kernel, which torch leaves uncounted."""
    return 2 * _sdpa_macs(q_shape, k_shape, v_shape)


def _cpu_flash_sdpa_backward_flops(
    grad_out_shape, q_shape, k_shape, v_shape, *args, **kwargs
) -> int:
    """Backward of the CPU flash kernel: four matmuls (dQ, dK, dV, dP), twice the forward."""
    return 2 * _cpu_flash_sdpa_flops(q_shape, k_shape, v_shape)


def flop_counter():
    """A silent ``FlopCounterMode`` that also counts the CPU flash-attention kernels.

    Imported here, not with the module: torch's flop counter loads triton (~0.1 s of every
    stage process's start-up), and only the trade-offs stage and the benchmarks use it."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_sdpa_backward_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=custom)


def forward_flops_counter(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of ``module`` over ``example`` (give batch 1 for per-sample FLOPs).

    Counts matmuls, convolutions and attention only (FlopCounterMode ignores elementwise ops).
    Runs in eval mode like ptflops (train-mode BatchNorm rejects batch 1 at 1x1 spatial size);
    every submodule's mode is restored afterwards.
    """
    counter = flop_counter()
    with _modes_restored(module), torch.no_grad(), counter:
        module.eval()
        module(example)
    return int(counter.get_total_flops())


def _output_shape(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape of ``module`` for a per-sample input shape (eval, no grad)."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with _modes_restored(module), torch.no_grad():
        module.eval()
        out = module(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    return tuple(out.shape[1:])


def part_flops(model: nn.Module, position: int, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Per-sample forward FLOPs of the prefix, the suffix and the whole model at ``position``.

    FLOPs = 2 x ptflops MACs (the ``unit`` key says so). ``input_shape`` has no batch dim.
    """
    prefix, suffix = split(model, position)
    prefix_fwd = 2 * forward_macs_ptflops(prefix, input_shape)
    suffix_shape = _output_shape(prefix, input_shape)
    return {
        "unit": "FLOPs per sample, forward only, = 2 x ptflops MACs",
        "position": position,
        "suffix_input_shape": suffix_shape,
        "prefix_fwd": prefix_fwd,
        "suffix_fwd": 2 * forward_macs_ptflops(suffix, suffix_shape),
        "full_fwd": 2 * forward_macs_ptflops(model, input_shape),
    }


def _state_flops_per_sample(state: str, part: Mapping[str, Any]) -> int:
    """Training FLOPs per sample per epoch in one freezing state (see ``training_flops``)."""
    if state == "full":
        return TRAIN_STEP_FACTOR * part["full_fwd"]
    if state == "freeze":
        return part["prefix_fwd"] + TRAIN_STEP_FACTOR * part["suffix_fwd"]
    return TRAIN_STEP_FACTOR * part["suffix_fwd"]


def _part_for(parts: Mapping[int, Mapping[str, Any]], state: str, position: int) -> Mapping:
    """The ``part_flops`` entry a schedule row needs ("full" may use any: full_fwd is shared)."""
    if state not in STATES:
        raise FreezecacheError(
            f"unknown freezing state {state!r} in schedule — use one of {STATES}"
        )
    if position in parts:
        return parts[position]
    if state == "full" and parts:
        return next(iter(parts.values()))
    raise FreezecacheError(
        f"no part_flops for position {position} (state {state!r}) — add parts[{position}]"
    )


def training_flops(
    parts: Mapping[int, Mapping[str, Any]],
    *,
    schedule: list[tuple[str, int, int]],
    num_samples: int,
    extras: Mapping[str, float],
) -> dict[str, Any]:
    """Total training FLOPs of a freezing schedule (the paper's Appendix A.1 method).

    ``parts`` maps position -> ``part_flops(...)``. Per sample per epoch, with backward taken
    as 2x forward (so a trained part costs ``TRAIN_STEP_FACTOR`` = 3x its forward):
    full = 3 * full_fwd; freeze at p = prefix_fwd + 3 * suffix_fwd (the frozen prefix still
    runs forward, no backward); discard at p = 3 * suffix_fwd. ``extras`` are one-off FLOPs
    (cache build, flip-sensitivity ranking, ...) added as they are.
    """
    if num_samples < 0:
        raise FreezecacheError(f"num_samples is {num_samples} — use a count >= 0")
    per_state = []
    for state, position, epochs in schedule:
        if epochs < 0:
            raise FreezecacheError(
                f"schedule row {state!r}@{position} has {epochs} epochs — use >= 0"
            )
        per_sample = _state_flops_per_sample(state, _part_for(parts, state, position))
        per_state.append(
            {
                "state": state,
                "position": position,
                "epochs": epochs,
                "flops_per_sample": per_sample,
                "flops": per_sample * num_samples * epochs,
            }
        )
    overheads = dict(extras)
    total = sum(row["flops"] for row in per_state) + sum(overheads.values())
    return {"train_flops": total, "per_state": per_state, "overheads": overheads}
