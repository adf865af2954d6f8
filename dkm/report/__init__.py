"""Figures and the static HTML report of a results store."""

from dkm.report.html import report_dir, write_report

__all__ = ["report_dir", "write_report"]
