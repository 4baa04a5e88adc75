"""autofab/Factory-v0: checkers, determinism, masks, rewards and KPIs."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autofab.envs  # noqa: F401
from autofab.envs.factory import FactoryEnv
from autofab.envs.model import InvalidActionError
from autofab.envs.plant import PlantConfigError

KPI_KEYS = {
    "parts_good",
    "parts_scrap",
    "makespan_s",
    "tardiness_s",
    "oee",
    "energy_kwh",
    "energy_cost",
    "co2_kg",
    "peak_kw",
    "cap_violations",
    "breakdowns",
    "maintenance",
}


def run(env: gym.Env, seed: int, action_seed: int = 0) -> tuple[list, list, dict]:
    env.action_space.seed(action_seed)
    obs, info = env.reset(seed=seed)
    observations, rewards = [obs], []
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
        assert not truncated
        observations.append(obs)
        rewards.append(reward)
    return observations, rewards, info


@pytest.fixture(scope="module")
def short_env() -> FactoryEnv:
    return FactoryEnv("demo", horizon="2h")


def test_passes_both_env_checkers() -> None:
    env = gym.make("autofab/Factory-v0", horizon="2h")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def test_same_seed_same_trajectory_and_different_seed_differs() -> None:
    a = run(FactoryEnv(horizon="3h"), seed=5)
    b = run(FactoryEnv(horizon="3h"), seed=5)
    c = run(FactoryEnv(horizon="3h"), seed=6)
    assert len(a[0]) == len(b[0])
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert a[1] == b[1]
    assert a[2]["kpis"] == b[2]["kpis"]
    assert a[2]["kpis"] != c[2]["kpis"]


def test_episode_ends_at_the_horizon_with_kpis(short_env: FactoryEnv) -> None:
    _, _, info = run(short_env, seed=1)
    kpis = info["kpis"]
    assert set(kpis) >= KPI_KEYS
    assert kpis["sim_time_s"] == pytest.approx(7200.0) or kpis["parts_good"] == kpis["orders"]
    for key in ("availability", "performance", "quality", "oee"):
        assert 0.0 <= kpis["oee"][key] <= 1.0
    assert kpis["energy_kwh"] > 0


def test_observations_stay_in_the_box(short_env: FactoryEnv) -> None:
    observations, _, _ = run(short_env, seed=2)
    for obs in observations:
        assert short_env.observation_space.contains(obs)


def test_mask_matches_candidates_and_sampling_respects_it(short_env: FactoryEnv) -> None:
    short_env.reset(seed=3)
    for _ in range(50):
        mask = short_env.action_masks()
        n_slots = short_env.slots
        n_candidates = len(short_env._slot_jobs)
        assert mask.dtype == bool
        assert mask.shape == (n_slots + 1 + short_env.speed_levels + 2,)
        assert mask[:n_candidates].all()
        assert not mask[n_candidates:n_slots].any()
        assert mask[n_slots]  # waiting is always allowed
        action = short_env.action_space.sample()
        assert action[0] < n_candidates or action[0] == n_slots
        *_, done, _, info = short_env.step(action)
        assert info["invalid_actions"] == 0
        if done:
            break


def test_empty_slot_waits_by_default_and_raises_on_request() -> None:
    env = FactoryEnv(horizon="2h")
    env.reset(seed=0)
    while len(env._slot_jobs) >= env.slots:
        env.step(np.array([0, 2, 0]))
    empty = len(env._slot_jobs)
    _, _, _, _, info = env.step(np.array([empty, 2, 0]))
    assert info["invalid_actions"] == 1

    strict = FactoryEnv(horizon="2h", invalid_action="raise")
    strict.reset(seed=0)
    while len(strict._slot_jobs) >= strict.slots:
        strict.step(np.array([0, 2, 0]))
    before = strict.model.now
    with pytest.raises(InvalidActionError, match="valid slots"):
        strict.step(np.array([len(strict._slot_jobs), 2, 0]))
    assert strict.model.now == before


@pytest.mark.parametrize("action", [[0, 1], [0.5, 1, 0], [0, 99, 0], [-1, 0, 0], "go"])
def test_malformed_actions_are_refused(short_env: FactoryEnv, action: object) -> None:
    short_env.reset(seed=0)
    with pytest.raises(InvalidActionError):
        short_env.step(action)  # type: ignore[arg-type]


def test_step_before_reset_and_after_end() -> None:
    env = FactoryEnv(horizon="30m")
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.array([0, 0, 0]))
    run(env, seed=0)
    with pytest.raises(InvalidActionError, match="over"):
        env.step(np.array([0, 0, 0]))


def test_reward_is_the_documented_weighted_sum(expected_return) -> None:
    weights = {"parts": 2.0, "tardiness_h": 0.3, "energy_cost": 0.1, "scrap": 1.5}
    env = FactoryEnv(horizon="4h", reward_weights=weights)
    _, rewards, info = run(env, seed=4)
    k = info["kpis"]
    expected = expected_return(k, weights)
    assert sum(rewards) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_maintain_action_starts_maintenance() -> None:
    env = FactoryEnv(horizon="2h")
    env.reset(seed=0)
    machine = env.focus
    env.step(np.array([0, 2, 1]))
    assert env.model.maintenances[machine] == 1


def test_speed_level_maps_onto_the_machine_range() -> None:
    env = FactoryEnv(horizon="2h", speed_levels=3)
    env.reset(seed=0)
    m = env.focus
    env.step(np.array([0, 2, 0]))
    assert env.model.speed[m] == pytest.approx(env.plant.speed_max[m])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reward_weights": {"profit": 1.0}}, "unknown reward weight"),
        ({"slots": 0}, "slots"),
        ({"speed_levels": 0}, "speed_levels"),
        ({"horizon": "8x"}, "duration"),
        ({"invalid_action": "ignore"}, "invalid_action"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FactoryEnv(**kwargs)


def test_bad_plant_config_is_named() -> None:
    with pytest.raises(PlantConfigError, match="not found"):
        FactoryEnv("no-such-plant")


def test_maskable_ppo_trains_on_it() -> None:
    sb3_contrib = pytest.importorskip("sb3_contrib")
    env = FactoryEnv(horizon="2h")
    model = sb3_contrib.MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0)
    model.learn(128)
    obs, _ = env.reset(seed=1)
    action, _ = model.predict(obs, action_masks=env.action_masks())
    assert env.action_masks()[action[0]]
