"""Delay scheduling: JobShop-v0's parameterised active schedules (``delay=d``)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0)
from autofab.envs.instances import instance_from_dict, load_instance, random_instance
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.model import InvalidActionError
from autofab.envs.validate import validate_schedule

#: Job 0 needs machine 0 for 10. Job 1 needs machine 1 for 1, then machine 0 for 1, then
#: machine 1 for 10. A non-delay schedule must start job 0 on machine 0 at once (job 1 is
#: busy until 1) and makes 21; letting machine 0 wait one unit for job 1 makes 12.
WAIT_PAYS = instance_from_dict(
    {
        "name": "wait-pays",
        "machines": ["M0", "M1"],
        "jobs": [
            {"operations": [{"durations": {m: t}} for m, t in route]}
            for route in ([("M0", 10)], [("M1", 1), ("M0", 1), ("M1", 10)])
        ],
    }
)


def play(env: JobShopEnv, prefer: list[int]) -> dict[str, Any]:
    """Run to the end, taking the first job of ``prefer`` that is valid (else the lowest)."""
    env.reset(seed=0)
    while True:
        valid = np.flatnonzero(env.action_masks())
        job = next((j for j in prefer if j in valid), int(valid[0]))
        _, _, done, _, info = env.step(job)
        if done:
            return info


def test_a_machine_may_wait_for_a_better_job() -> None:
    assert play(JobShopEnv(WAIT_PAYS), [1])["makespan"] == 21
    assert play(JobShopEnv(WAIT_PAYS, delay=0.0), [1])["makespan"] == 21
    info = play(JobShopEnv(WAIT_PAYS, delay=1.0), [1])
    assert info["makespan"] == 12
    starts = {(e["job"], e["index"]): e["start"] for e in info["schedule"]}
    assert starts[(1, 1)] == 1  # machine 0 idled from 0 to 1 for job 1
    assert starts[(0, 0)] == 2
    # The model's own dispatch takes a valid job that is not ready yet, and waits for it.
    env = JobShopEnv(WAIT_PAYS, delay=1.0)
    env.reset(seed=0)
    env.step(1)  # job 1 on machine 1 at 0
    model = env.model
    assert model.job_ready[1] > model.now
    op = model.dispatch(1)
    assert model.op_start[op] == 1


@pytest.mark.parametrize("delay", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("name", ["ft06", "la01", "random"])
def test_every_decision_is_one_machine_s_and_waits_no_longer_than_allowed(
    name: str, delay: float
) -> None:
    inst = random_instance(8, 6, 11) if name == "random" else load_instance(name)
    env = JobShopEnv(inst, delay=delay)
    rng = np.random.default_rng(5)
    env.reset(seed=0)
    model, done, info = env.model, False, {}
    while not done:
        mask = env.action_masks()
        valid = np.flatnonzero(mask)
        assert valid.size >= 1
        machines = model.job_machine[valid]
        assert (machines == machines[0]).all()  # one machine decides
        starts = np.maximum(
            model.job_ready, model.machine_free_at[model.job_machine % len(model.machine_free_at)]
        )
        ends = np.where(model.job_done, np.inf, starts + model.job_op_time)
        first_end = ends.min()
        assert model.now == starts[valid].min()
        limit = model.now + delay * (first_end - model.now)
        assert (starts[valid] <= max(limit, model.now)).all()
        job = int(rng.choice(valid))
        expected_start = starts[job]
        _, _, done, _, info = env.step(job)
        assert model.op_start[model.job_next[job] - 1] == expected_start
    validate_schedule(inst, info["schedule"])
    assert info["makespan"] == max(e["end"] for e in info["schedule"])


def test_the_returns_still_sum_to_the_makespan() -> None:
    env = JobShopEnv("ft06", delay=0.5)
    env.reset(seed=0)
    lb0, total, done, info = env.model.lower_bound(), 0.0, False, {}
    while not done:
        _, reward, done, _, info = env.step(int(np.flatnonzero(env.action_masks())[-1]))
        total += float(reward)
    assert total * env.reward_scale == pytest.approx(-(info["makespan"] - lb0))


def test_bad_delays_and_flexible_shops_are_refused(flexible_spec: dict[str, Any]) -> None:
    for delay in (-0.5, 2, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=r"delay must be a number in \[0, 1\]"):
            gym.make("autofab/JobShop-v0", instance="ft06", delay=delay)
    with pytest.raises(ValueError, match="classic job shops only"):
        JobShopEnv(instance_from_dict(flexible_spec), delay=0.5)


def test_an_invalid_job_is_refused_with_the_deciding_machine_named() -> None:
    env = JobShopEnv("ft06", delay=0.0)
    env.reset(seed=0)
    invalid = int(np.flatnonzero(~env.action_masks())[0])
    with pytest.raises(InvalidActionError, match="only jobs for machine"):
        env.step(invalid)
    with pytest.raises(InvalidActionError, match="not among the jobs competing"):
        env.model.dispatch(invalid)
