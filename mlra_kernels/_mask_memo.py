"""Per-tensor memo for mask inspections.

Checking whether a mask is causal (or causal with key padding) reads it on the host: one device sync
on CUDA. Models pass the same mask tensor to every layer, so the answer is kept per tensor and per
question, and dropped when the tensor is freed, or changed in place by an operation that moves its
version counter (ordinary in-place ops do; writes through ``.data`` or a numpy view do not), or given
new storage. Inference tensors (``torch.inference_mode``) have no version counter and are not memoised.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

from torch import Tensor

# (question, id(mask)) -> (weakref to mask, version counter, data_ptr, answer)
_MEMO: dict[tuple[Hashable, int], tuple] = {}
_MEMO_SIZE = 32


def memo_by_tensor(question: Hashable, mask: Tensor, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered for this ``mask`` tensor and ``question`` until it is freed or mutated.

    ``question`` must hold everything else the answer depends on (for example the expected sizes).
    Inference tensors have no version counter, so they are never memoised.
    """
    if mask.is_inference():
        return compute()
    key = (question, id(mask))
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2] == mask.data_ptr():
        return hit[3]
    answer = compute()
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO), None), None)
    ref = weakref.ref(mask, lambda _, k=key: _MEMO.pop(k, None))
    _MEMO[key] = (ref, mask._version, mask.data_ptr(), answer)
    return answer
