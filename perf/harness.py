"""Moved to :mod:`perf.tools` (split by job: record, agreement, timing, runner, sweep, ...).

Kept only for ``tests/test_fusion.py``'s ``from perf.harness import saved_tensor_bytes``
until that line reads ``from perf.tools import saved_tensor_bytes``; then delete this file.
"""

from perf.tools.saved_meter import saved_tensor_bytes  # noqa: F401
