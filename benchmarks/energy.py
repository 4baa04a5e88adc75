"""Energy cost and peak-power violations of energy-naive and tariff-aware speed scheduling.

Each policy runs the same shifts of a plant (default: the demo plant, 20 seeds, each its
config's horizon): the same orders, initial machine condition and first failure draws.
Both dispatch by MWKR and run machines to failure, so speed is the only difference:

* ``naive``: ``rule:mwkr+max``, every operation at maximum speed, throughput first,
  ignoring the tariff and the peak cap;
* ``tariff-aware``: ``rule:mwkr+tariff``, speed from the time-of-use price and the
  backlog (``price * speed**b`` equalised over the shift), never starting an operation
  that would take the plant over its peak cap.

Energy cost is the shift's energy weighted by the hourly tariff (base load included),
throughput is good parts per shift, and a cap violation is each time plant power rises
above the cap. The target: tariff-aware at least 10% cheaper than naive on the mean
cost, with zero cap violations on every seed, and throughput (mean good parts) no more
than 5% below naive. Nominal speed (``rule:mwkr``) is printed too, informative only.

Run from the repository root::

    python benchmarks/energy.py                 # demo plant, seeds 0-19
    python benchmarks/energy.py --check         # exit 1 if the target is missed
    python benchmarks/energy.py --seeds 100 --json energy.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from common import (
    environment_info,
    header,
    markdown_table,
    parse_policy_args,
    policy_parser,
    run_policies,
    write_report,
)

from autofab.envs.plant import compile_plant

#: Label and spec of each policy; the first two are compared, the last is informative.
POLICIES = {
    "naive": "rule:mwkr+max",
    "tariff-aware": "rule:mwkr+tariff",
    "nominal": "rule:mwkr",
}
NAIVE, TARIFF, NOMINAL = POLICIES


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per-shift figures of one policy over the seeds."""
    cost = [float(k["energy_cost"]) for k in runs]
    return {
        "cost_median": statistics.median(cost),
        "cost_mean": statistics.fmean(cost),
        "energy_kwh_mean": statistics.fmean(k["energy_kwh"] for k in runs),
        "peak_kw_max": max(k["peak_kw"] for k in runs),
        "cap_violations_total": sum(k["cap_violations"] for k in runs),
        "seeds_with_violations": sum(k["cap_violations"] > 0 for k in runs),
        "over_cap_s_mean": statistics.fmean(k["over_cap_s"] for k in runs),
        "parts_mean": statistics.fmean(k["parts_good"] for k in runs),
        "scrap_mean": statistics.fmean(k["parts_scrap"] for k in runs),
    }


def table(summaries: dict[str, dict[str, float]], currency: str, cap_kw: float) -> str:
    rows = [
        [
            name,
            POLICIES[name],
            f"{s['cost_median']:.2f}",
            f"{s['cost_mean']:.2f}",
            f"{s['energy_kwh_mean']:.1f}",
            f"{s['peak_kw_max']:.1f}",
            f"{s['cap_violations_total']:d}",
            f"{s['seeds_with_violations']:d}",
            f"{s['over_cap_s_mean']:.0f}",
            f"{s['parts_mean']:.2f}",
            f"{s['scrap_mean']:.2f}",
        ]
        for name, s in summaries.items()
    ]
    header = [
        "policy",
        "spec",
        f"cost {currency} median",
        f"cost {currency} mean",
        "energy kWh mean",
        f"peak kW max (cap {cap_kw:g})",
        "cap violations",
        "seeds over cap",
        "over cap s mean",
        "parts good mean",
        "scrap mean",
    ]
    return markdown_table(header, rows)


def verdict(
    summaries: dict[str, dict[str, float]],
    n_seeds: int,
    cost_target: float,
    throughput_target: float,
) -> tuple[bool, list[str]]:
    """Whether the target is met, and the lines that say so."""
    naive, tariff, nominal = (summaries[k] for k in (NAIVE, TARIFF, NOMINAL))
    cut = 1 - tariff["cost_mean"] / naive["cost_mean"]
    cheaper = cut >= cost_target
    violations = tariff["cap_violations_total"]
    throughput = tariff["parts_mean"] / naive["parts_mean"] - 1
    kept = throughput >= -throughput_target
    met = cheaper and violations == 0 and kept
    lines = [
        f"energy cost, tariff-aware vs naive: {tariff['cost_mean']:.2f} vs "
        f"{naive['cost_mean']:.2f}, {cut:.1%} lower (target >= {cost_target:.0%}): "
        f"{'met' if cheaper else 'NOT met'}",
        f"cap violations, tariff-aware: {violations} over {n_seeds} seeds "
        f"(target 0): {'met' if violations == 0 else 'NOT met'}",
        f"throughput, tariff-aware vs naive: {tariff['parts_mean']:.2f} vs "
        f"{naive['parts_mean']:.2f} good parts, {throughput:+.1%} (target >= "
        f"-{throughput_target:.0%}): {'met' if kept else 'NOT met'}",
        f"target: {'met' if met else 'NOT met'}",
        f"(informative: tariff-aware vs nominal speed: cost "
        f"{tariff['cost_mean'] / nominal['cost_mean'] - 1:+.1%}, throughput "
        f"{tariff['parts_mean'] / nominal['parts_mean'] - 1:+.1%})",
    ]
    return met, lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = policy_parser(
        "Energy cost, cap violations and throughput of energy-naive and "
        "tariff-aware speed scheduling on the same seeds."
    )
    parser.add_argument("--cost-target", type=float, default=0.10, help="least cost cut vs naive")
    parser.add_argument(
        "--throughput-target", type=float, default=0.05, help="most throughput loss vs naive"
    )
    return parse_policy_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = environment_info()
    print(header(info))
    plant = compile_plant(args.plant)
    seeds = args.seed_list
    runs = run_policies(plant, POLICIES, seeds, args.horizon_s)
    summaries = {name: summarise(r) for name, r in runs.items()}
    energy = args.plant.energy
    horizon = args.horizon or args.plant.horizon
    print(
        f"\nplant {args.plant.name}, seeds {seeds[0]}-{seeds[-1]}, {horizon} shifts from "
        f"{args.plant.shift_start_hour:g}:00; per shift; MWKR dispatch, run to failure"
    )
    print(table(summaries, energy.currency, energy.peak_cap_kw))
    met, lines = verdict(summaries, len(seeds), args.cost_target, args.throughput_target)
    print("\n".join(lines))
    if args.json is not None:
        report = {
            "environment": info,
            "settings": {
                "config": args.plant.name,
                "seeds": seeds,
                "horizon": horizon,
                "cost_target": args.cost_target,
                "throughput_target": args.throughput_target,
            },
            "specs": POLICIES,
            "summaries": summaries,
            "runs": runs,
            "target_met": met,
        }
        write_report(args.json, report)
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
