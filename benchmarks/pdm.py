"""RUL error of the predictive-maintenance estimator against two named baselines.

Each repeat simulates disjoint blocks of seeds of the demo plant, kept busy with
``run_to_failure_config`` and never maintained: ``--train`` seeds to fit on, then ``--test``
held-out seeds to score on. Three models are fitted on the same training rows and scored
on the same test rows, in the same run:

* **autofab** ``RulEstimator``: the Gompertz proportional-hazards model of
  ``autofab.agents.policies.pdm``, fitted with censoring;
* **(a) training mean**: the mean RUL of the uncensored training rows, for every row;
* **(b) linear on raw vibration**: a least-squares line from the latest speed-normalised
  vibration reading to RUL.

Scores are RMSE and MAE of RUL in running hours over the test rows whose breakdown was
seen (censored rows have no true RUL; the long ``--follow-up-h`` keeps them rare, and their
share is printed). The table shows the median over repeats with [min-max], and the ratio
of the estimator's median RMSE to each baseline's.

Diagnostics, which are not baselines: the Pearson correlation of the estimated health
with the model's hidden true health; the RMSE of an oracle that predicts the mean residual
life from the *true* health with the simulated plant's own physics (the floor that random
failure times leave); and the RMSE of the estimator left at its prior, the config's
physics, untrained. ``--mismatch`` simulates machines that differ from the datasheet the
estimator is given, which shows what training buys when the datasheet is wrong.

Run from the repository root::

    python benchmarks/pdm.py                      # 10 train + 5 test seeds, 3 repeats
    python benchmarks/pdm.py --train 20 --test 10 --repeats 5 --json pdm.json
    python benchmarks/pdm.py --mismatch           # the datasheet is wrong
    python benchmarks/pdm.py --check              # exit 1 unless RMSE beats the mean
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from autofab.agents.policies.pdm import (
    PHYSICS_PRIOR,
    Dataset,
    MachineSpecs,
    MeanRulBaseline,
    RulEstimator,
    VibrationRulBaseline,
    run_to_failure_config,
    score_rul,
    simulate_run_to_failure,
)
from autofab.envs.plant import PlantArrays, PlantConfig, compile_plant

OURS = "autofab RulEstimator"
MEAN = "(a) training mean"
VIB = "(b) linear on raw vibration"
MODELS = (OURS, MEAN, VIB)
ORACLE = "oracle (true health)"
PRIOR = "config physics, untrained"


@dataclass
class Repeat:
    """One repeat's seeds, data sizes and scores."""

    train_seeds: list[int]
    test_seeds: list[int]
    train_rows: int
    train_breakdowns: int
    train_censored: float
    test_rows: int
    test_censored: float
    rmse: dict[str, float]
    mae: dict[str, float]
    health_r: float
    oracle_rmse: float
    untrained_rmse: float
    coefficients: dict[str, float]
    seconds: float


def _oracle_rul(test: Dataset, truth: MachineSpecs) -> np.ndarray:
    """Mean residual life from the true health under the simulated plant's own physics
    (a diagnostic: it reads the hidden health, and the true plant where it differs from
    the datasheet)."""
    physics = RulEstimator(PHYSICS_PRIOR[:3], PHYSICS_PRIOR[3:])
    f = test.features.copy()
    col = test.feature_names.index
    m = test.machine
    f[:, col("wear_estimate")] = 1.0 - test.true_health
    f[:, col("log_base_hazard_per_h")] = np.log(np.maximum(truth.base_hazard_per_h[m], 1e-12))
    f[:, col("hazard_sensitivity")] = truth.hazard_sensitivity[m]
    # wear_rate_per_h is rate * speed**exponent; the benchmark runs at nominal speed 1.
    f[:, col("wear_rate_per_h")] = truth.wear_per_h[m]
    return physics.predict_rul(f)


def mismatched(config: PlantConfig) -> PlantConfig:
    """The plant as it "really" is when its datasheet is wrong: every machine type fails
    twice as often at the same health, more steeply with wear (sensitivity + 1), and wears
    20 % slower than its config says."""
    types = {}
    for name, t in config.machine_types.items():
        failure = t.failure.model_copy(
            update={
                "base_rate_per_hour": 2.0 * t.failure.base_rate_per_hour,
                "health_sensitivity": t.failure.health_sensitivity + 1.0,
            }
        )
        wear = t.wear.model_copy(update={"rate_per_hour": 0.8 * t.wear.rate_per_hour})
        types[name] = t.model_copy(update={"failure": failure, "wear": wear})
    return config.model_copy(update={"machine_types": types})


def run_repeat(
    index: int, args: argparse.Namespace, plant: PlantArrays, datasheet: PlantArrays
) -> tuple[Repeat, Dataset, dict[str, np.ndarray]]:
    """Simulate one block of seeds, fit every model on its training runs, score the rest."""
    block = args.train + args.test
    first = args.seed + index * block
    train_seeds = list(range(first, first + args.train))
    test_seeds = list(range(first + args.train, first + block))
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {
        "horizon_s": args.horizon_h * 3600.0,
        "sample_every_s": args.sample_every_min * 60.0,
        "datasheet": datasheet,
    }
    train = simulate_run_to_failure(
        plant, train_seeds, follow_up_s=args.train_follow_up_h * 3600.0, **kwargs
    )
    test = simulate_run_to_failure(
        plant, test_seeds, follow_up_s=args.follow_up_h * 3600.0, **kwargs
    )
    ours = RulEstimator().fit(train)
    predictions = {
        OURS: ours.predict_rul(test.features),
        MEAN: MeanRulBaseline().fit(train).predict_rul(test.features),
        VIB: VibrationRulBaseline().fit(train).predict_rul(test.features),
    }
    scores = {name: score_rul(p, test) for name, p in predictions.items()}
    seen = ~test.censored
    health_r = float(
        np.corrcoef(ours.predict_health(test.features)[seen], test.true_health[seen])[0, 1]
    )
    oracle = score_rul(_oracle_rul(test, MachineSpecs.from_plant(plant)), test).rmse_h
    prior = RulEstimator(PHYSICS_PRIOR[:3], PHYSICS_PRIOR[3:]).predict_rul(test.features)
    untrained = score_rul(prior, test).rmse_h
    assert ours.training is not None
    rep = Repeat(
        train_seeds=train_seeds,
        test_seeds=test_seeds,
        train_rows=len(train),
        train_breakdowns=ours.training.breakdowns,
        train_censored=float(train.censored.mean()),
        test_rows=scores[OURS].rows,
        test_censored=float(test.censored.mean()),
        rmse={k: s.rmse_h for k, s in scores.items()},
        mae={k: s.mae_h for k, s in scores.items()},
        health_r=health_r,
        oracle_rmse=oracle,
        untrained_rmse=untrained,
        coefficients=ours.coefficients,
        seconds=time.perf_counter() - t0,
    )
    return rep, test, predictions


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _span(values: Sequence[float], digits: int = 2) -> str:
    return f"{_median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def header() -> str:
    versions = " | ".join(
        f"{pkg} {metadata.version(pkg)}" for pkg in ("numpy", "pydantic", "autofab")
    )
    return (
        f"python {platform.python_version()} | {versions} | CPUs {os.cpu_count()}\n"
        f"command: {shlex.join(['python', *sys.argv])}"
    )


def report(
    args: argparse.Namespace,
    plant: PlantArrays,
    repeats: list[Repeat],
    tests: list[Dataset],
    predictions: list[dict[str, np.ndarray]],
) -> dict[str, Any]:
    """Print the tables (plain text on stdout, pasteable) and return every figure."""
    cfg = plant.config
    print(header())
    print(
        f"plant: {cfg.name} via run_to_failure_config(load={args.load:g}): "
        f"{cfg.orders.rate_per_hour:.1f} orders/h, {cfg.orders.initial} initial, supply off; "
        f"first-candidate dispatch, no maintenance"
    )
    if args.mismatch:
        print(
            "mismatch: the simulated machines fail 2x as often, with sensitivity + 1 and "
            "20 % slower wear, than the datasheet the features and prior are computed from"
        )
    print(
        f"runs: sampled {args.horizon_h:g} h every {args.sample_every_min:g} min, then "
        f"{args.train_follow_up_h:g} h (train) / {args.follow_up_h:g} h (test) more to see "
        f"late breakdowns"
    )
    print()
    print(
        "| repeat | train seeds | rows | breakdowns | censored | test seeds | scored rows "
        "| censored | seconds |"
    )
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|")
    for i, r in enumerate(repeats):
        print(
            f"| {i} | {r.train_seeds[0]}-{r.train_seeds[-1]} | {r.train_rows} | "
            f"{r.train_breakdowns} | {r.train_censored:.1%} | "
            f"{r.test_seeds[0]}-{r.test_seeds[-1]} | {r.test_rows} | {r.test_censored:.1%} | "
            f"{r.seconds:.1f} |"
        )
    print()
    print(
        f"RUL error on held-out seeds, running hours, median [min-max] over "
        f"{len(repeats)} repeats; ratio = autofab median RMSE / this model's"
    )
    print()
    print("| model | RMSE (h) | MAE (h) | ratio |")
    print("|---|---:|---:|---:|")
    ours_rmse = _median([r.rmse[OURS] for r in repeats])
    summary: dict[str, Any] = {}
    for name in MODELS:
        rmse = [r.rmse[name] for r in repeats]
        mae = [r.mae[name] for r in repeats]
        ratio = ours_rmse / _median(rmse)
        summary[name] = {"rmse_h": _median(rmse), "mae_h": _median(mae), "ratio": ratio}
        print(f"| {name} | {_span(rmse)} | {_span(mae)} | {ratio:.2f}x |")
    print()
    health = [r.health_r for r in repeats]
    oracle = [r.oracle_rmse for r in repeats]
    print("Diagnostics (not baselines; the first two read the hidden true health):")
    print(f"  estimated vs true health, Pearson r: {_span(health, 3)}")
    untrained = [r.untrained_rmse for r in repeats]
    print(f"  oracle RMSE (mean residual life from the true health): {_span(oracle)} h")
    print(f"  {PRIOR} (the fit's starting point and prior): RMSE {_span(untrained)} h")
    coef = {k: _median([r.coefficients[k] for r in repeats]) for k in repeats[0].coefficients}
    print(
        "  fitted coefficients, median (the config's own physics is 0, 1, 1, 1): "
        + ", ".join(f"{k} {v:.3f}" for k, v in coef.items())
    )
    print()
    print("RMSE per machine (h), test rows of all repeats pooled:")
    print()
    pooled = Dataset.concatenate(tests)
    pooled_pred = {n: np.concatenate([p[n] for p in predictions]) for n in MODELS}
    truth = MachineSpecs.from_plant(plant)
    pooled_pred[ORACLE] = np.concatenate([_oracle_rul(t, truth) for t in tests])
    cols = (*MODELS, ORACLE)
    print("| machine | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    per_machine: dict[str, dict[str, float]] = {}
    for m, name in enumerate(pooled.machine_names):
        rows = pooled.machine == m
        sub = pooled.select(rows)
        if sub.censored.all():
            continue
        per_machine[name] = {c: score_rul(pooled_pred[c][rows], sub).rmse_h for c in cols}
        print(f"| {name} | " + " | ".join(f"{per_machine[name][c]:.2f}" for c in cols) + " |")
    return {
        "header": header(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "health_r_median": _median(health),
        "oracle_rmse_median": _median(oracle),
        "untrained_rmse_median": _median(untrained),
        "coefficients_median": coef,
        "per_machine_rmse_pooled": per_machine,
        "repeats": [r.__dict__ for r in repeats],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10, help="training seeds per repeat")
    p.add_argument("--test", type=int, default=5, help="held-out seeds per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats on disjoint seed blocks")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--horizon-h", type=float, default=48.0, help="sampled plant hours per run")
    p.add_argument(
        "--follow-up-h",
        type=float,
        default=72.0,
        help="hours run after sampling in test runs, to see late breakdowns",
    )
    p.add_argument(
        "--train-follow-up-h",
        type=float,
        default=None,
        help="the same for training runs (default: --follow-up-h)",
    )
    p.add_argument("--sample-every-min", type=float, default=5.0, help="sampling interval")
    p.add_argument("--load", type=float, default=1.2, help="order load on the bottleneck")
    p.add_argument(
        "--mismatch",
        action="store_true",
        help="simulate machines that differ from their datasheet (see mismatched())",
    )
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument(
        "--check", action="store_true", help="exit 1 unless the RMSE beats the training mean"
    )
    args = p.parse_args(argv)
    if args.train_follow_up_h is None:
        args.train_follow_up_h = args.follow_up_h
    for name in ("train", "test", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nominal = run_to_failure_config("demo", load=args.load)
    datasheet = compile_plant(nominal)
    plant = compile_plant(mismatched(nominal)) if args.mismatch else datasheet
    repeats: list[Repeat] = []
    tests: list[Dataset] = []
    predictions: list[dict[str, np.ndarray]] = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("simulating, fitting, scoring", total=args.repeats)
        for i in range(args.repeats):
            rep, test, pred = run_repeat(i, args, plant, datasheet)
            repeats.append(rep)
            tests.append(test)
            predictions.append(pred)
            progress.advance(task)
    result = report(args, plant, repeats, tests, predictions)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if args.check and result["summary"][MEAN]["ratio"] >= 1.0:
        print("check failed: the estimator does not beat the training mean", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
