"""Count what a block of tensor code costs on a GPU beyond its FLOPs: the operators it dispatches
(each a kernel launch) and the host synchronisations (each drains the GPU queue; ENVIRONMENT.md).

A host sync is any of
- a scalar read: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``range(t)`` (all dispatch
  ``aten::_local_scalar_dense``);
- a whole-tensor read: ``.tolist()``, ``.numpy()`` (no aten op: caught at the Python level);
- an operator whose output size depends on the data: ``nonzero``, ``masked_select``, ``unique``,
  boolean-mask indexing (``t[mask]``, ``t[mask] = v``), ``repeat_interleave`` with tensor repeats.

Counted on CPU, so the figures do not need a GPU: the same code dispatches the same operators and
reads the same values on either device.

    with OpCounter() as ops:
        ...
    ops.n_ops, ops.syncs   # e.g. 412, ['aten::_local_scalar_dense', 'Tensor.tolist']
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "argwhere"})
_READS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "OpCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()  # e.g. "aten::index.Tensor"
        op = name.split("::")[-1].split(".")[0]
        c = self.counter
        c.n_ops += 1
        c.op_names[name] = c.op_names.get(name, 0) + 1
        if op in SYNC_OPS:
            c.syncs.append(name)
        elif op in ("index", "index_put", "index_put_", "_index_put_impl_") and _is_bool_index(args):
            c.syncs.append(name + " (bool mask)")
        elif op == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor) and (
                len(args) > 1 and isinstance(args[1], torch.Tensor) or func.name().endswith(".Tensor")):
            c.syncs.append(name + " (tensor repeats)")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: "OpCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        read = _READS.get(func)
        if read is not None:
            self.counter.syncs.append(read)
        return func(*args, **(kwargs or {}))


class OpCounter:
    """``with OpCounter() as c:`` counts the aten operators (``c.n_ops``, per name in ``c.op_names``)
    and lists the host syncs (``c.syncs``) dispatched inside the block. Re-entrant per instance is
    not supported; nest two instances instead."""

    def __init__(self) -> None:
        self.n_ops = 0
        self.op_names: dict[str, int] = {}
        self.syncs: list[str] = []
        self._modes: list = []

    @property
    def n_syncs(self) -> int:
        return len(self.syncs)

    def __enter__(self) -> "OpCounter":
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for s in self.syncs:
            kinds[s] = kinds.get(s, 0) + 1
        return f"{self.n_ops} ops, {self.n_syncs} host syncs" + (
            f" ({', '.join(f'{k} x{v}' for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))})" if kinds else "")
