"""FLOPs and memory accounting: hand counts, counter cross-checks, schedule arithmetic."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from ptflops import get_model_complexity_info
from timm.layers import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from freezecache.accounting.flops import (
    forward_flops_counter,
    forward_macs_ptflops,
    part_flops,
    training_flops,
)
from freezecache.accounting.memory import MIB, accounted_memory, average_and_min_memory
from freezecache.core.errors import FreezecacheError
from freezecache.core.runtime import CudaPeak
from freezecache.models import create_model, feature_shape, split

F32 = 4  # bytes per float32
IMG = (3, 32, 32)
REGISTRY = {  # name -> create_model kwargs: the models the paper's tables cover, at 32x32
    "resnet20": {},
    "resnet32": {},
    "resnet50": {},
    "deit_tiny": {"patch_size": 4},
}


@functools.cache
def _registry_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_chans=3, img_size=32, **REGISTRY[name])


@functools.cache
def _fixed_counts(name: str) -> tuple[int, int]:
    """(ptflops MACs, FlopCounterMode FLOPs) per sample, both with the attention fix."""
    model = _registry_model(name)
    return forward_macs_ptflops(model, IMG), forward_flops_counter(model, torch.randn(1, *IMG))


def _tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def _tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# --- memory ----------------------------------------------------------------------------------


def test_accounted_memory_matches_hand_count_for_tiny_mlp() -> None:
    mem = accounted_memory(_tiny_mlp(), torch.randn(3, 8))
    params = (8 * 4 + 4 + 4 * 2 + 2) * F32  # 184
    # Autograd saves x for Linear1's weight grad (the input batch: counted once, as input_batch),
    # ReLU's output (3x4), which Linear2 also saves (same storage: once), and W2^T, which is a
    # parameter. W1^T is not saved because x needs no grad.
    assert mem["params"] == params
    assert mem["grads"] == params
    assert mem["optimizer_state"] == params  # one momentum buffer per parameter
    assert mem["saved_activations"] == 3 * 4 * F32
    assert mem["input_batch"] == 3 * 8 * F32
    assert mem["frozen_forward_peak"] == 0
    assert mem["total"] == 3 * params + 3 * 4 * F32 + 3 * 8 * F32
    assert mem["total_mb"] == pytest.approx(mem["total"] / MIB)


def test_accounted_memory_counts_loss_and_optimizer_choice() -> None:
    target = torch.tensor([0, 1, 1])
    loss_fn = functools.partial(F.cross_entropy, target=target)
    mem = accounted_memory(_tiny_mlp(), torch.randn(3, 8), optimizer="adam", loss_fn=loss_fn)
    # cross_entropy adds its log-probs (3x2 float32), the int64 target (3) and nll_loss's scalar
    # total weight.
    assert mem["saved_activations"] == 3 * 4 * F32 + 3 * 2 * F32 + 3 * 8 + F32
    assert mem["optimizer_state"] == 2 * mem["grads"]  # Adam: two moments


def test_frozen_prefix_is_excluded_from_grads_and_optimizer() -> None:
    frozen = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).requires_grad_(False)
    trainable = nn.Linear(4, 2)
    mem = accounted_memory(trainable, torch.randn(3, 8), frozen=frozen)
    assert mem["params"] == (8 * 4 + 4 + 4 * 2 + 2) * F32  # frozen weights still run
    assert mem["grads"] == (4 * 2 + 2) * F32
    assert mem["optimizer_state"] == (4 * 2 + 2) * F32
    assert mem["saved_activations"] == 3 * 4 * F32  # the frozen output, kept for W's grad
    assert mem["frozen_forward_peak"] == 3 * 4 * F32  # largest no-grad intermediate


def test_frozen_prefix_counts_no_grads_even_if_it_requires_grad() -> None:
    shared = _tiny_mlp()
    mem = accounted_memory(shared[2], torch.randn(3, 8), frozen=shared[:2])
    assert mem["grads"] == (4 * 2 + 2) * F32


def test_accounted_memory_leaves_batchnorm_stats_alone() -> None:
    model = _tiny_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accounted_memory(model, torch.randn(4, *IMG) + 3.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_discarded_prefix_leaves_only_suffix_params() -> None:
    model = _registry_model("resnet20")
    prefix, suffix = split(model, 3)
    cached = torch.randn(4, *feature_shape(model, 3))
    kept = accounted_memory(suffix, cached)
    frozen = accounted_memory(suffix, torch.randn(4, *IMG), frozen=prefix)
    suffix_bytes = sum(p.numel() for p in suffix.parameters()) * F32
    assert kept["params"] == kept["grads"] == suffix_bytes
    assert frozen["grads"] == suffix_bytes
    assert frozen["params"] == sum(p.numel() for p in model.parameters()) * F32
    assert frozen["frozen_forward_peak"] > 0 and kept["frozen_forward_peak"] == 0


class _Blocks(nn.Module):
    """Four Linear+ReLU blocks; the middle two optionally under one activation checkpoint."""

    def __init__(self, use_checkpoint: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4))
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        middle = nn.Sequential(self.blocks[1], self.blocks[2])
        x = checkpoint(middle, x, use_reentrant=False) if self.use_checkpoint else middle(x)
        return self.blocks[3](x)


def test_checkpointing_lowers_saved_activations() -> None:
    x = torch.randn(5, 16)
    plain = accounted_memory(_Blocks(use_checkpoint=False), x)["saved_activations"]
    ckpt = accounted_memory(_Blocks(use_checkpoint=True), x)["saved_activations"]
    # Plain: all four ReLU outputs (5x16 each; each also feeds the next Linear). Checkpointed:
    # the region's input and output stay saved (blocks 0 and 3 need them), only the ReLU output
    # between the two checkpointed blocks is recomputed in backward instead of kept.
    assert plain == 4 * 5 * 16 * F32
    assert plain - ckpt == 5 * 16 * F32


def test_block_model_grad_checkpointing_lowers_saved_activations() -> None:
    model = create_model("resnet20", num_classes=10)
    x = torch.randn(2, *IMG)
    plain = accounted_memory(model, x)["saved_activations"]
    model.set_grad_checkpointing(True, every=3)
    assert accounted_memory(model, x)["saved_activations"] < 0.5 * plain


def test_accounted_memory_rejects_unknown_optimizer() -> None:
    with pytest.raises(FreezecacheError, match="lion"):
        accounted_memory(_tiny_mlp(), torch.randn(3, 8), optimizer="lion")


def test_average_and_min_memory() -> None:
    average, minimum = average_and_min_memory([(100.0, 30), (60.0, 30), (40.0, 40)])
    assert average == pytest.approx((100 * 30 + 60 * 30 + 40 * 40) / 100)
    assert minimum == 40.0
    with pytest.raises(FreezecacheError):
        average_and_min_memory([])
    with pytest.raises(FreezecacheError):
        average_and_min_memory([(10.0, 0)])


def test_cuda_peak_is_none_without_cuda() -> None:
    with CudaPeak("cpu") as peak:
        torch.ones(1000)
    assert peak.peak_bytes is None and peak.peak_mb is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_resets_between_blocks() -> None:
    big = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
    del big  # the allocator's peak now includes 64 MiB
    with CudaPeak("cuda") as peak:
        small = torch.empty(MIB, dtype=torch.uint8, device="cuda")
    assert MIB <= peak.peak_bytes < 32 * MIB
    del small


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accounted_memory_same_on_cuda() -> None:
    model, x = _tiny_mlp(), torch.randn(3, 8)
    cpu = accounted_memory(model, x)
    assert accounted_memory(model.cuda(), x.cuda()) == cpu


# --- FLOPs -----------------------------------------------------------------------------------


def test_ptflops_restores_each_submodule_mode_and_cleans_up() -> None:
    model = _tiny_cnn().train()
    model[1].eval()  # e.g. a frozen BatchNorm
    forward_macs_ptflops(model, IMG)
    assert model.training and not model[1].training and model[4].training
    assert not hasattr(model, "start_flops_count")


def test_ptflops_bad_shape_is_a_user_error() -> None:
    with pytest.raises(FreezecacheError, match="input shape"):
        forward_macs_ptflops(_tiny_cnn(), (1, 3, 32, 32))


def test_counters_match_exactly_on_convs_and_matmuls() -> None:
    # Without bias, BN or activations both counters see the same multiply-adds; the registry
    # tests below allow 5% for the elementwise ops only ptflops counts.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 32 * 32, 10, bias=False),
    )
    macs = forward_macs_ptflops(model, IMG)
    assert macs == 3 * 9 * 8 * 32 * 32 + 8 * 32 * 32 * 10
    assert forward_flops_counter(model, torch.randn(1, *IMG)) == 2 * macs


def _attention_macs(tokens: int, dim: int, heads: int) -> int:
    qkv = tokens * (dim * 3 * dim + 3 * dim)  # ptflops counts bias adds as MACs
    proj = tokens * (dim * dim + dim)
    core = 2 * heads * tokens**2 * (dim // heads)  # Q K^T and A V
    return qkv + proj + core


@pytest.mark.parametrize("fused", [True, False])
def test_ptflops_counts_timm_attention_in_full(fused: bool) -> None:
    attn = Attention(dim=32, num_heads=4, qkv_bias=True)
    attn.fused_attn = fused
    macs = forward_macs_ptflops(attn, (10, 32))
    scale = 0 if fused else 10 * 32  # the unfused path multiplies q by the scale
    assert macs == _attention_macs(10, 32, 4) + scale


def test_flop_counter_counts_attention_on_cpu() -> None:
    attn = Attention(dim=32, num_heads=4, qkv_bias=True)
    linears = 2 * 10 * (32 * 3 * 32 + 32 * 32)  # FlopCounterMode ignores bias adds
    core = 2 * 2 * 4 * 10**2 * 8
    assert forward_flops_counter(attn, torch.randn(1, 10, 32)) == linears + core


def test_vit_counters_disagree_without_attention_fix() -> None:
    model = _registry_model("deit_tiny")  # no BatchNorm: train mode runs batch 1 as is
    x = torch.randn(1, *IMG)
    raw_macs, _ = get_model_complexity_info(
        model, IMG, as_strings=False, print_per_layer_stat=False, backend="pytorch"
    )
    with FlopCounterMode(display=False) as raw_counter, torch.no_grad():
        model(x)
    fixed_macs, fixed_flops = _fixed_counts("deit_tiny")
    # ptflops alone loses every block's qkv/proj; FlopCounterMode alone loses CPU attention.
    assert 2 * raw_macs < 0.8 * fixed_flops
    assert raw_counter.get_total_flops() < 0.98 * fixed_flops
    assert fixed_flops == pytest.approx(2 * fixed_macs, rel=0.05)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_counters_agree_on_registered_models(name: str) -> None:
    macs, flops = _fixed_counts(name)
    assert flops == pytest.approx(2 * macs, rel=0.05)


@pytest.mark.parametrize("name", ["resnet20", "deit_tiny"])
def test_part_flops_prefix_plus_suffix_is_full(name: str) -> None:
    model = _registry_model(name)
    position = model.num_blocks // 2
    parts = part_flops(model, position, IMG)
    assert parts["prefix_fwd"] + parts["suffix_fwd"] == parts["full_fwd"]
    assert parts["full_fwd"] == 2 * _fixed_counts(name)[0]
    assert parts["suffix_input_shape"] == feature_shape(model, position)
    assert 0 < parts["prefix_fwd"] < parts["full_fwd"]


def test_resnet32_forward_matches_known_size() -> None:
    # NOTES.md: ptflops gives ResNet32 (CIFAR) about 70 MMac at 32x32.
    macs = forward_macs_ptflops(create_model("resnet32", num_classes=10), IMG)
    assert macs == pytest.approx(70e6, rel=0.03)


def test_training_flops_hand_example() -> None:
    parts = {
        5: {"prefix_fwd": 40, "suffix_fwd": 60, "full_fwd": 100},
        8: {"prefix_fwd": 70, "suffix_fwd": 30, "full_fwd": 100},
    }
    result = training_flops(
        parts,
        schedule=[("full", 0, 2), ("freeze", 5, 1), ("discard", 8, 3)],
        num_samples=10,
        extras={"cache_build": 700, "rank": 50},
    )
    per_sample = [3 * 100, 40 + 3 * 60, 3 * 30]
    assert [row["flops_per_sample"] for row in result["per_state"]] == per_sample
    assert [row["flops"] for row in result["per_state"]] == [300 * 10 * 2, 220 * 10, 90 * 10 * 3]
    assert result["overheads"] == {"cache_build": 700, "rank": 50}
    assert result["train_flops"] == 6000 + 2200 + 2700 + 750


def test_training_flops_rejects_bad_schedule() -> None:
    parts = {5: {"prefix_fwd": 1, "suffix_fwd": 1, "full_fwd": 2}}
    with pytest.raises(FreezecacheError, match="melt"):
        training_flops(parts, schedule=[("melt", 5, 1)], num_samples=1, extras={})
    with pytest.raises(FreezecacheError, match="position 7"):
        training_flops(parts, schedule=[("discard", 7, 1)], num_samples=1, extras={})
    with pytest.raises(FreezecacheError, match="epochs"):
        training_flops(parts, schedule=[("freeze", 5, -1)], num_samples=1, extras={})


# --- what ptflops misses in timm layers -------------------------------------------------------


class _FunctionalQkv(nn.Module):
    """A projection called through F.linear with its own bias, as BEiT and EVA do for qkv."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.bias = nn.Parameter(torch.zeros(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv.weight, self.bias)


def test_functional_linear_outside_a_counted_module_is_counted_once() -> None:
    macs = forward_macs_ptflops(_FunctionalQkv(), (5, 8))
    assert macs == 5 * (8 * 24 + 24)
    plain = forward_macs_ptflops(nn.Linear(8, 24), (5, 8))  # nn.Linear's own F.linear: once
    assert plain == 5 * (8 * 24 + 24)


def test_conv_subclasses_with_their_own_forward_are_counted() -> None:
    from timm.layers import Conv2dSame, StdConv2d

    for conv in (StdConv2d(3, 8, 3, padding=1, bias=True), Conv2dSame(3, 8, 3)):
        model = nn.Sequential(conv)
        macs = forward_macs_ptflops(model, IMG)
        assert macs == 32 * 32 * 8 * (3 * 9 + 1)  # + the bias add, ptflops' convention
        assert forward_flops_counter(model, torch.randn(1, *IMG)) == 2 * 32 * 32 * 8 * 3 * 9


class _Broadcast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, torch.ones(6))  # (1, 2, 3, 6) * (6,)


def test_broadcast_elementwise_ops_count_the_output_elements() -> None:
    # ptflops alone aligns leading axes: (1, 2, 3, 6) x (6,) -> 6 * 2 * 3 * 6 = 216.
    assert forward_macs_ptflops(_Broadcast(), (2, 3, 6)) == 2 * 3 * 6


# A training stage's process: ptflops loaded before any model is built, then what it maps.
_LOADS = """
import sys
{first}
from freezecache.accounting.flops import _custom_hooks, ptflops
ptflops()
print("torchvision" in sys.modules, "timm" in sys.modules, len(_custom_hooks()))
"""


@pytest.mark.parametrize(
    "first,expected",
    [("", "False False 0"), ("import timm", "True True 2")],  # timm imports torchvision
)
def test_ptflops_loads_torchvision_and_timm_only_when_a_model_did(first, expected) -> None:
    """ptflops imports both, if it can, to map one layer of each: 2 s of every training
    stage's start-up. A model holding such a layer imported its package already, and then
    both layers get their hooks."""
    import subprocess
    import sys

    code = _LOADS.format(first=first)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-3:] == expected.split()
