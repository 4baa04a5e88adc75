"""Learned bidding against the rule: KPIs of whole in-memory negotiations on held-out seeds.

What runs
---------
The demo plant negotiated in memory (:func:`autofab.agents.policies.bidding_policy.run_episode`:
scheduler, energy, supply, one host of the eight machine agents, the toy plant world):
6-12 orders with due dates, machines of random health, breakdowns drawn from the plant's
hazard law with luck shared by both policies on a seed. Each held-out seed is run twice,
with every machine on :class:`~autofab.agents.bidding.RuleBasedBidding` (the peer), and
with every machine on the learned policy (:class:`LearnedBidding`: the honest bid at the
machine's own speed or a pass, for a gate; the honest bid at the speed it chooses, or a
pass, for a speed chooser, and the machine then runs the operation at that speed). The
learned policy is the shipped file (``--policy default``), another file, or trained here
first (``--train``: a speed chooser over ``--speeds`` candidate speeds, or a gate with
``--speeds 0``; training seeds 0-23, validation seeds 100-123, held-out seeds from 1000,
so none overlap).

Figures: per policy the median over seeds of the cost (total tardiness in hours + energy
cost, one currency unit = one hour, the scheduler's exchange rate), of its two parts and
of breakdowns; the ratio of the medians (learned / rule); and per seed the paired
difference (learned - rule): its mean with its standard error, its median, and how many
seeds each side won.

Run from the repository root::

    python benchmarks/bidding_quality.py                     # shipped policy, seeds 1000-1099
    python benchmarks/bidding_quality.py --train --speeds 8 --json bidding.json
    python benchmarks/bidding_quality.py --check             # exit 1 if the mean cost is worse
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import environment_info, header, markdown_table, write_report
from rich.console import Console
from rich.progress import Progress

from autofab.agents.bidding import BiddingPolicy, RuleBasedBidding
from autofab.agents.policies.bidding_policy import (
    BiddingKpis,
    LearnedBidding,
    load_bidding_policy,
    run_episode,
    save_bidding_policy,
    train_bidding,
)

RULE = "rule (RuleBasedBidding)"
LEARNED = "learned (LearnedBidding)"
#: The first validation seed (training seeds are 0..N-1, held-out ones from 1000).
VALIDATION_FIRST = 100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--policy", default="default", help="bidding .npz, or 'default'")
    parser.add_argument("--train", action="store_true", help="train a policy first")
    parser.add_argument("--train-seeds", type=int, default=24, help="training seeds 0..N-1")
    parser.add_argument(
        "--validation-seeds", type=int, default=24, help="validation seeds 100..100+N-1"
    )
    parser.add_argument("--iterations", type=int, default=20, help="CEM iterations")
    parser.add_argument("--population", type=int, default=16, help="CEM population")
    parser.add_argument("--elite", type=int, default=4, help="CEM elite size")
    parser.add_argument("--hidden", type=int, default=0, help="hidden tanh units (0: linear)")
    parser.add_argument(
        "--speeds", type=int, default=8, help="candidate speeds to train (0: a bid-or-pass gate)"
    )
    parser.add_argument("--max-passes", type=int, default=2, help="passes per operation")
    parser.add_argument("--init-std", type=float, default=1.0, help="CEM initial std")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search")
    parser.add_argument("--save", type=Path, help="write the trained policy here")
    parser.add_argument("--seeds", type=int, default=100, help="held-out seeds")
    parser.add_argument("--first-seed", type=int, default=1000, help="first held-out seed")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 if learned is worse")
    args = parser.parse_args(argv)
    if (
        args.train_seeds > VALIDATION_FIRST
        or args.first_seed < VALIDATION_FIRST + args.validation_seeds
    ):
        parser.error(
            f"seeds must not overlap: training 0..{args.train_seeds - 1}, validation "
            f"{VALIDATION_FIRST}..{VALIDATION_FIRST + args.validation_seeds - 1}, held-out "
            f"from {args.first_seed}"
        )
    return args


def learned_policy(args: argparse.Namespace, console: Console) -> LearnedBidding:
    if not args.train:
        policy = load_bidding_policy(args.policy)
        if not isinstance(policy, LearnedBidding):
            raise SystemExit(f"--policy {args.policy!r} is not a learned bidding policy")
        return policy
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("training (CEM)", total=args.iterations)
        result = train_bidding(
            range(args.train_seeds),
            iterations=args.iterations,
            population=args.population,
            elite=args.elite,
            hidden=args.hidden,
            speeds=args.speeds,
            max_passes=args.max_passes,
            init_std=args.init_std,
            seed=args.seed,
            validation=range(VALIDATION_FIRST, VALIDATION_FIRST + args.validation_seeds),
            progress=lambda _it, _best: bar.advance(task),
        )
    console.print(
        f"trained in {result.seconds:.0f} s, {result.episodes} episodes; training-seed mean "
        f"cost {result.rule_cost:.3f} (rule), delta {result.best:+.3f} (kept policy); "
        f"validation delta {result.validation:+.3f}"
    )
    if args.save is not None:
        save_bidding_policy(result.policy, args.save, {"command": environment_info()["command"]})
        console.print(f"saved {args.save}")
    return result.policy


def run_all(
    makers: dict[str, Callable[[], BiddingPolicy]], seeds: Sequence[int], console: Console
) -> dict[str, list[BiddingKpis]]:
    runs: dict[str, list[BiddingKpis]] = {name: [] for name in makers}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("negotiating", total=len(makers) * len(seeds))
        for seed in seeds:  # interleaved, so machine load falls on both alike
            for name, make in makers.items():
                runs[name].append(run_episode(make(), seed))
                bar.advance(task)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    info = environment_info()
    print(header(info))
    policy = learned_policy(args, console)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    makers: dict[str, Callable[[], BiddingPolicy]] = {RULE: RuleBasedBidding, LEARNED: policy.fresh}
    runs = run_all(makers, seeds, console)
    incomplete = [k.seed for ks in runs.values() for k in ks if not k.completed]
    if incomplete:
        print(f"runs that did not finish every job (tardiness counted to the end): {incomplete}")

    def med(name: str, what: Callable[[BiddingKpis], float]) -> float:
        return statistics.median(what(k) for k in runs[name])

    columns: list[tuple[str, Callable[[BiddingKpis], float]]] = [
        ("cost (h)", lambda k: k.cost),
        ("tardiness (h)", lambda k: k.tardiness_hours),
        ("energy cost", lambda k: k.energy_cost),
        ("makespan (h)", lambda k: k.makespan_hours),
        ("breakdowns", lambda k: float(k.breakdowns)),
        ("passes", lambda k: float(k.passes)),
    ]
    rows = [[name, *(f"{med(name, f):.3f}" for _, f in columns)] for name in makers]
    rows.append(
        [
            "ratio learned / rule",
            *(
                f"{med(LEARNED, f) / med(RULE, f):.3f}" if med(RULE, f) > 0 else "-"
                for _, f in columns
            ),
        ]
    )
    print(f"\nmedians over {len(seeds)} held-out seeds {seeds[0]}-{seeds[-1]} (demo plant)")
    print(markdown_table(["policy", *(c for c, _ in columns)], rows, left=1))
    means = [
        [name, *(f"{statistics.fmean(f(k) for k in runs[name]):.3f}" for _, f in columns)]
        for name in makers
    ]
    print("\nmeans (small counts such as breakdowns read better here)")
    print(markdown_table(["policy", *(c for c, _ in columns)], means, left=1))
    delta = [a.cost - b.cost for a, b in zip(runs[LEARNED], runs[RULE], strict=True)]
    tard = [
        a.tardiness_hours - b.tardiness_hours
        for a, b in zip(runs[LEARNED], runs[RULE], strict=True)
    ]
    wins, losses = sum(d < -1e-9 for d in delta), sum(d > 1e-9 for d in delta)
    stderr = statistics.stdev(delta) / len(delta) ** 0.5 if len(delta) > 1 else float("nan")
    summary = {
        "mean_cost_delta": statistics.fmean(delta),
        "mean_cost_delta_stderr": stderr,
        "median_cost_delta": statistics.median(delta),
        "mean_tardiness_delta": statistics.fmean(tard),
        "learned_better": wins,
        "rule_better": losses,
        "ties": len(delta) - wins - losses,
    }
    print(
        f"\npaired, learned - rule: cost mean {summary['mean_cost_delta']:+.3f} h "
        f"(standard error {stderr:.3f}), median "
        f"{summary['median_cost_delta']:+.3f} h; tardiness mean "
        f"{summary['mean_tardiness_delta']:+.3f} h; learned better on {wins} seeds, "
        f"rule on {losses}, tied on {summary['ties']}"
    )
    report: dict[str, Any] = {
        "info": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "policy_meta": policy.meta,
        "seeds": seeds,
        "runs": {name: [{**vars(k), "cost": k.cost} for k in ks] for name, ks in runs.items()},
        "summary": summary,
    }
    write_report(args.json, report)
    if args.check and summary["mean_cost_delta"] > 0:
        print("check failed: the learned policy's mean cost is worse than the rule's")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
