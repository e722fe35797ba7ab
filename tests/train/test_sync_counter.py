import pytest
import torch

from sync_counter import SyncCounter


def test_counts_each_kind_of_device_read():
    x = torch.arange(6.0)
    mask = x > 2
    with SyncCounter() as counter:
        x.sum().item()
        int(x[0])
        mask.nonzero()
        x[mask]
        x.masked_select(mask)
        torch.unique(x)
    assert counter.counts["_local_scalar_dense"] == 2
    assert counter.counts["boolean-mask indexing"] == 1
    assert counter.counts["masked_select"] == 1
    assert counter.counts["nonzero"] >= 1
    assert counter.total >= 6


def test_ignores_ops_that_stay_on_the_device():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        y = (x * 2).cumsum(0)
        y[torch.tensor([0, 2])]
        torch.where(x > 2, x, 0.0).sum()
    assert counter.total == 0


def test_counts_copies_from_a_device_to_the_host():
    on_device = torch.ones(3, device="meta")  # (a meta tensor cannot really be copied out: the op fails after)
    with SyncCounter() as counter:
        on_device.to("meta")
        with pytest.raises(NotImplementedError):
            on_device.cpu()
        with pytest.raises(NotImplementedError):
            torch.empty(3).copy_(on_device)
    assert counter.counts == {"device-to-host copy": 2}
