"""Flip-sensitivity ranking (SSIM per channel) and ViT token matching (Algorithm 1)."""

import torch

from freezecache.training import rank


def test_ssim_is_one_for_identical_and_lower_for_different():
    a = torch.rand(4, 3, 8, 8)
    s = rank.ssim_per_channel(a, a, torch.ones(3))
    assert torch.allclose(s, torch.ones(3), atol=1e-5)
    b = a.clone()
    b[:, 1] = torch.rand(4, 8, 8)
    s = rank.ssim_per_channel(a, b, torch.ones(3))
    assert s[1] < 0.5 and s[0] > 0.99 and s[2] > 0.99


def test_flip_equivariant_channels_rank_last():
    torch.manual_seed(0)
    f = torch.rand(6, 4, 8, 8)
    f_of_flipped = f.flip(-1).clone()  # channels 0, 2, 3 flip perfectly
    f_of_flipped[:, 1] = torch.rand(6, 8, 8)  # channel 1 is flip-sensitive
    sens = rank.ChannelSensitivity()
    sens.update(f[:3], f_of_flipped[:3])
    sens.update(f[3:], f_of_flipped[3:])
    assert sens.count == 6
    assert rank.most_sensitive(sens.scores(), 0.25).tolist() == [1]
    assert rank.most_sensitive(sens.scores(), 0.0).numel() == 0
    assert rank.most_sensitive(sens.scores(), 1.0).numel() == 4


def test_token_matching_follows_permutation_and_selects_least_similar():
    torch.manual_seed(0)
    orig = torch.randn(2, 6, 16)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    aug = orig[:, perm].clone()
    aug[:, 0] = torch.randn(2, 16)  # orig token 3 has no good match any more
    best_j, best_sim = rank.match_tokens(orig, aug)
    inv = torch.argsort(perm)
    for i in (0, 1, 2, 4, 5):
        assert best_j[0, i] == inv[i] and best_sim[0, i] > 0.999
    pos, stored, sims = rank.select_tokens(orig, aug, alpha=1 / 6)
    assert pos.shape == (2, 1) and pos[0, 0] == 3
    assert torch.equal(stored[0, 0], aug[0, best_j[0, 3]])
    assert sims[0, 0] < 0.9


def test_nhwc_sensitivity_equals_nchw_on_the_same_maps():
    torch.manual_seed(1)
    f, f_flipped = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    nchw, nhwc = rank.ChannelSensitivity(), rank.ChannelSensitivity("nhwc")
    nchw.update(f, f_flipped)
    nhwc.update(f.permute(0, 2, 3, 1), f_flipped.permute(0, 2, 3, 1))
    torch.testing.assert_close(nhwc.scores(), nchw.scores())


def test_prefix_tokens_are_never_selected():
    torch.manual_seed(0)
    orig = torch.randn(3, 9, 8)
    aug = torch.randn(3, 9, 8)
    aug[:, :2] = -orig[:, :2]  # the prefix tokens would be the least similar
    pos, stored, _ = rank.select_tokens(orig, aug, alpha=0.5, num_prefix_tokens=2)
    assert pos.shape == (3, rank.num_selected_tokens(9, 0.5, 2)) == (3, 4)  # round(0.5 * 7)
    assert int(pos.min()) >= 2
    # the stored tokens come from the augmented patch tokens only
    flat = aug[:, 2:].reshape(-1, 8)
    assert all((flat == t).all(-1).any() for t in stored.reshape(-1, 8))
    same_as_before = rank.select_tokens(orig, aug, alpha=0.5)  # default: every token counts
    assert same_as_before[0].shape == (3, round(0.5 * 9))


def test_bad_layout_or_prefix_is_a_user_error():
    import pytest

    from freezecache.core.errors import FreezecacheError

    with pytest.raises(FreezecacheError, match="spatial layout"):
        rank.ChannelSensitivity("tokens")
    with pytest.raises(FreezecacheError, match="num_prefix_tokens"):
        rank.select_tokens(torch.randn(1, 3, 4), torch.randn(1, 3, 4), 0.5, num_prefix_tokens=3)
