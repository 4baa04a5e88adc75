"""autofab/JobShop-v0: the Gymnasium contract, rewards, masks, errors, and MaskablePPO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0)
from autofab.envs import (
    Instance,
    InvalidActionError,
    JobShopEnv,
    save_instance,
    validate_schedule,
)
from autofab.envs.jobshop import (
    N_JOB_BLOCKS,
    OBSERVATION_LAYOUT,
    observation_blocks,
    observation_scale,
)

ENV_ID = "autofab/JobShop-v0"
RANDOM_SPEC = {"jobs": 6, "machines": 4}


def make(instance: Any = "ft06", **kwargs: Any) -> gym.Env[Any, Any]:
    return gym.make(ENV_ID, instance=instance, **kwargs)


def masks(env: gym.Env[Any, Any]) -> np.ndarray:
    return env.unwrapped.action_masks()  # type: ignore[attr-defined]


def rollout(
    env: gym.Env[Any, Any], seed: int | None, action_seed: int = 0
) -> tuple[list[np.ndarray], list[float], list[dict[str, Any]]]:
    """One episode with uniformly random valid actions; returns obs, rewards and infos."""
    rng = np.random.default_rng(action_seed)
    obs, info = env.reset(seed=seed)
    observations, rewards, infos = [obs], [], [info]
    terminated = truncated = False
    while not (terminated or truncated):
        action = int(rng.choice(np.flatnonzero(masks(env))))
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        rewards.append(float(reward))
        infos.append(info)
    assert not truncated
    return observations, rewards, infos


def block(obs: np.ndarray, name: str, n_jobs: int, n_machines: int) -> np.ndarray:
    """The named block of an observation, located through OBSERVATION_LAYOUT."""
    return observation_blocks(obs, n_jobs, n_machines)[name]


# --------------------------------------------------------------------------- checkers


@pytest.mark.parametrize("instance", ["ft06", "la01", RANDOM_SPEC])
def test_gymnasium_env_checker(instance: Any) -> None:
    env = make(instance)
    gym_check_env(env.unwrapped, skip_render_check=True)


def test_gymnasium_env_checker_on_a_flexible_instance(flexible_spec: dict[str, Any]) -> None:
    gym_check_env(make(flexible_spec).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("instance", ["ft06", RANDOM_SPEC])
def test_stable_baselines3_env_checker(instance: Any) -> None:
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(make(instance), warn=True)
    sb3_check_env(JobShopEnv(instance=instance), warn=True)


# --------------------------------------------------------------------------- seeding


def test_same_seed_gives_identical_trajectories() -> None:
    obs_a, rew_a, info_a = rollout(make(RANDOM_SPEC), seed=11, action_seed=3)
    obs_b, rew_b, info_b = rollout(make(RANDOM_SPEC), seed=11, action_seed=3)
    assert len(obs_a) == len(obs_b) == 6 * 4 + 1
    for a, b in zip(obs_a, obs_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert rew_a == rew_b
    assert info_a == info_b
    assert info_a[-1]["makespan"] > 0


def test_reset_with_the_same_seed_repeats_the_instance_on_one_env() -> None:
    env = make(RANDOM_SPEC)
    env.reset(seed=5)
    first = env.unwrapped.instance.durations.copy()
    env.reset(seed=6)
    env.reset(seed=5)
    np.testing.assert_array_equal(env.unwrapped.instance.durations, first)


def test_different_seeds_give_different_instances() -> None:
    env = make(RANDOM_SPEC)
    seen = set()
    for seed in range(8):
        env.reset(seed=seed)
        inst = env.unwrapped.instance
        assert (inst.n_jobs, inst.n_machines) == (6, 4)
        seen.add(inst.durations.tobytes() + inst.eligible.tobytes())
    assert len(seen) == 8


def test_reset_without_seed_keeps_drawing_new_instances() -> None:
    env = make(RANDOM_SPEC)
    env.reset(seed=0)
    first = env.unwrapped.instance.durations.copy()
    env.reset()
    assert not np.array_equal(env.unwrapped.instance.durations, first)


# --------------------------------------------------------------------------- observation


@pytest.mark.parametrize(
    ("instance", "n_jobs", "n_machines"),
    [("ft06", 6, 6), ("la01", 10, 5), (RANDOM_SPEC, 6, 4), ({"jobs": 3, "machines": 7}, 3, 7)],
)
def test_observation_shape_is_fixed_and_inside_the_box(
    instance: Any, n_jobs: int, n_machines: int
) -> None:
    env = make(instance)
    space = env.observation_space
    assert isinstance(space, gym.spaces.Box)
    assert space.shape == (N_JOB_BLOCKS * n_jobs + 2 * n_machines + 3,)
    assert space.dtype == np.float32
    for seed in (0, 1):
        observations, _, _ = rollout(env, seed=seed, action_seed=seed)
        for obs in observations:
            assert obs.shape == space.shape
            assert obs.dtype == np.float32
            assert np.all(np.isfinite(obs))
            assert space.contains(obs)


def test_observation_blocks_say_what_the_layout_says() -> None:
    env = make("ft06")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(block(obs, "job_can_start", 6, 6), masks(env))
    assert block(obs, "progress", 6, 6)[0] == 0
    np.testing.assert_array_equal(block(obs, "job_ops_left", 6, 6), np.ones(6))
    rng = np.random.default_rng(0)
    terminated = False
    while not terminated:
        obs, _, terminated, _, _ = env.step(int(rng.choice(np.flatnonzero(masks(env)))))
        np.testing.assert_array_equal(block(obs, "job_can_start", 6, 6), masks(env))
    assert block(obs, "progress", 6, 6)[0] == 1
    np.testing.assert_array_equal(block(obs, "job_ops_left", 6, 6), np.zeros(6))
    np.testing.assert_array_equal(block(obs, "job_work_left", 6, 6), np.zeros(6))


def test_layout_counts_its_blocks() -> None:
    assert N_JOB_BLOCKS == sum(kind == "job" for _, kind in OBSERVATION_LAYOUT) == 9
    assert sum(kind == "plant" for _, kind in OBSERVATION_LAYOUT) == 3
    names = [name for name, _ in OBSERVATION_LAYOUT]
    at = names.index("job_can_start")
    assert names[at + 1 : at + 4] == ["job_next_machine", "job_next2_op_time", "job_next2_machine"]
    assert names[-1] == "op_time_to_work"
    with pytest.raises(ValueError, match="6 jobs and 6 machines give 69"):
        observation_blocks(np.zeros(70, dtype=np.float32), 6, 6)
    with pytest.raises(ValueError, match="6 jobs and 6 machines give 69"):
        observation_blocks(np.zeros(93, dtype=np.float32), 6, 6)


# --------------------------------------------------------------------------- lookahead blocks


def decode_machine(value: np.ndarray, n_machines: int) -> np.ndarray:
    """A consumer's reading of a ``job_next_machine``-style block: the index, -1 = none."""
    return np.rint(value * n_machines).astype(np.int64) - 1


def lookahead(obs: np.ndarray, env: gym.Env[Any, Any]) -> dict[str, np.ndarray]:
    """The lookahead blocks in model units: machine indices (-1 = none) and times."""
    inst = env.unwrapped.instance
    blocks = observation_blocks(obs, inst.n_jobs, inst.n_machines)
    return {
        "next_machine": decode_machine(blocks["job_next_machine"], inst.n_machines),
        "next2_time": blocks["job_next2_op_time"] * np.float64(inst.max_duration),
        "next2_machine": decode_machine(blocks["job_next2_machine"], inst.n_machines),
    }


def expected_lookahead(env: gym.Env[Any, Any]) -> dict[str, np.ndarray]:
    """The documented definitions, job by job, from the model's state (an oracle)."""
    inst, model = env.unwrapped.instance, env.unwrapped.model
    free = np.maximum(model.machine_free_at, model.now)  # idle machines are free now

    def machine(op: int) -> int:
        eligible = np.flatnonzero(inst.eligible[op])
        return int(eligible[np.argmin(free[eligible])])  # free soonest, ties to lowest

    out: dict[str, list[float]] = {"next_machine": [], "next2_time": [], "next2_machine": []}
    for job in range(inst.n_jobs):
        left = list(range(int(model.job_next[job]), int(inst.job_offsets[job + 1])))
        out["next_machine"].append(machine(left[0]) if left else -1)
        if len(left) >= 2:
            op = left[1]
            times = [
                inst.durations[op, k] / model.speed[k] for k in np.flatnonzero(inst.eligible[op])
            ]
            out["next2_time"].append(min(times))
            out["next2_machine"].append(machine(op))
        else:
            out["next2_time"].append(0.0)
            out["next2_machine"].append(-1)
    return {key: np.array(values) for key, values in out.items()}


def assert_lookahead(obs: np.ndarray, env: gym.Env[Any, Any], **expected: list[float]) -> None:
    got = lookahead(obs, env)
    oracle = expected_lookahead(env)
    for key in got:
        np.testing.assert_allclose(got[key], oracle[key], rtol=1e-6, err_msg=key)
    for key, values in expected.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-6, err_msg=key)


def test_lookahead_blocks_by_hand_on_a_classic_shop(uneven_shop: Instance) -> None:
    env = make(uneven_shop)
    obs, _ = env.reset(seed=0)
    # Job 2 has one operation left: nothing after it.
    assert_lookahead(
        obs, env, next_machine=[0, 1, 2], next2_time=[2, 5, 0], next2_machine=[1, 0, -1]
    )
    assert block(obs, "op_time_to_work", 3, 3)[0] == np.float32(5 / 9)
    obs, *_ = env.step(2)  # job 2 finishes its only operation
    assert_lookahead(
        obs, env, next_machine=[0, 1, -1], next2_time=[2, 5, 0], next2_machine=[1, 0, -1]
    )
    obs, *_ = env.step(0)
    assert_lookahead(
        obs, env, next_machine=[1, 1, -1], next2_time=[4, 5, 0], next2_machine=[2, 0, -1]
    )
    obs, *_ = env.step(1)  # job 1 is left with its last operation
    assert env.unwrapped.model.now == 3
    assert_lookahead(
        obs, env, next_machine=[1, 0, -1], next2_time=[4, 0, 0], next2_machine=[2, -1, -1]
    )
    np.testing.assert_array_equal(block(obs, "job_next2_machine", 3, 3), [1.0, 0.0, 0.0])
    for job in (0, 1, 0):
        obs, _, terminated, _, _ = env.step(job)
    assert terminated
    for name in ("job_next_machine", "job_next2_op_time", "job_next2_machine"):
        np.testing.assert_array_equal(block(obs, name, 3, 3), np.zeros(3))
    assert block(obs, "op_time_to_work", 3, 3)[0] == np.float32(5 / 9)


def test_lookahead_blocks_by_hand_on_a_flexible_shop(flexible_instance: Instance) -> None:
    # Machines: mill-1, mill-2, lathe-1, drill-1. Job 1 is released at t=2.
    env = make(flexible_instance)
    obs, _ = env.reset(seed=0)
    # Every machine is free at 0: ties go to the lowest eligible index.
    assert_lookahead(
        obs, env, next_machine=[0, 2, 1], next2_time=[3, 4, 1], next2_machine=[2, 0, 0]
    )
    obs, *_ = env.step(0)  # job 0 mills on mill-1 until 5
    assert_lookahead(
        obs, env, next_machine=[2, 2, 1], next2_time=[2.5, 4, 1], next2_machine=[3, 1, 1]
    )
    obs, *_ = env.step(2)  # job 2 on mill-2 until 3; now t=2, when job 1 arrives
    assert env.unwrapped.model.now == 2
    # Job 2's milling can go to mill-1 (free at 5), mill-2 (3) or drill-1 (free now).
    assert_lookahead(
        obs, env, next_machine=[2, 2, 3], next2_time=[2.5, 4, 4], next2_machine=[3, 1, 3]
    )
    inst = flexible_instance
    expected = max(inst.max_duration, 1e-12) / float(inst.job_total_work.max())
    assert block(obs, "op_time_to_work", 3, 4)[0] == np.float32(expected)


@pytest.mark.parametrize("instance", ["ft06", "la01", "random", "flexible", "uneven"])
def test_lookahead_blocks_follow_their_definition_along_random_episodes(
    instance: Any, flexible_instance: Instance, uneven_shop: Instance
) -> None:
    named = {"random": RANDOM_SPEC, "flexible": flexible_instance, "uneven": uneven_shop}
    spec = named.get(instance, instance)
    env = make(spec)
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        terminated = False
        while not terminated:
            assert_lookahead(obs, env)
            obs, _, terminated, _, _ = env.step(int(rng.choice(np.flatnonzero(masks(env)))))
        assert_lookahead(obs, env)


def test_lookahead_times_follow_machine_speeds() -> None:
    env = make("ft06")
    env.unwrapped.model.set_speed(0, 2.0)  # job 0's second operation takes 3 on M0
    obs, _ = env.reset(seed=0)  # a reset keeps the speeds
    assert_lookahead(obs, env)
    assert lookahead(obs, env)["next2_time"][0] == pytest.approx(1.5)


def test_machine_codes_decode_exactly() -> None:
    for n_machines in range(1, 1001):
        # The env's arithmetic: float32 raw value times the float32 scale, clipped to 1.
        scale = np.float32(1.0 / n_machines)
        raw = np.arange(n_machines + 1, dtype=np.float32)  # 0 = none, k = machine k - 1
        value = np.minimum(raw * scale, np.float32(1.0))
        for read in (value, value.astype(np.float64)):
            np.testing.assert_array_equal(
                decode_machine(read, n_machines), np.arange(-1, n_machines), str(n_machines)
            )


@pytest.mark.parametrize("n_machines", [1, 7, 100])
def test_observation_scale_encodes_machines_as_documented(n_machines: int) -> None:
    env = make({"jobs": 3, "machines": n_machines})
    obs, _ = env.reset(seed=n_machines)
    inst = env.unwrapped.instance
    scale = observation_scale(inst)
    blocks = observation_blocks(scale, inst.n_jobs, n_machines)
    assert blocks["job_next_machine"][0] == np.float32(1.0 / n_machines)
    assert blocks["job_next2_op_time"][0] == blocks["job_next_op_time"][0]
    assert blocks["op_time_to_work"][0] == 1.0
    np.testing.assert_array_equal(
        lookahead(obs, env)["next_machine"], env.unwrapped.model.job_machine
    )


# --------------------------------------------------------------------------- actions


def test_action_masks_are_a_bool_copy_of_length_n_jobs() -> None:
    env = make("la01")
    env.reset(seed=0)
    mask = masks(env)
    assert mask.dtype == np.bool_
    assert mask.shape == (10,)
    assert mask.any()
    mask[:] = ~mask
    assert not np.array_equal(masks(env), mask)
    assert isinstance(env.action_space, gym.spaces.Discrete)
    assert env.action_space.n == 10


def test_action_space_sample_is_always_valid(flexible_spec: dict[str, Any]) -> None:
    for instance in ("ft06", RANDOM_SPEC, flexible_spec):
        env = make(instance)
        for seed in range(3):
            env.reset(seed=seed)
            env.action_space.seed(seed)
            terminated = False
            while not terminated:
                action = env.action_space.sample()
                assert masks(env)[action], (instance, seed, action, masks(env))
                _, _, terminated, _, _ = env.step(action)


def assert_invalid(env: gym.Env[Any, Any], action: Any, shown: str) -> None:
    valid = np.flatnonzero(masks(env)).tolist()
    started = env.unwrapped.model.n_started
    with pytest.raises(InvalidActionError) as err:
        env.step(action)
    message = str(err.value)
    assert shown in message, message
    assert str(valid) in message, message
    assert env.unwrapped.model.n_started == started


def test_masked_action_is_refused() -> None:
    env = make("ft06")
    env.reset(seed=0)
    env.step(0)  # job 0 takes M2, so jobs 2 and 4 (which start on M2) must wait
    mask = masks(env)
    assert not mask[0]
    assert not mask[2]
    assert_invalid(env, 2, "action 2")
    assert_invalid(env, np.int64(0), "action 0")


@pytest.mark.parametrize("action", [6, 99, -1])
def test_out_of_range_action_is_refused(action: int) -> None:
    env = make("ft06")
    env.reset(seed=0)
    assert_invalid(env, action, f"action {action}")


@pytest.mark.parametrize("action", [0.5, 1.5, "1", "abc", None, [0, 1], np.array([1, 2])], ids=repr)
def test_non_integer_action_is_refused(action: Any) -> None:
    env = make("ft06")
    env.reset(seed=0)
    assert masks(env).all()  # every job could start: only the type can be at fault
    assert_invalid(env, action, repr(action))


def test_array_shaped_integer_actions_are_accepted() -> None:
    # What vectorised agents hand over: numpy scalars and one-element arrays.
    env = make("ft06")
    env.reset(seed=0)
    env.step(np.array(1))  # job 1 takes M1
    env.step(np.array([0]))  # job 0 takes M2
    assert env.unwrapped.model.n_started == 2


def test_action_after_the_episode_ended_is_refused() -> None:
    env = make("ft06")
    rollout(env, seed=0)
    assert not masks(env).any()
    assert_invalid(env, 0, "action 0")


# --------------------------------------------------------------------------- rewards and info


@pytest.mark.parametrize("reward_scale", [None, 7.0])
@pytest.mark.parametrize("instance", ["ft06", "la02", RANDOM_SPEC, "flexible"])
def test_episode_return_telescopes(
    instance: Any, reward_scale: float | None, flexible_spec: dict[str, Any]
) -> None:
    env = make(flexible_spec if instance == "flexible" else instance, reward_scale=reward_scale)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        env.reset(seed=seed)
        model = env.unwrapped.model
        initial_bound = model.lower_bound()
        scale = env.unwrapped.reward_scale
        if reward_scale is None:
            assert scale == env.unwrapped.instance.max_duration
        else:
            assert scale == reward_scale
        total, terminated, info = 0.0, False, {}
        while not terminated:
            action = int(rng.choice(np.flatnonzero(masks(env))))
            _, reward, terminated, truncated, info = env.step(action)
            assert not truncated
            total += float(reward)
        expected = -(info["makespan"] - initial_bound) / scale
        assert total == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_final_info_of_a_benchmark_episode() -> None:
    env = make("ft06")
    _, rewards, infos = rollout(env, seed=0)
    info = infos[-1]
    inst = env.unwrapped.instance
    schedule = info["schedule"]
    validate_schedule(inst, schedule)
    assert len(schedule) == 36
    assert info["makespan"] == max(e["end"] for e in schedule)
    assert info["makespan"] >= 55
    assert info["best_known"] == 55
    assert info["gap"] == pytest.approx(info["makespan"] / 55 - 1)
    ends = np.zeros(inst.n_jobs)
    for e in schedule:
        ends[e["job"]] = max(ends[e["job"]], e["end"])
    assert info["tardiness"] == pytest.approx(np.maximum(ends - inst.due, 0).sum())
    assert all(r <= 1e-12 for r in rewards)  # a classic shop's bound never falls


def test_final_info_of_a_flexible_episode_from_a_file(
    flexible_spec: dict[str, Any], tmp_path: Path, flexible_instance: Instance
) -> None:
    path = save_instance(flexible_instance, tmp_path / "cell.json")
    env = make(str(path))
    _, _, infos = rollout(env, seed=0)
    info = infos[-1]
    validate_schedule(env.unwrapped.instance, info["schedule"])
    assert len(info["schedule"]) == 8
    assert info["makespan"] == max(e["end"] for e in info["schedule"])
    assert "gap" not in info  # no best-known makespan to compare with


def test_render_ansi() -> None:
    env = make("ft06", render_mode="ansi")
    env.reset(seed=0)
    env.step(0)
    text = env.render()
    assert isinstance(text, str)
    assert "t=0" in text


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"reward_scale": 0.0}, "reward_scale"), ({"render_mode": "human"}, "human")],
)
def test_bad_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        JobShopEnv("ft06", **kwargs)


# --------------------------------------------------------------------------- MaskablePPO


def test_maskable_ppo_trains_and_predicts_valid_actions() -> None:
    torch = pytest.importorskip("torch")
    from sb3_contrib import MaskablePPO

    torch.set_num_threads(1)
    env = make("ft06")
    model = MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    obs, _ = env.reset(seed=1)
    terminated = False
    while not terminated:
        mask = env.get_wrapper_attr("action_masks")()
        action, _ = model.predict(obs, action_masks=mask, deterministic=True)
        assert mask[int(action)]
        obs, _, terminated, _, info = env.step(action)
    validate_schedule(env.unwrapped.instance, info["schedule"])
