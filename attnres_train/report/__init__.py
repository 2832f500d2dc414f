"""``attnres-report``: tables and plots comparing the runs of a sweep (or one run), from their run directories."""

from .collect import RunRecord, collect_runs

__all__ = ["RunRecord", "collect_runs"]
