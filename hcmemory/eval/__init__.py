"""``hcmemory eval``: RULER-style tasks generated offline, every method on the same prompts, both
memory axes measured, results cached per cell, reports with intervals and plots.

``tasks`` makes the haystacks and scores answers, ``fillers`` the text around the needles,
``methods`` the caches compared (hcmemory presets, DynamicCache, quanto, kvpress), ``runner`` the
resumable grid and ``report`` the tables, plots and ``docs/RESULTS.md``.
"""

from .fillers import FILLERS, REAL_FILLERS
from .report import write_report
from .runner import STANDARD_LENGTHS, STANDARD_METHODS, Plan, run
from .tasks import TASKS, make_case, score

__all__ = ["FILLERS", "REAL_FILLERS", "STANDARD_LENGTHS", "STANDARD_METHODS", "TASKS", "Plan", "make_case", "run", "score", "write_report"]
