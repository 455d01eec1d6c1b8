"""Any timm model through the generic block view, checked per family at tiny sizes.

Like timm's own tests over its registry: each family builds from its real timm name with small
options, cuts into prefix/suffix at several positions, counts FLOPs like FlopCounterMode,
loads timm state dicts, augments its features by layout, and trains a suffix from a
quantised cache of its prefix features.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import augment_once
from freezecache.accounting.flops import forward_flops_counter, forward_macs_ptflops, part_flops
from freezecache.codecs.registry import make_codec
from freezecache.core.errors import FreezecacheError
from freezecache.models import (
    BlockModel,
    create_model,
    describe_blocks,
    feature_shape,
    load_checkpoint,
    split,
)
from freezecache.training import augment, rank
from freezecache.training.train import RunState

IMG = 32
# family -> (timm name, tiny options, layout, prefix tokens, blocks)
FAMILIES = {
    "resnet": ("resnet18", {"layers": (1, 1, 1, 1)}, "nchw", 0, 4),
    "resnext": ("resnext50_32x4d", {"layers": (1, 1, 1, 1)}, "nchw", 0, 4),
    "regnet": ("regnetx_002", {}, "nchw", 0, 13),
    "convnext": ("test_convnext", {}, "nchw", 0, 9),
    "efficientnet": ("test_efficientnet", {}, "nchw", 0, 5),
    "mobilenetv3": ("mobilenetv3_small_050", {}, "nchw", 0, 12),
    "nfnet": ("test_nfnet", {}, "nchw", 0, 4),
    "vit": ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 3}, "tokens", 1, 3),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        {"patch_size": 4, "depth": 2},
        "tokens",
        2,
        2,
    ),
    "vit_register": ("test_vit2", {"patch_size": 4, "depth": 2}, "tokens", 1, 2),
    "eva02": ("eva02_tiny_patch14_224", {"patch_size": 4, "depth": 2}, "tokens", 1, 2),
    "beit": (
        "beit_base_patch16_224",
        {"patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2},
        "tokens",
        1,
        2,
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "window_size": 2},
        "nhwc",
        0,
        4,
    ),
    "mambaout": ("test_mambaout", {"dims": (32, 64, 96, 128)}, "nhwc", 0, 6),
    "maxvit": ("test_maxvit", {}, "nchw", 0, 4),
    "coatnet": ("test_coatnet", {}, "nchw", 0, 5),
}
NAMES = sorted(FAMILIES)


def _build(family: str, seed: int = 0, **overrides: object) -> BlockModel:
    name, options, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    sizes = {"num_classes": 10, "img_size": IMG, **overrides}
    return create_model(name, **sizes, **options)


@functools.cache
def _shared(family: str) -> BlockModel:
    """One eval-mode model per family for read-only tests."""
    return _build(family).eval()


def _images(batch: int = 2, in_chans: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, IMG, IMG, generator=g)


def _positions(model: BlockModel) -> list[int]:
    return sorted({0, 1, model.num_blocks // 2, model.num_blocks})


@pytest.mark.parametrize("family", NAMES)
def test_split_identity_at_several_positions(family: str) -> None:
    model = _shared(family)
    _, _, layout, prefix_tokens, blocks = FAMILIES[family]
    assert (model.layout, model.num_prefix_tokens, model.num_blocks) == (
        layout,
        prefix_tokens,
        blocks,
    )
    assert model.kind == ("vit" if layout == "tokens" else "cnn")
    x = _images()
    with torch.no_grad():
        expected = model.timm_net.eval()(x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        for position in _positions(model):
            prefix, suffix = split(model, position)
            features = prefix(x)
            torch.testing.assert_close(suffix(features), expected, atol=1e-5, rtol=1e-5)
            assert tuple(features.shape[1:]) == feature_shape(model, position)
            assert features.dim() == (3 if layout == "tokens" else 4)


@pytest.mark.parametrize("family", NAMES)
def test_prefix_and_suffix_own_every_parameter_once(family: str) -> None:
    model = _shared(family)
    own = {id(p) for p in model.parameters()}
    assert own == {id(p) for p in model.timm_net.parameters()}
    prefix, suffix = split(model, model.num_blocks // 2)
    pre, suf = {id(p) for p in prefix.parameters()}, {id(p) for p in suffix.parameters()}
    assert pre | suf == own and not pre & suf


@pytest.mark.parametrize("family", NAMES)
def test_block_positions_end_where_timm_stages_end(family: str) -> None:
    """timm's feature_info gives each stage's channel count; the block view's position at that
    stage's last block has it on the layout's channel axis."""
    model = _shared(family)
    rows = describe_blocks(model)
    assert [r["position"] for r in rows] == list(range(model.num_blocks + 1))
    assert [r["shape"] for r in rows] == [feature_shape(model, p) for p in range(len(rows))]
    axis = 0 if model.layout == "nchw" else -1
    checked = 0
    for info in model.timm_net.feature_info:
        ends = [i for i, n in enumerate(model.block_names) if n.startswith(info["module"] + ".")]
        ends += [i for i, n in enumerate(model.block_names) if n == info["module"]]
        if ends:
            assert rows[max(ends) + 1]["shape"][axis] == info["num_chs"], info
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("family", NAMES)
def test_flops_match_flop_counter(family: str) -> None:
    model = _shared(family)
    shape = (3, IMG, IMG)
    macs = forward_macs_ptflops(model, shape)
    flops = forward_flops_counter(model, torch.randn(1, *shape))
    assert 2 * macs == pytest.approx(flops, rel=0.05)
    parts = part_flops(model, model.num_blocks // 2, shape)
    assert parts["prefix_fwd"] + parts["suffix_fwd"] == parts["full_fwd"] == 2 * macs
    assert 0 < parts["prefix_fwd"] < parts["full_fwd"]


# --- checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_timm_state_dict_pth_loads_and_matches_timm(tmp_path, family: str) -> None:
    source = _build(family, seed=0).timm_net.eval()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "timm.pth")
    target = _build(family, seed=1).eval()
    load_checkpoint(target, str(tmp_path / "timm.pth"))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", NAMES)
def test_safetensors_with_other_head_into_one_channel_model(tmp_path, family, caplog) -> None:
    from safetensors.torch import save_file

    source = _build(family, seed=0, num_classes=5).timm_net
    theirs = source.state_dict()
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(tmp_path / "w.safetensors"))
    target = _build(family, seed=1, in_chans=1)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if target.is_classifier_key(k)}
    assert fresh
    with caplog.at_level(logging.INFO, logger="freezecache.models"):
        load_checkpoint(target, str(tmp_path / "w.safetensors"))
    assert "fresh head" in caplog.text and "input channels" in caplog.text
    ours = target.state_dict()
    first_convs = set(target._first_convs)
    assert first_convs
    for timm_key, key in target._from_timm.items():
        if key in fresh:
            torch.testing.assert_close(ours[key], fresh[key], atol=0, rtol=0)
        elif key in first_convs:  # timm's adapt_input_conv: one channel sums the RGB filters
            torch.testing.assert_close(ours[key], theirs[timm_key].sum(1, keepdim=True))
        else:
            torch.testing.assert_close(ours[key], theirs[timm_key], atol=0, rtol=0)
    with torch.no_grad():
        assert torch.isfinite(target.eval()(_images(in_chans=1))).all()


@pytest.mark.parametrize("family", ["convnext", "vit", "swin"])
def test_pipeline_run_state_loads(tmp_path, family: str) -> None:
    source = _build(family, seed=0).eval()
    state = RunState(model=source.state_dict(), epoch=3, history=[{"epoch": 0, "loss": 1.0}])
    state.save(tmp_path / "state.pt")
    target = _build(family, seed=1).eval()
    load_checkpoint(target, str(tmp_path / "state.pt"))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


def test_vit_checkpoint_of_other_resolution_is_resampled_by_timm(tmp_path) -> None:
    import timm

    # 64 px / 16 px patches = a 4x4 grid, resampled by timm's own filter to 32 px / 4 px = 8x8.
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=1000)
    torch.save(vit.state_dict(), tmp_path / "vit64.pth")
    ours = _build("vit", seed=1)
    load_checkpoint(ours, str(tmp_path / "vit64.pth"))
    torch.testing.assert_close(ours.blocks[2].block.mlp.fc1.weight, vit.blocks[2].mlp.fc1.weight)
    assert ours.stem.pos_embed.shape == (1, 65, 192)


def test_checkpoint_of_another_architecture_is_one_line(tmp_path) -> None:
    torch.save(_build("resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(FreezecacheError, match="does not fit model regnetx_002") as err:
        load_checkpoint(_build("regnet"), str(tmp_path / "resnet.pth"))
    assert "\n" not in str(err.value)
    with pytest.raises(FreezecacheError, match="does not exist"):
        load_checkpoint(_build("regnet"), str(tmp_path / "missing.safetensors"))


# --- augmentation follows the layout ---------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_augmentation_of_real_features_follows_layout(family: str) -> None:
    model = _shared(family)
    prefix, _ = split(model, model.num_blocks // 2)
    x = _images(batch=4)
    with torch.no_grad():
        f, f_flip = prefix(x), prefix(x.flip(-1))
    if model.layout == "tokens":
        p = model.num_prefix_tokens
        pos, stored, _ = rank.select_tokens(f, f_flip, 0.25, num_prefix_tokens=p)
        assert pos.shape == (4, rank.num_selected_tokens(f.shape[1], 0.25, p))
        assert int(pos.min()) >= p
        view = augment.augmented_view(f, stored, pos, layout="tokens")
        torch.testing.assert_close(view[:, :p], f[:, :p], atol=0, rtol=0)
    else:
        sens = rank.ChannelSensitivity(model.layout)
        sens.update(f, f_flip)
        channels = rank.most_sensitive(sens.scores(), 1.0)
        stored = augment.take_channels(f_flip, channels, model.layout)
        assert stored.shape[1:] == augment.stored_channels_shape(
            f.shape[1:], len(channels), model.layout
        )
        view = augment.augmented_view(f, stored, channels, layout=model.layout)
        torch.testing.assert_close(view, f_flip, atol=0, rtol=0)  # every channel stored
    assert view.shape == f.shape
    out = augment_once(
        f,
        mode="similarity",
        g=torch.Generator().manual_seed(0),
        flip_p=0.5,
        crop_pad=1,
        noise_std=0.1,
        blur_p=0.5,
        extra=stored,
        where=pos if model.layout == "tokens" else channels,
        layout=model.layout,
    )
    assert out.shape == f.shape and torch.isfinite(out).all()


# --- one freeze point: prefix -> quantised cache -> suffix steps ------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_one_point_chain_trains_the_suffix_from_a_quantised_cache(family: str) -> None:
    model = _build(family)
    position = model.num_blocks // 2
    prefix, suffix = split(model, position)
    for p in prefix.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    batches = [(_images(batch=4, seed=s), torch.randint(0, 10, (4,), generator=g)) for s in (3, 4)]
    codec = make_codec("quant", 0.01, channel_axis=model.channel_axis)
    cache = []
    with torch.no_grad():
        prefix.eval()
        for x, y in batches:
            f = prefix(x).numpy()
            decoded = torch.from_numpy(codec.decode(codec.encode(f), f.shape))
            assert float((decoded - torch.from_numpy(f)).abs().max()) <= 0.01
            cache.append((decoded, y))
    opt = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=0.05)
    suffix.train()
    losses = []
    for _ in range(6):
        epoch_loss = 0.0
        for i, (f, y) in enumerate(cache):
            f = augment_once(
                f,
                mode="standard",
                g=torch.Generator().manual_seed(i),
                flip_p=0.0,
                crop_pad=0,
                noise_std=0.0,
                layout=model.layout,
            )
            loss = F.cross_entropy(suffix(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss += loss.item()
        losses.append(epoch_loss)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# --- what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "why"),
    [
        ("vgg11", {}, "no stages, layers or blocks"),
        ("hrnet_w18_small", {}, "not called with one tensor"),
        ("cait_xxs24_224", {"patch_size": 4, "depth": 2}, "does not reproduce"),
        (
            "beit_base_patch16_224",
            {
                "patch_size": 4,
                "depth": 1,
                "embed_dim": 32,
                "num_heads": 2,
                "use_shared_rel_pos_bias": True,
                "use_rel_pos_bias": False,
            },
            "shared_rel_pos_bias",
        ),
    ],
)
def test_models_that_cannot_be_cut_are_one_line(name: str, options: dict, why: str) -> None:
    with pytest.raises(FreezecacheError, match=why) as err:
        create_model(name, num_classes=10, img_size=IMG, **options)
    assert "supported:" in str(err.value) and "\n" not in str(err.value)


def test_timm_options_and_names() -> None:
    with pytest.raises(FreezecacheError, match="hub"):
        create_model("resnet18", num_classes=10, pretrained=True)
    with pytest.raises(FreezecacheError, match="bogus"):
        create_model("resnet18", num_classes=10, bogus=1)
    with pytest.raises(FreezecacheError, match="timm model name"):
        create_model("no_such_net", num_classes=10)
    forced = create_model("timm:resnet50", num_classes=10, layers=(1, 1, 1, 1))
    assert forced.name == "timm:resnet50" and forced.num_blocks == 4
    assert create_model("resnet50", num_classes=10).num_blocks == 16  # the registered one


def test_small_one_channel_inputs_work_where_the_architecture_allows() -> None:
    vit = create_model(
        "vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=28, patch_size=4, depth=1
    )
    assert feature_shape(vit, 1) == (50, 192)  # 7x7 patches + class token
    swin = _build("swin", in_chans=1, img_size=28)
    with torch.no_grad():
        assert swin.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(FreezecacheError, match=r"cannot run a \(1, 28, 28\) input") as err:
        _build("convnext", in_chans=1, img_size=28)
    assert "\n" not in str(err.value)


def test_grad_checkpointing_gives_same_gradients_on_a_timm_model() -> None:
    plain = _build("convnext").eval()
    ckpt = _build("convnext").eval()
    ckpt.set_grad_checkpointing(True, every=2)
    x = _images()
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-5, msg=key)


def test_builds_with_random_weights_only(monkeypatch) -> None:
    import timm

    seen: list[dict] = []
    real = timm.create_model

    def spy(name: str, **kwargs: object):
        seen.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    _build("resnet")
    assert seen and all(kw["pretrained"] is False for kw in seen)


def test_copies_conversions_and_modes_reach_the_timm_code() -> None:
    import copy

    model = _build("eva02").eval()  # rotary-embedding arguments are buffers of the blocks
    x = _images()
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        for p in twin.blocks[0].parameters():
            p.add_(1.0)
        assert not torch.allclose(twin(x), expected)
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        doubled = model.double()(x.double())
    torch.testing.assert_close(doubled, expected.double(), atol=1e-5, rtol=1e-5)
    model.train()(x.double())
    assert model.timm_net.training
    model.eval()(x.double())
    assert not model.timm_net.training
