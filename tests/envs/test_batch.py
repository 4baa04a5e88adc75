"""BatchJobShop: the same observations, masks and makespans as JobShopEnv, copy by copy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from autofab.envs.batch import BatchJobShop
from autofab.envs.instances import Instance, load_instance, random_instance
from autofab.envs.jobshop import JobShopEnv


@pytest.mark.parametrize(
    "instance", [load_instance("ft06"), load_instance("la16"), random_instance(15, 10, 3)]
)
def test_every_copy_matches_its_own_environment(instance: Any) -> None:
    assert_copies_match_their_environments(instance)


def test_routes_of_different_lengths_match_too(uneven_shop: Instance) -> None:
    # Jobs of 3, 2 and 1 operations: a job's last operation, and the lookahead past it,
    # come at different steps.
    assert_copies_match_their_environments(uneven_shop)


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("instance", [load_instance("ft06"), random_instance(15, 10, 3)])
def test_delay_schedules_match_their_environments(instance: Instance, delay: float) -> None:
    assert_copies_match_their_environments(instance, delay)


def test_delay_schedules_of_uneven_routes_match(uneven_shop: Instance) -> None:
    assert_copies_match_their_environments(uneven_shop, 0.5)


def assert_copies_match_their_environments(instance: Instance, delay: float | None = None) -> None:
    """Random trajectories through a BatchJobShop and one JobShopEnv per copy agree."""
    copies = 4
    sim = BatchJobShop(instance, copies, delay)
    envs = [JobShopEnv(instance, delay=delay) for _ in range(copies)]
    obs = [env.reset(seed=0)[0] for env in envs]
    rng = np.random.default_rng(7)
    infos: list[dict[str, Any]] = []
    while not sim.done:
        batch_obs = sim.observe()
        for i, env in enumerate(envs):
            np.testing.assert_array_equal(sim.mask[i], env.action_masks())
            live = ~env.model.job_done
            np.testing.assert_array_equal(sim.job_machine[i][live], env.model.job_machine[live])
            # Bit for bit, the lookahead blocks included.
            np.testing.assert_array_equal(batch_obs[i], obs[i])
        jobs = np.array([rng.choice(np.flatnonzero(row)) for row in sim.mask])
        sim.step(jobs)
        steps = [env.step(int(job)) for env, job in zip(envs, jobs, strict=True)]
        obs = [s[0] for s in steps]
        infos = [s[4] for s in steps]
    assert all(s[2] for s in steps)
    np.testing.assert_allclose(sim.makespan, [info["makespan"] for info in infos])
    for i, info in enumerate(infos):
        assert sim.schedule(i) == info["schedule"]


def test_reset_starts_over() -> None:
    sim = BatchJobShop(load_instance("ft06"), 2)
    first = sim.observe()
    sim.step(np.flatnonzero(sim.mask[0])[:1].repeat(2))
    sim.reset()
    np.testing.assert_array_equal(sim.observe(), first)
    assert sim.n_started == 0
    assert not sim.done


def test_flexible_shops_and_bad_arguments_are_refused(flexible_spec: dict[str, Any]) -> None:
    from autofab.envs.instances import instance_from_dict

    with pytest.raises(ValueError, match="classic job shops only"):
        BatchJobShop(instance_from_dict(flexible_spec), 2)
    with pytest.raises(ValueError, match="copies must be >= 1"):
        BatchJobShop(load_instance("ft06"), 0)
    for delay in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"delay must be a number in \[0, 1\]"):
            BatchJobShop(load_instance("ft06"), 2, delay)
    sim = BatchJobShop(load_instance("ft06"), 2)
    while sim.mask[0].all():
        sim.step(np.flatnonzero(sim.mask[0])[:1].repeat(2))
    invalid = int(np.flatnonzero(~sim.mask[0])[0])
    with pytest.raises(ValueError, match="one valid job per copy"):
        sim.step(np.array([invalid, invalid]))
    with pytest.raises(ValueError, match="one valid job per copy"):
        sim.step(np.array([0]))
    with pytest.raises(ValueError, match="one valid job per copy"):
        sim.step(np.array([99, 0]))
