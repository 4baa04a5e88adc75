"""Improvement mode: CP-SAT seeded with a dispatcher's schedule, and its benchmark script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autofab.agents.policies.cpsat import solve_cpsat
from autofab.agents.policies.evaluation import (
    CPSAT,
    IMPROVE,
    _run_rule,
    evaluate,
    improve_schedule,
    parse_methods,
)
from autofab.envs.instances import load_benchmark
from autofab.envs.rules import RULES

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["ft06", "la01"])
@pytest.mark.parametrize("rule", ["spt", "mwkr"])
def test_improve_is_never_worse_than_its_seed(name, rule):
    inst = load_benchmark(name)
    seed = _run_rule(inst, rule)
    result = improve_schedule(inst, [seed], 1.0, workers=2)
    assert result.makespan <= seed.makespan
    assert result.seed == rule
    assert result.seed_makespan == seed.makespan


def test_improve_picks_the_best_seed():
    inst = load_benchmark("la01")
    seeds = [_run_rule(inst, r) for r in RULES]
    result = improve_schedule(inst, seeds, 0.5, workers=1)
    best = min(seeds, key=lambda r: r.makespan)
    assert result.seed == best.method
    assert result.makespan <= best.makespan


def test_a_complete_hint_bounds_the_objective():
    # One worker and a short budget: the hint is the first incumbent and an upper bound.
    inst = load_benchmark("ta11")
    seed = _run_rule(inst, "mwkr")
    result = solve_cpsat(inst, 0.5, workers=1, hint=seed.schedule)
    assert result.makespan <= seed.makespan


def test_improve_falls_back_to_its_seed_when_cpsat_has_no_time():
    # Too short for CP-SAT to get past presolve: it finds nothing, the seed is reported.
    inst = load_benchmark("ta11")
    seed = _run_rule(inst, "mwkr")
    result = improve_schedule(inst, [seed], 0.001, workers=1)
    assert (result.makespan, result.status) == (seed.makespan, "SEED")
    assert result.schedule == seed.schedule


def test_improve_needs_a_seed():
    with pytest.raises(ValueError, match="at least one seed"):
        improve_schedule(load_benchmark("ft06"), [], 1.0, workers=1)


def test_evaluate_reports_improve_with_its_seed():
    doc = evaluate(["ft06"], ["mwkr"], 0.5, improve_s=0.5, workers=1)
    entry = doc["instances"]["ft06"]["methods"][IMPROVE]
    assert doc["settings"]["methods"] == ["mwkr", IMPROVE]
    assert doc["settings"]["improve_s"] == 0.5
    assert entry["seed"] in RULES
    assert entry["makespan"] <= entry["seed_makespan"]
    assert entry["makespan"] == 55


def test_improve_is_a_method_name():
    assert parse_methods("cpsat,improve") == [CPSAT, IMPROVE]


def test_dispatch_quality_runs_on_two_instances(tmp_path):
    out = tmp_path / "q.json"
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/dispatch_quality.py",
            "--instances",
            "ft06,la01",
            "--time-limit",
            "0.2",
            "--workers",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "| mean " in run.stdout
    assert "p99 decision time" in run.stdout
    assert out.is_file()
