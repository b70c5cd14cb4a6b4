"""Test models for the decision tools (``tests.decision_models:NAME``).

- ``oom_above_3``: forward raises ``torch.OutOfMemoryError`` for micro-batches above 3, a
  threshold that is not a power of two, so the batch finder's binary search has to find it.
"""
from __future__ import annotations

from tests.helper_models import _make_batch, _OOMAbove


def oom_above_3():
    """Raises torch.OutOfMemoryError in forward for micro-batches above 3."""
    return _OOMAbove(3), _make_batch
