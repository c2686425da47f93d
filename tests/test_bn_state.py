"""The shared BN bookkeeping (snnorm._bn_state): running statistics and the
one-value-per-channel rule, on their own and against torch's BatchNorm."""

import pytest
import torch
import torch.nn as nn

from snnorm import layer
from snnorm._bn_state import check_batch_values, resolve_running_stats, uses_batch_stats
from snnorm.memopt import gc_1st_forward

C = 3


def _bn(momentum=0.1, counted=0):
    bn = nn.BatchNorm1d(C, momentum=momentum)
    bn.num_batches_tracked.fill_(counted)
    return bn


def test_shared_counter_counts_every_step_with_cumulative_factors():
    bn = _bn(momentum=None, counted=2)
    stats = resolve_running_stats(bn, steps=3)
    assert stats.mean is bn.running_mean and stats.var is bn.running_var
    assert stats.factors == [1 / 3, 1 / 4, 1 / 5]
    assert stats.batches_before == 2
    assert bn.num_batches_tracked.item() == 2  # counted by commit(), once the op has run
    stats.commit()
    assert bn.num_batches_tracked.item() == 5


def test_shared_counter_with_momentum():
    bn = _bn(momentum=0.25, counted=7)
    stats = resolve_running_stats(bn, steps=2)
    assert stats.factors == [0.25, 0.25] and stats.batches_before == 0
    stats.commit()
    assert bn.num_batches_tracked.item() == 9
    with pytest.raises(ValueError, match="one momentum factor, got 2"):
        stats.factor


def test_window_counts_each_step_once():
    tab = layer.TemporalAccumulatedBatchNorm1d(4, C, momentum=None)
    tab.num_batches_tracked.copy_(torch.tensor([1, 2, 3, 4]))
    stats = resolve_running_stats(tab, window=slice(1, 3))
    stats.commit()
    assert tab.num_batches_tracked.tolist() == [1, 3, 4, 4]
    assert stats.factors == [1 / 3, 1 / 4]
    # views of the per-step buffers, so the op's in-place update lands in the module
    assert stats.mean.data_ptr() == tab.running_mean[1].data_ptr() and stats.mean.shape == (2, C)


def test_eval_reads_the_buffers_and_counts_nothing():
    bn = _bn(counted=3).eval()
    stats = resolve_running_stats(bn)
    assert stats.mean is bn.running_mean and stats.factor == 0.1
    stats.commit()
    assert bn.num_batches_tracked.item() == 3


def test_no_update_gives_throw_away_copies():
    bn = _bn(counted=3)
    with gc_1st_forward():
        stats = resolve_running_stats(bn)
    stats.commit()
    assert stats.mean is not bn.running_mean and torch.equal(stats.mean, bn.running_mean)
    assert stats.var is not bn.running_var and torch.equal(stats.var, bn.running_var)
    assert bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("make", [lambda: layer.BatchNorm1d(C), lambda: layer.TemporalAccumulatedBatchNorm1d(1, C)])
def test_tracking_switched_off_after_construction_follows_torch(make):
    # torch: training without tracking uses batch statistics and leaves buffers and counter alone
    ours, theirs = make(), nn.BatchNorm1d(C)
    ours.track_running_stats = theirs.track_running_stats = False
    x = torch.randn(4, C)
    theirs(x)
    ours(x if isinstance(ours, layer.BatchNorm1d) else x.unsqueeze(0))
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, buffer).flatten(), getattr(theirs, buffer).flatten()), buffer
    assert resolve_running_stats(ours)[:2] == (None, None)


def test_one_value_per_channel_is_rejected_empty_batch_only_where_asked():
    bn = _bn()
    with pytest.raises(ValueError, match=r"^BatchNorm1d: batch statistics need more than one value per channel.*"
                                         r"\(1 value\(s\) per channel at t=0\)"):
        check_batch_values(bn, torch.randn(1, C), batch_stats=True, over="at t=0")
    # T·N·spatial: a sequence of two single-sample steps has two values per channel
    check_batch_values(bn, torch.randn(2, 1, C), batch_stats=True, channel_dim=2)
    with pytest.raises(ValueError, match="1 value"):
        check_batch_values(bn, torch.randn(1, 1, C), batch_stats=True, channel_dim=2)
    check_batch_values(bn, torch.randn(1, C), batch_stats=False)  # running statistics normalise
    check_batch_values(bn, torch.randn(0, C), batch_stats=True)  # as F.batch_norm: nothing to update
    with pytest.raises(ValueError, match=r"0 value\(s\)"):
        check_batch_values(bn, torch.randn(0, C), batch_stats=True, empty_ok=False)


def test_empty_batch_matches_torch():
    # torch counts an empty batch and leaves the statistics alone; so do the layers built on F.batch_norm
    ours, theirs = layer.BatchNorm2d(C), nn.BatchNorm2d(C)
    x = torch.randn(0, C, 2, 2)
    assert ours(x).shape == theirs(x).shape
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_uses_batch_stats():
    assert uses_batch_stats(_bn())
    assert not uses_batch_stats(_bn().eval())
    assert uses_batch_stats(nn.BatchNorm1d(C, track_running_stats=False).eval())
