"""CP-SAT reference solver: optimal on small benchmarks, flexible shops, hints, scaling."""

from __future__ import annotations

import gymnasium as gym
import pytest

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0)
from autofab.agents.policies.cpsat import CpSatResult, solve_cpsat, time_scale
from autofab.envs.instances import instance_from_dict, load_benchmark
from autofab.envs.rules import RulePolicy, run_episode
from autofab.envs.validate import validate_schedule

FLEXIBLE = {
    "name": "flex",
    "machines": [
        {"name": "mill-1", "capabilities": ["mill"]},
        {"name": "mill-2", "capabilities": ["mill"]},
        "lathe",
    ],
    "jobs": [
        {
            "operations": [
                {"capability": "mill", "durations": {"mill-1": 4, "mill-2": 6}},
                {"durations": {"lathe": 3}},
            ]
        },
        {
            "release": 1,
            "operations": [
                {"capability": "mill", "durations": {"mill-1": 5, "mill-2": 5}},
                {"capability": "mill", "durations": {"mill-1": 2, "mill-2": 3}},
            ],
        },
        {"operations": [{"durations": {"lathe": 2}}, {"durations": {"mill-1": 3, "mill-2": 1}}]},
    ],
}


def test_ft06_is_solved_to_its_optimum_55():
    inst = load_benchmark("ft06")
    result = solve_cpsat(inst, time_limit_s=5, workers=1)
    assert isinstance(result, CpSatResult)
    assert result.makespan == 55
    assert result.status == "OPTIMAL"
    assert result.workers == 1
    assert result.seconds < 5
    validate_schedule(inst, result.schedule)
    assert {"job", "index", "machine", "start", "end"} == set(result.schedule[0])
    starts = [e["start"] for e in result.schedule]
    assert starts == sorted(starts)


def test_flexible_instance_gives_a_valid_schedule_using_several_machines():
    inst = instance_from_dict(FLEXIBLE)
    assert inst.is_flexible
    result = solve_cpsat(inst, time_limit_s=2, workers=1)
    validate_schedule(inst, result.schedule)
    assert result.status == "OPTIMAL"
    assert result.makespan == max(e["end"] for e in result.schedule)
    env_makespan = run_episode(
        gym.make("autofab/JobShop-v0", instance=inst), RulePolicy("mwkr"), seed=0
    )["makespan"]
    assert result.makespan <= env_makespan


def test_fractional_times_are_scaled_and_reported_in_real_units():
    data = {
        "machines": ["a", "b"],
        "jobs": [
            {"operations": [{"durations": {"a": 2.5}}, {"durations": {"b": 1.25}}]},
            {"release": 0.5, "operations": [{"durations": {"b": 0.75, "a": 1.5}}]},
        ],
    }
    inst = instance_from_dict(data)
    assert time_scale(inst) == 100
    result = solve_cpsat(inst, time_limit_s=2, workers=1)
    validate_schedule(inst, result.schedule)
    assert result.makespan == pytest.approx(3.75)


def test_hint_from_a_rule_schedule_is_accepted_and_not_worse():
    inst = load_benchmark("ft06")
    rule = run_episode(gym.make("autofab/JobShop-v0", instance=inst), RulePolicy("mwkr"), seed=0)
    result = solve_cpsat(inst, time_limit_s=2, workers=1, hint=rule["schedule"])
    assert result.makespan <= rule["makespan"]
    validate_schedule(inst, result.schedule)
    flex = instance_from_dict(FLEXIBLE)
    first = solve_cpsat(flex, time_limit_s=2, workers=1)
    again = solve_cpsat(flex, time_limit_s=2, workers=1, hint=first.schedule)
    assert again.makespan == first.makespan


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"time_limit_s": 0}, "time limit"),
        ({"time_limit_s": 1, "workers": 0}, "workers"),
        ({"time_limit_s": 1, "hint": [{"job": 99, "index": 0, "machine": 0, "start": 0}]}, "hint"),
        ({"time_limit_s": 1, "hint": [{"job": 0}]}, "hint entry 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_cpsat(load_benchmark("ft06"), **kwargs)
