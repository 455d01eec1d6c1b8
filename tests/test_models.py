"""Block-sequential models: split equivalence, shapes, grad checkpointing, checkpoint loading."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch import nn

from freezecache.core.errors import FreezecacheError
from freezecache.models import (
    BlockModel,
    create_model,
    describe_blocks,
    feature_shape,
    list_models,
    load_checkpoint,
    split,
)

ALL_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet50", "deit_tiny", "deit_small"]
IMG = 32
SHARED_IMG = {"resnet50": 16}  # ResNet-50's CIFAR stem costs 1.3 GMac at 32 px; keep tests fast


@functools.cache
def _shared_model(name: str) -> BlockModel:
    """One eval-mode model per name for read-only tests (building deit_small/resnet50 costs)."""
    torch.manual_seed(0)
    return create_model(name, num_classes=10, img_size=SHARED_IMG.get(name, IMG)).eval()


def _batch(in_chans: int = 3, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(seed))


def _positions(model: BlockModel) -> list[int]:
    return sorted({0, 1, model.num_blocks // 2, model.num_blocks})


def test_registry_lists_every_model() -> None:
    assert list_models() == sorted(ALL_MODELS)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(FreezecacheError, match="resnet32.*") as err:
        create_model("resnet33", num_classes=10)
    assert "deit_small" in str(err.value)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_suffix_of_prefix_equals_model(name: str) -> None:
    model = _shared_model(name)
    x = _batch(size=model.img_size)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (2, 10)
        for position in _positions(model):
            prefix, suffix = split(model, position)
            features = prefix(x)
            torch.testing.assert_close(suffix(features), expected, atol=1e-5, rtol=0)
            assert tuple(features.shape[1:]) == feature_shape(model, position)


def test_forward_features_is_the_prefix() -> None:
    model, x = _shared_model("resnet20"), _batch()
    with torch.no_grad():
        for position in (0, 4, None):
            prefix, _ = split(model, model.num_blocks if position is None else position)
            torch.testing.assert_close(model.forward_features(x, end=position), prefix(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_prefix_and_suffix_share_the_models_parameters(name: str) -> None:
    model = _shared_model(name)
    own = {id(p) for p in model.parameters()}
    for position in _positions(model):
        prefix, suffix = split(model, position)
        pre = {id(p) for p in prefix.parameters()}
        suf = {id(p) for p in suffix.parameters()}
        assert pre | suf == own
        assert not pre & suf


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        ("resnet20", 9),
        ("resnet32", 15),
        ("resnet44", 21),
        ("resnet56", 27),
        ("resnet50", 16),
        ("deit_tiny", 12),
        ("deit_small", 12),
    ],
)
def test_num_blocks(name: str, blocks: int) -> None:
    assert _shared_model(name).num_blocks == blocks


@pytest.mark.parametrize(
    ("name", "position", "shape"),
    [
        ("resnet32", 0, (16, 32, 32)),
        ("resnet32", 6, (32, 16, 16)),
        ("resnet32", 15, (64, 8, 8)),
        ("resnet50", 3, (256, 16, 16)),
        ("resnet50", 16, (2048, 2, 2)),
        ("deit_tiny", 5, (65, 192)),
        ("deit_small", 12, (65, 384)),
    ],
)
def test_feature_shape_values(name: str, position: int, shape: tuple[int, ...]) -> None:
    assert feature_shape(_shared_model(name), position) == shape


def test_feature_shape_leaves_training_state_alone() -> None:
    model = create_model("resnet20", num_classes=10).train()
    model.blocks[0].eval()  # a frozen block stays in eval; the dry run must not flip it back
    stats = model.stem[1].running_mean.clone()
    feature_shape(model, 3)
    assert model.training and model.stem.training and not model.blocks[0].training
    torch.testing.assert_close(model.stem[1].running_mean, stats, atol=0, rtol=0)


def test_resnet50_stem_follows_image_size() -> None:
    assert feature_shape(create_model("resnet50", num_classes=10, img_size=224), 0) == (64, 56, 56)
    imagenet_stem = create_model("resnet50", num_classes=10, img_size=32, cifar_stem=False)
    assert feature_shape(imagenet_stem, 0) == (64, 8, 8)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_channel_input(name: str) -> None:
    model = create_model(name, num_classes=10, in_chans=1, img_size=28).eval()
    with torch.no_grad():
        out = model(_batch(in_chans=1, size=28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("position", [-1, 10, 1.5])
def test_position_out_of_range(position: float) -> None:
    model = _shared_model("resnet20")
    with pytest.raises(FreezecacheError, match=r"0\.\.9"):
        split(model, position)  # type: ignore[arg-type]
    with pytest.raises(FreezecacheError):
        feature_shape(model, position)  # type: ignore[arg-type]


def test_unsupported_options_are_user_errors() -> None:
    with pytest.raises(FreezecacheError, match="drop_path_rate"):
        create_model("resnet32", num_classes=10, drop_path_rate=0.1)
    with pytest.raises(FreezecacheError, match="bogus"):
        create_model("deit_tiny", num_classes=10, bogus=1)
    with pytest.raises(FreezecacheError, match="patch_size"):
        create_model("deit_tiny", num_classes=10, img_size=30, patch_size=4)
    with pytest.raises(FreezecacheError, match="num_classes"):
        create_model("resnet20", num_classes=0)
    assert create_model("deit_tiny", num_classes=10, drop_path_rate=0.1).num_blocks == 12


def test_param_counts() -> None:
    # He et al. 2016 Table 6: ResNet-32 has 0.46M parameters (option-B shortcuts add ~3k).
    assert 0.46e6 <= sum(p.numel() for p in _shared_model("resnet32").parameters()) <= 0.47e6
    # torchvision's ResNet-50 at 1000 classes: 25,557,032.
    tv_like = create_model("resnet50", num_classes=1000, img_size=224)
    assert sum(p.numel() for p in tv_like.parameters()) == 25_557_032


# --- grad checkpointing ------------------------------------------------------------------------


def _count_calls(blocks: nn.ModuleList) -> list[int]:
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        # A pre-hook: non-reentrant checkpointing may stop a recomputation before a block ends.
        block.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _grads(model: nn.Module, run) -> dict[str, torch.Tensor]:
    model.zero_grad()
    run(model).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("name", "train"), [("resnet20", False), ("deit_tiny", True)])
def test_grad_checkpointing_gives_same_gradients(name: str, train: bool) -> None:
    # BN models run in eval mode: checkpoint recomputation would update BN stats twice.
    torch.manual_seed(0)
    plain = create_model(name, num_classes=10).train(train)
    for p in plain.blocks[:2].parameters():  # a frozen prefix, as after a freeze point
        p.requires_grad_(False)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True, every=2)
    calls = _count_calls(ckpt.blocks)
    x = _batch()

    expected = _grads(plain, lambda m: m(x))
    got = _grads(ckpt, lambda m: m(x))
    assert expected.keys() == got.keys() and len(got) > 0
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-5, msg=key)
    # Frozen blocks run once; trainable ones again in backward (the recomputation).
    assert calls == [1, 1] + [2] * (ckpt.num_blocks - 2)


def test_suffix_honours_checkpointing_set_after_split() -> None:
    model = create_model("resnet20", num_classes=10).eval()
    prefix, suffix = split(model, 4)
    calls = _count_calls(model.blocks)
    x = _batch()
    with torch.no_grad():
        features = prefix(x)
    model.set_grad_checkpointing(True)
    suffix(features).sum().backward()
    assert calls == [1] * 4 + [2] * 5
    model.set_grad_checkpointing(False)
    suffix(features).sum().backward()
    assert calls == [1] * 4 + [3] * 5


def test_checkpointing_every_must_be_positive() -> None:
    with pytest.raises(FreezecacheError, match="every"):
        create_model("resnet20", num_classes=10).set_grad_checkpointing(True, every=0)


# --- checkpoint loading ------------------------------------------------------------------------


def _fresh(name: str, seed: int, **kwargs) -> BlockModel:
    torch.manual_seed(seed)
    return create_model(name, **{"num_classes": 10, "img_size": IMG, **kwargs}).eval()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module.", "safetensors"])
def test_checkpoint_round_trip(tmp_path, wrap: str) -> None:
    source, target = _fresh("resnet20", 0), _fresh("resnet20", 1)
    state = source.state_dict()
    path = tmp_path / ("ckpt.safetensors" if wrap == "safetensors" else "ckpt.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif wrap == "module.":
        torch.save({"module." + k: v for k, v in state.items()}, path)
    elif wrap == "plain":
        torch.save(state, path)
    else:
        torch.save({wrap: state, "epoch": 3}, path)
    load_checkpoint(target, str(path))
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=1e-6, rtol=0)


def test_head_kept_when_class_count_differs(tmp_path, caplog) -> None:
    source = _fresh("resnet20", 0, num_classes=100)
    target = _fresh("resnet20", 1)
    fresh_head = target.head.fc.weight.detach().clone()
    torch.save(source.state_dict(), tmp_path / "c100.pt")
    with caplog.at_level(logging.INFO, logger="freezecache.models"):
        load_checkpoint(target, str(tmp_path / "c100.pt"))
    assert "fresh head" in caplog.text
    torch.testing.assert_close(target.head.fc.weight, fresh_head, atol=0, rtol=0)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x))


def test_torchvision_resnet50_state_dict_loads(tmp_path) -> None:
    from torchvision.models import resnet50 as tv_resnet50

    torch.manual_seed(0)
    tv = tv_resnet50(num_classes=10).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = _fresh("resnet50", 1, cifar_stem=False)
    load_checkpoint(ours, str(tmp_path / "tv.pth"))
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=0)

    gray = _fresh("resnet50", 1, cifar_stem=False, in_chans=1, num_classes=1000)
    load_checkpoint(gray, str(tmp_path / "tv.pth"))  # 3 -> 1 channel stem, fresh 1000-way head
    torch.testing.assert_close(gray.stem.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.blocks[15].conv3.weight, tv.layer4[2].conv3.weight)

    # The shared model has the CIFAR stem; the stem check fails before anything is loaded.
    with pytest.raises(FreezecacheError, match="cifar_stem=False"):
        load_checkpoint(_shared_model("resnet50"), str(tmp_path / "tv.pth"))


def test_timm_deit_state_dict_loads_and_matches_timm_forward(tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=IMG, patch_size=4, num_classes=10)
    torch.save(vit.eval().state_dict(), tmp_path / "deit.pth")
    ours = _fresh("deit_tiny", 1)
    load_checkpoint(ours, str(tmp_path / "deit.pth"))
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), vit(x), atol=1e-5, rtol=0)


def test_timm_deit_of_other_resolution_is_resampled(tmp_path, caplog) -> None:
    import timm
    from safetensors.torch import save_file

    # 64 px / 16 px patches = 4x4 tokens, resampled to our 8x8 grid (32 px / 4 px patches).
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=1000)
    save_file(vit.state_dict(), str(tmp_path / "deit64.safetensors"))
    ours = _fresh("deit_tiny", 1)
    with caplog.at_level(logging.INFO, logger="freezecache.models"):
        load_checkpoint(ours, str(tmp_path / "deit64.safetensors"))
    assert "position embedding" in caplog.text and "patch embedding" in caplog.text
    assert caplog.text.count("fresh head") == 1
    torch.testing.assert_close(ours.blocks[7].mlp.fc1.weight, vit.blocks[7].mlp.fc1.weight)
    torch.testing.assert_close(ours.stem.cls_token, vit.cls_token)


def test_checkpoint_errors(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FreezecacheError, match="nope.pt"):
        load_checkpoint(_fresh("resnet20", 0), str(missing))

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FreezecacheError, match="junk.pt"):
        load_checkpoint(_fresh("resnet20", 0), str(tmp_path / "junk.pt"))

    torch.save(_fresh("resnet20", 0).state_dict(), tmp_path / "r20.pt")
    with pytest.raises(FreezecacheError, match=r"r20\.pt.*shape mismatch.*blocks\.3\.conv1"):
        load_checkpoint(_fresh("resnet32", 0), str(tmp_path / "r20.pt"))

    state = _fresh("resnet20", 0).state_dict()
    del state["blocks.8.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(
        FreezecacheError, match=r"missing \['blocks\.8\.conv2\.weight'\], unexpected \['extra"
    ):
        load_checkpoint(_fresh("resnet20", 0), str(tmp_path / "edited.pt"))


# --- layout and block listing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout", "kind", "prefix_tokens"),
    [
        ("resnet20", "nchw", "cnn", 0),
        ("resnet50", "nchw", "cnn", 0),
        ("deit_tiny", "tokens", "vit", 1),
    ],
)
def test_registered_models_declare_their_layout(name, layout, kind, prefix_tokens) -> None:
    model = _shared_model(name)
    assert (model.layout, model.kind, model.num_prefix_tokens) == (layout, kind, prefix_tokens)
    assert model.channel_axis == (1 if layout == "nchw" else -1)


def test_block_model_takes_kind_or_layout() -> None:
    parts = (nn.Identity(), [nn.Identity()], nn.Identity())
    sizes = {"in_chans": 3, "img_size": 4, "num_classes": 2}
    assert BlockModel(*parts, kind="cnn", **sizes).layout == "nchw"
    assert BlockModel(*parts, layout="nhwc", **sizes).kind == "cnn"
    tokens = BlockModel(*parts, layout="tokens", num_prefix_tokens=2, **sizes)
    assert (tokens.kind, tokens.num_prefix_tokens) == ("vit", 2)
    with pytest.raises(FreezecacheError, match="layout"):
        BlockModel(*parts, layout="nwhc", **sizes)
    with pytest.raises(FreezecacheError, match="kind"):
        BlockModel(*parts, kind="rnn", **sizes)


def test_describe_blocks_of_registered_models() -> None:
    model = _shared_model("resnet32")
    rows = describe_blocks(model)
    assert len(rows) == 16 and rows[0]["name"] == "stem"
    assert [r["shape"] for r in rows] == [feature_shape(model, p) for p in range(16)]
    assert rows[6] == {
        "position": 6,
        "name": "blocks.5",
        "type": "BasicBlock",
        "joins": [],
        "params": sum(p.numel() for p in _shared_model("resnet32").blocks[5].parameters()),
        "shape": (32, 16, 16),
    }
    resnet50 = describe_blocks(_shared_model("resnet50"))
    assert [r["name"] for r in resnet50[1:5]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]


def test_registered_state_dict_keys_are_unchanged() -> None:
    keys = list(_shared_model("deit_tiny").state_dict())
    assert keys[:4] == [
        "stem.cls_token",
        "stem.pos_embed",
        "stem.patch_embed.proj.weight",
        "stem.patch_embed.proj.bias",
    ]
    assert keys[-2:] == ["head.fc.weight", "head.fc.bias"]
    assert "blocks.3.conv1.weight" in _shared_model("resnet20").state_dict()
