"""Values computed from a tensor's contents, kept while the tensor lives and is not changed.

An encoder passes the same cu_seqlens and layout tensors to every layer: what is derived from
their values on the host (checks, plans) is computed once, not once per layer.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Hashable


def version(tensor) -> int | None:
    """The tensor's version counter (moved by in-place changes); None for inference tensors, which
    have none (and cannot be changed outside inference mode)."""
    return None if tensor.is_inference() else tensor._version


@dataclasses.dataclass
class _Entry:
    ref: weakref.ref
    version: int | None
    values: dict


class TensorCache:
    """``get(tensor, key, compute)``: ``compute()`` once per (tensor, key), again after the tensor
    changes in place (its version counter moves); entries go when the tensor does."""

    def __init__(self):
        self._entries: dict[int, _Entry] = {}

    def get(self, tensor, key: Hashable, compute: Callable):
        current = version(tensor)
        entry = self._entries.get(id(tensor))
        if entry is None or entry.ref() is not tensor or entry.version != current:
            entry = _Entry(weakref.ref(tensor, self._forget(id(tensor))), current, {})
            self._entries[id(tensor)] = entry
        if key not in entry.values:
            entry.values[key] = compute()
        return entry.values[key]

    def contains(self, tensor, key: Hashable) -> bool:
        """Whether ``get(tensor, key, ...)`` would return a kept value without computing one."""
        entry = self._entries.get(id(tensor))
        return (entry is not None and entry.ref() is tensor and entry.version == version(tensor)
                and key in entry.values)

    def discard(self, tensor, key: Hashable):
        """Forgets the value kept for (tensor, key), if any (those who hold it keep it)."""
        entry = self._entries.get(id(tensor))
        if entry is not None and entry.ref() is tensor:
            entry.values.pop(key, None)

    def _forget(self, tensor_id: int):
        def forget(ref):
            entry = self._entries.get(tensor_id)
            if entry is not None and entry.ref is ref:
                del self._entries[tensor_id]

        return forget
