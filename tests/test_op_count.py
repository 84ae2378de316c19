"""The counter behind the host-sync tests and scripts/bench_speed.py sees every kind of sync."""

import torch

from scripts.op_count import OpCounter


def test_every_kind_of_host_sync_is_counted_and_plain_ops_are_not():
    x = torch.arange(6.0)
    with OpCounter() as ops:
        y = x * 2 + 1  # two ops, no sync
        torch.topk(y, 3).indices.sort()
    assert ops.syncs == [] and ops.n_ops >= 4
    kinds = {
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.numpy": lambda: x.numpy(),
        "aten::_local_scalar_dense": lambda: int(x[1]),
        "aten::index.Tensor (bool mask)": lambda: x[x > 2],
        "aten::index_put_ (bool mask)": lambda: x.clone().__setitem__(x > 2, 0.0),
        "aten::nonzero": lambda: torch.nonzero(x),
        "aten::repeat_interleave.Tensor (tensor repeats)": lambda: torch.repeat_interleave(x, torch.ones(6, dtype=torch.long)),
    }
    for name, block in kinds.items():
        with OpCounter() as ops:
            block()
        assert name in ops.syncs, (name, ops.syncs)
