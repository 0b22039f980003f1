"""What loading a prompt source did, and the one line the run log gets about it."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

from selfdistill.data.files import LoadReport


@dataclass
class SourceReport(LoadReport):
    """`LoadReport` plus problems the config leaves out on purpose (not bad rows), counted by reason."""

    left_out: Counter = field(default_factory=Counter)


def log_report(label: str, report: LoadReport, file=None) -> str | None:
    """Print (to stderr) and return one line when rows were bad or left out; None when all were used."""
    left_out = getattr(report, "left_out", None) or {}
    if not report.skipped and not left_out:
        return None
    parts = [f"{report.rows} rows read, {report.loaded} problems"]
    if report.skipped:
        parts.append(f"{report.skipped} bad rows skipped (first: {report.errors[0]})")
    if left_out:
        parts.append("left out: " + ", ".join(f"{n} {reason}" for reason, n in left_out.items()))
    line = f"selfdistill: data: {label}: " + "; ".join(parts)
    print(line, file=file or sys.stderr)
    return line
