"""Schedule quality on Taillard's ta01-ta20: dispatching rules, CP-SAT, and improvement.

One run of :func:`autofab.agents.policies.evaluation.evaluate` over the instances, with
every dispatching rule, ``cpsat`` (CP-SAT alone, ``--time-limit`` seconds per instance)
and ``improve`` (CP-SAT for the same time, seeded with the best rule's or policy's
schedule), plus a policy: the shipped dispatcher unless ``--policy`` names another. It
prints the versions and CPUs, the command, the gap of every method on every instance, the
mean gap per method, and the p99 decision time of the policy and the rules.

The question it answers: does seeding CP-SAT with a dispatcher's schedule beat CP-SAT
alone at the same budget? Both run with the same workers and random seed; CP-SAT's result
depends on both and on the machine's load, so the header records them.

Run from the repository root::

    python benchmarks/dispatch_quality.py                          # ta01-ta20, 10 s each
    python benchmarks/dispatch_quality.py --time-limit 5 --json q.json
    python benchmarks/dispatch_quality.py --policy runs/<run> --instances ta01-ta10
    python benchmarks/dispatch_quality.py --instances random:20x20:5,random:30x20:5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import environment_info, header, markdown_table, write_report
from rich.console import Console
from rich.progress import Progress

from autofab.agents.policies.artifacts import load_policy, resolve_policy_path
from autofab.agents.policies.evaluation import (
    CPSAT,
    IMPROVE,
    POLICY,
    SAMPLED,
    MethodResult,
    PolicyFn,
    evaluate,
    expand_instances,
    policy_delays,
)
from autofab.envs.instances import InstanceError
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.rules import RULES

DEFAULT_INSTANCES = "ta01-ta20"


def _policy_factory(spec: str) -> Callable[[JobShopEnv], PolicyFn]:
    """``--policy``: ``default`` (the shipped dispatcher), a dispatcher ``.npz`` file, or a
    training run folder, through the same loader ``autofab evaluate`` uses."""
    path = resolve_policy_path(spec)
    return lambda env: load_policy(path, env)  # type: ignore[return-value]


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _group(name: str) -> str:
    """Where an instance is summarised: ta01-ta10, ta11-ta20, random-20x20, ..."""
    if name.startswith("random-"):
        return name.rsplit("-", 1)[0]
    if name.startswith("ta") and name[2:].isdigit():
        lo = (int(name[2:]) - 1) // 10 * 10 + 1
        return f"ta{lo:02d}-ta{lo + 9:02d}"
    return "other"


def improve_vs_cpsat(doc: dict[str, Any]) -> list[list[str]]:
    """Per group: how often improve's makespan beats, ties and loses to CP-SAT's, and the
    mean makespan ratio improve / cpsat (below 1: improve is better)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for name, entry in doc["instances"].items():
        m = entry["methods"]
        groups.setdefault(_group(name), []).append((m[IMPROVE]["makespan"], m[CPSAT]["makespan"]))
    rows = []
    for group, pairs in groups.items():
        better = sum(i < c for i, c in pairs)
        ties = sum(i == c for i, c in pairs)
        ratio = sum(i / c for i, c in pairs) / len(pairs)
        rows.append(
            [
                group,
                str(len(pairs)),
                str(better),
                str(ties),
                str(len(pairs) - better - ties),
                f"{ratio:.4f}",
            ]
        )
    return rows


def report(doc: dict[str, Any]) -> str:
    """Per instance: gap to best known (or the makespan where none is known); the mean
    gaps, the p99 decision times, and improve against CP-SAT per instance group."""
    methods: list[str] = doc["settings"]["methods"]
    rows = []
    for name, entry in doc["instances"].items():
        known = entry["best_known"]
        cells = [name, str(known or "-")]
        for m in methods:
            result = entry["methods"][m]
            cells.append(_percent(result["gap"]) if known else f"{result['makespan']:g}")
        improve = entry["methods"].get(IMPROVE)
        cells.append(improve["seed"] if improve else "-")
        rows.append(cells)
    rows.append(["mean gap", ""] + [_percent(doc["mean_gap"][m]) for m in methods] + [""])
    table = markdown_table(["instance", "best known", *methods, "improve seed"], rows, left=2)
    latency = [
        [m, f"{max(e['methods'][m]['decision_ms_p99'] for e in doc['instances'].values()):.3f}"]
        for m in methods
        if m not in (CPSAT, IMPROVE, SAMPLED)
    ]
    if SAMPLED in methods:
        step = max(e["methods"][SAMPLED]["step_ms_p99"] for e in doc["instances"].values())
        seconds = max(e["methods"][SAMPLED]["seconds"] for e in doc["instances"].values())
        latency.append([f"{SAMPLED} (one step of all samples)", f"{step:.3f}"])
        latency.append([f"{SAMPLED} (whole schedule, s, worst instance)", f"{seconds:.3f}"])
    lines = [
        "gap to best known, % (lower is better); makespan where no best is known",
        table,
        "",
        "p99 decision time, ms (worst instance)",
        markdown_table(["method", "p99 ms"], latency, left=1),
    ]
    if CPSAT in methods and IMPROVE in methods:
        lines += [
            "",
            "improve against cpsat at the same budget (makespans)",
            markdown_table(
                ["group", "instances", "improve better", "ties", "cpsat better", "mean ratio"],
                improve_vs_cpsat(doc),
                left=1,
            ),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--instances", default=DEFAULT_INSTANCES, help="names and ranges")
    parser.add_argument(
        "--time-limit", type=float, default=10.0, help="CP-SAT seconds per instance"
    )
    parser.add_argument(
        "--improve", type=float, help="improve's CP-SAT seconds (default: --time-limit)"
    )
    parser.add_argument("--workers", type=int, help="CP-SAT workers (default: usable CPUs)")
    parser.add_argument(
        "--policy",
        default="default",
        help="'default' (the shipped dispatcher), a run folder, a dispatcher .npz, or 'none'",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=64,
        help="also the best of K schedules sampled from the policy (0: not run)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    if not args.time_limit > 0:
        parser.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    try:
        names = expand_instances(args.instances)
    except InstanceError as exc:
        parser.error(str(exc))
    if args.policy == "none":
        args.policy = None
    factory = None if args.policy is None else _policy_factory(args.policy)
    info = environment_info("ortools", "torch")
    print(header(info), flush=True)
    methods = [*RULES, CPSAT, IMPROVE]
    samples = args.samples if factory is not None and args.samples > 0 else None
    n_methods = len(methods) + (factory is not None) + (samples is not None)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("evaluating", total=len(names) * n_methods)

        def advance(result: MethodResult) -> None:
            bar.update(task, advance=1, description=f"{result.instance} {result.method}")

        doc = evaluate(
            names,
            methods,
            args.time_limit,
            policy_factory=factory,
            workers=args.workers,
            on_result=advance,
            improve_s=args.improve,
            samples=samples,
        )
    settings = doc["settings"]
    delays = policy_delays(doc)
    on = "" if not delays else f" on delay schedules (delay={', '.join(map(str, delays))})"
    print(
        f"cpsat: {settings['time_limit_s']:g} s, improve: {settings['improve_s']:g} s, "
        f"{settings['cpsat_workers']} workers, seed {settings['cpsat_random_seed']}"
        + ("" if args.policy is None else f"; policy ({POLICY}): {args.policy}{on}")
        + ("" if samples is None else f"; sampled: best of {samples} policy schedules")
        + ("" if not delays else "; rules: non-delay")
    )
    print(report(doc))
    write_report(args.json, {"environment": info, **doc})
    return 0


if __name__ == "__main__":
    sys.exit(main())
