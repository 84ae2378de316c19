"""Count the host syncs a block of tensor code dispatches (ENVIRONMENT.md: on a GPU each one drains
the queue): ``.item()`` / ``int(t)`` / ``bool(t)`` (``aten._local_scalar_dense``), ``nonzero``,
``masked_select``, ``unique`` and boolean-mask indexing (data-dependent output sizes)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive"}


class _Counter(TorchDispatchMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()  # e.g. "aten::nonzero", "aten::index.Tensor"
        op = name.split("::")[-1].split(".")[0]
        if op in SYNC_OPS:
            self.found.append(name)
        elif op in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            self.found.append(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs() -> Iterator[list[str]]:
    """``with count_syncs() as found: ...``: ``found`` lists the syncing ops dispatched inside."""
    found: list[str] = []
    with _Counter(found):
        yield found
