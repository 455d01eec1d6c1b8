"""Raw-image and feature-map augmentation, channel and token replacement."""

import torch

from conftest import augment_once
from freezecache.codecs.registry import make_codec
from freezecache.models import create_model, split
from freezecache.training import augment, rank


def test_random_crop_matches_manual_slices():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = augment.random_crop(x, 2, g)
    offs = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        r, c = offs[i].tolist()
        assert torch.equal(out[i], padded[i, :, r : r + 5, c : c + 5])


def test_flip_where_flips_only_selected():
    x = torch.randn(3, 2, 4, 4)
    mask = torch.tensor([True, False, True])
    out = augment.flip_where(x, mask)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_feature_augmentation_is_reproducible_and_none_is_identity():
    x = torch.randn(8, 4, 6, 6)
    kw = dict(mode="standard", flip_p=0.5, crop_pad=1, noise_std=0.1)
    a = augment_once(x, g=torch.Generator().manual_seed(3), **kw)
    b = augment_once(x, g=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b) and not torch.equal(a, x)
    same = augment_once(x, mode="none", g=torch.Generator(), flip_p=1, crop_pad=1, noise_std=1)
    assert torch.equal(same, x)


def test_similarity_mode_puts_stored_channels_back_on_flipped_samples():
    x = torch.randn(4, 5, 6, 6)
    channels = torch.tensor([1, 3])
    stored = torch.randn(4, 2, 6, 6)
    out = augment_once(
        x,
        mode="similarity",
        g=torch.Generator(),
        flip_p=1.0,
        crop_pad=0,
        noise_std=0.0,
        extra=stored,
        where=channels,
    )
    assert torch.equal(out[:, channels], stored)
    assert torch.equal(out[:, [0, 2, 4]], x[:, [0, 2, 4]].flip(-1))
    kept = augment_once(
        x,
        mode="similarity",
        g=torch.Generator(),
        flip_p=0.0,
        crop_pad=0,
        noise_std=0.0,
        extra=stored,
        where=channels,
    )
    assert torch.equal(kept, x)


def _prefix_features(gamma: float, tol: float = 1e-2):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28).eval()
    prefix, _ = split(model, 3)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        f, f_flip = prefix(x), prefix(x.flip(-1))
    sens = rank.ChannelSensitivity()
    sens.update(f, f_flip)
    channels = rank.most_sensitive(sens.scores(), gamma)
    codec = make_codec("zfp", tol)
    f_dec = torch.from_numpy(codec.decode(codec.encode(f.numpy()), tuple(f.shape)))
    if channels.numel() == 0:  # nothing stored: the cache holds F(x) alone
        return f, f_flip, augment.augmented_view(f_dec, None, None)
    stored = f_flip[:, channels].contiguous()
    s_dec = torch.from_numpy(codec.decode(codec.encode(stored.numpy()), tuple(stored.shape)))
    view = augment.augmented_view(f_dec, s_dec, channels)
    return f, f_flip, view


def test_gamma_one_reproduces_features_of_flipped_input():
    _, f_flip, view = _prefix_features(1.0)
    assert (view - f_flip).abs().max() <= 1e-2


def test_gamma_zero_is_the_plain_flip():
    f, f_flip, view = _prefix_features(0.0)
    assert (view - f.flip(-1)).abs().max() <= 1e-2
    # and the plain flip really differs from F(flip(x)): that is why channels are stored
    assert (f.flip(-1) - f_flip).abs().max() > 0.1


def test_replace_tokens_at_positions():
    tokens = torch.zeros(2, 5, 3)
    stored = torch.ones(2, 2, 3)
    pos = torch.tensor([[0, 4], [1, 2]])
    out = augment.replace_tokens(tokens, stored, pos)
    assert out[0, [0, 4]].eq(1).all() and out[0, [1, 2, 3]].eq(0).all()
    assert out[1, [1, 2]].eq(1).all()


def test_scaled_pad():
    assert augment.scaled_pad(4, 32, 32) == 4
    assert augment.scaled_pad(4, 8, 32) == 1
    assert augment.scaled_pad(0, 8, 32) == 0


# --- layouts ---------------------------------------------------------------------------------


def _nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


def test_nhwc_channel_replacement_touches_the_channel_axis():
    x = torch.randn(3, 4, 5, 6)  # (B, H, W, C)
    channels = torch.tensor([0, 4])
    stored = torch.randn(3, 4, 5, 2)
    out = augment.augmented_view(x, stored, channels, layout="nhwc")
    assert torch.equal(out[..., channels], stored)
    assert torch.equal(out[..., [1, 2, 3, 5]], x[..., [1, 2, 3, 5]].flip(2))  # flipped along W
    assert torch.equal(augment.take_channels(x, channels, "nhwc"), x[..., channels])
    assert augment.stored_channels_shape((4, 5, 6), 2, "nhwc") == (4, 5, 2)
    assert augment.stored_channels_shape((6, 4, 5), 2, "nchw") == (2, 4, 5)
    assert augment.map_width((4, 5, 6), "nhwc") == 5 and augment.map_width((6, 4, 5), "nchw") == 5


def test_nhwc_augmentation_is_the_nchw_one_permuted():
    x = torch.randn(8, 5, 6, 6)
    channels = torch.tensor([1, 3])
    stored = torch.randn(8, 2, 6, 6)
    kw = dict(mode="similarity", flip_p=0.5, crop_pad=2, noise_std=0.1, blur_p=0.5)
    nchw = augment_once(x, g=torch.Generator().manual_seed(5), extra=stored, where=channels, **kw)
    nhwc = augment_once(
        _nhwc(x),
        g=torch.Generator().manual_seed(5),
        extra=_nhwc(stored),
        where=channels,
        layout="nhwc",
        **kw,
    )
    torch.testing.assert_close(nhwc, _nhwc(nchw))
    assert not torch.equal(nchw, x)


def test_token_layout_leaves_prefix_tokens_alone():
    x = torch.randn(2, 6, 4)
    pos, stored, _ = rank.select_tokens(x, torch.randn(2, 6, 4), alpha=0.5, num_prefix_tokens=2)
    out = augment_once(
        x,
        mode="similarity",
        g=torch.Generator(),
        flip_p=1.0,
        crop_pad=3,
        noise_std=0.0,
        extra=stored,
        where=pos,
        layout="tokens",
    )
    assert torch.equal(out[:, :2], x[:, :2])
    assert torch.equal(out.gather(1, pos.unsqueeze(-1).expand(-1, -1, 4)), stored)


def test_layout_must_fit_the_features():
    import pytest

    from freezecache.core.errors import FreezecacheError

    with pytest.raises(FreezecacheError, match="not tokens"):
        augment.augmented_view(torch.randn(2, 3, 4, 4), None, None, layout="tokens")
    with pytest.raises(FreezecacheError, match="unknown"):
        augment.flip_width(torch.randn(2, 3, 4, 4), "nwhc")
