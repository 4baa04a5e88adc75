"""Dispatching rules: valid schedules everywhere, and hand-checked choices on tiny shops."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0)
from autofab.envs import (
    RULES,
    Instance,
    JobShopEnv,
    RulePolicy,
    benchmark_names,
    instance_from_dict,
    load_instance,
    random_instance,
    run_episode,
    validate_schedule,
)

CLASSIC = [n for n in benchmark_names() if n[:2] in ("ft", "la", "ta")]
TA = [n for n in CLASSIC if n.startswith("ta")]


def test_rule_set() -> None:
    assert set(RULES) == {"spt", "lpt", "mwkr", "mopnr", "fifo", "edd"}
    assert len(CLASSIC) == 3 + 40 + 80
    assert TA[-1] == "ta80"  # the sweep reaches the 100x20 instances


def check_every_rule(inst: Instance | str) -> dict[str, float]:
    env = JobShopEnv(instance=inst)
    makespans = {}
    for name in RULES:
        info = run_episode(env, RulePolicy(name), seed=0)
        validate_schedule(env.instance, info["schedule"])
        assert info["makespan"] == max(e["end"] for e in info["schedule"])
        best = env.instance.best_known
        if best is not None:
            assert info["makespan"] >= best, (env.instance.name, name)
            assert info["gap"] >= 0
        makespans[name] = info["makespan"]
    return makespans


# The full sweep (123 instances x 6 rules) takes about 10 s, so it runs by default.
@pytest.mark.parametrize("name", CLASSIC)
def test_rules_on_every_benchmark(name: str) -> None:
    check_every_rule(name)


def test_rules_through_gymnasium_make() -> None:
    env = gym.make("autofab/JobShop-v0", instance="ft06")
    info = run_episode(env, RulePolicy("MWKR"), seed=0)
    validate_schedule(load_instance("ft06"), info["schedule"])
    assert info["makespan"] >= 55


def test_rules_on_flexible_instance(flexible_instance: Instance) -> None:
    makespans = check_every_rule(flexible_instance)
    # No schedule beats job 0's own work (5 + 3 + 2.5).
    assert min(makespans.values()) >= 10.5


@pytest.mark.parametrize(("jobs", "machines", "seed"), [(1, 1, 0), (5, 3, 1), (12, 6, 2)])
def test_rules_on_random_instances(jobs: int, machines: int, seed: int) -> None:
    inst = random_instance(jobs, machines, seed)
    makespans = check_every_rule(inst)
    lower = max(inst.durations.sum(axis=0).max(), inst.job_total_work.max())
    assert min(makespans.values()) >= lower


def test_rules_on_a_random_spec_env() -> None:
    env = gym.make("autofab/JobShop-v0", instance={"jobs": 8, "machines": 5})
    for seed in range(3):
        info = run_episode(env, RulePolicy("spt"), seed=seed)
        validate_schedule(env.unwrapped.instance, info["schedule"])


def test_rules_are_deterministic() -> None:
    assert check_every_rule("la05") == check_every_rule("la05")


def test_unknown_rule_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'sjf'.*spt"):
        RulePolicy("sjf")


# --------------------------------------------------------------------------- by hand


def three_jobs() -> Instance:
    """Three jobs on two machines, all starting on M0.

    job 0: M0 4                 (work 4, 1 operation, due 5)
    job 1: M0 1, M1 6           (work 7, 2 operations, due 30)
    job 2: M0 2, M1 1, M1 1     (work 4, 3 operations, due 3)
    """

    def op(machine: str, time: float) -> dict[str, Any]:
        return {"durations": {machine: time}}

    return instance_from_dict(
        {
            "name": "three",
            "machines": ["M0", "M1"],
            "jobs": [
                {"due": 5, "operations": [op("M0", 4)]},
                {"due": 30, "operations": [op("M0", 1), op("M1", 6)]},
                {"due": 3, "operations": [op("M0", 2), op("M1", 1), op("M1", 1)]},
            ],
        }
    )


@pytest.mark.parametrize(
    ("rule", "job"),
    [("spt", 1), ("lpt", 0), ("mwkr", 1), ("mopnr", 2), ("edd", 2), ("fifo", 0)],
)
def test_first_choice_of_each_rule(rule: str, job: int) -> None:
    env = JobShopEnv(instance=three_jobs())
    env.reset(seed=0)
    assert env.action_masks().all()
    assert RulePolicy(rule)(env) == job


def test_spt_schedule_by_hand() -> None:
    env = JobShopEnv(instance=three_jobs())
    info = run_episode(env, RulePolicy("spt"), seed=0)
    # t=0: SPT among next times (4, 1, 2) takes job 1 on M0 [0,1).
    # t=1: job 0 (4) and job 2 (2) want M0, job 1 wants M1 (6): job 2 on M0 [1,3); then
    #      job 1 on M1 [1,7). t=3: job 0 on M0 [3,7). t=7 and 8: job 2 on M1.
    rows = [(e["job"], e["index"], e["machine"], e["start"], e["end"]) for e in info["schedule"]]
    assert sorted(rows) == sorted(
        [
            (1, 0, 0, 0, 1),
            (2, 0, 0, 1, 3),
            (1, 1, 1, 1, 7),
            (0, 0, 0, 3, 7),
            (2, 1, 1, 7, 8),
            (2, 2, 1, 8, 9),
        ]
    )
    assert info["makespan"] == 9
    # Job 0 ends at 7 (due 5), job 2 at 9 (due 3), job 1 at 7 (due 30).
    assert info["tardiness"] == 2 + 6


def test_fifo_serves_the_longest_waiting_job() -> None:
    # One machine; jobs released at 2, 1 and 0. Job 2 runs first, alone; at t=5 job 1
    # (waiting since 1) goes before job 0 (waiting since 2), though job 0 has the lower index.
    inst = Instance.from_matrices([[0], [0], [0]], [[5], [5], [5]], release=[2, 1, 0])
    env = JobShopEnv(instance=inst)
    info = run_episode(env, RulePolicy("fifo"), seed=0)
    starts = {e["job"]: e["start"] for e in info["schedule"]}
    assert starts == {2: 0, 1: 5, 0: 10}


def test_lpt_and_spt_on_one_machine() -> None:
    inst = Instance.from_matrices([[0], [0], [0]], [[5], [2], [8]])
    for rule, order in (("spt", [1, 0, 2]), ("lpt", [2, 0, 1])):
        info = run_episode(JobShopEnv(instance=inst), RulePolicy(rule), seed=0)
        assert [e["job"] for e in info["schedule"]] == order
        assert info["makespan"] == 15


def test_rules_see_machine_speeds() -> None:
    # Job 0 needs 4 on M0, job 1 needs 3 on M1: SPT takes job 1, until M0 runs at speed 2.
    inst = Instance.from_matrices([[0], [1]], [[4], [3]])
    env = JobShopEnv(instance=inst)
    env.reset(seed=0)
    assert RulePolicy("spt")(env) == 1
    env.model.set_speed(0, 2.0)
    assert RulePolicy("spt")(env) == 0
    assert np.isclose(RULES["spt"](env.model)[0], 2.0)
