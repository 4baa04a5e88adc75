"""Policy artifacts: run folder contents, the loader, and its refusals (one tiny ft06 run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import yaml
from gymnasium import spaces

import autofab.envs  # noqa: F401  (registers the env ids)
from autofab.agents.policies.artifacts import (
    MODEL_FILE,
    POLICY_FILE,
    LoadedPolicy,
    PolicyLoadError,
    load_policy,
    space_signature,
)
from autofab.agents.policies.training import TrainSpec, train_one
from autofab.envs import validate_schedule
from autofab.envs.jobshop import JobShopEnv, MaskedDiscrete

#: Observation sizes of ft06 (6 jobs, 6 machines) and ta01 (15 x 15).
FT06_SIZE = JobShopEnv("ft06").observation_space.shape[0]  # type: ignore[index]
TA01_SIZE = JobShopEnv("ta01").observation_space.shape[0]  # type: ignore[index]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-step MaskablePPO run on ft06 (about a second)."""
    spec = TrainSpec(
        algo="maskable_ppo",
        env_id="autofab/JobShop-v0",
        seed=0,
        n_timesteps=256,
        env_kwargs={"instance": "ft06"},
        hyperparams={"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2},
        eval_freq=128,
        eval_episodes=1,
        log_folder=str(tmp_path_factory.mktemp("runs")),
        command=["autofab", "train", "--algo", "maskable_ppo"],
    )
    return Path(train_one(spec).run_dir)


@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run folder that a test may damage."""
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def _ft06() -> gym.Env[Any, Any]:
    return gym.make("autofab/JobShop-v0", instance="ft06")


def test_run_folder_holds_the_artifacts(run_dir: Path) -> None:
    assert run_dir.name.startswith("autofab-JobShop-v0__maskable_ppo__0__")
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yml", "model.zip", "policy.json", "evaluations.csv"} <= names
    assert "vecnormalize.pkl" not in names
    config = yaml.safe_load((run_dir / "config.yml").read_text())
    assert config["algo"] == "maskable_ppo"
    assert config["hyperparams"]["n_steps"] == 64
    assert config["hyperparams"]["n_timesteps"] == 256
    rows = (run_dir / "evaluations.csv").read_text().splitlines()
    assert rows[0] == "timesteps,mean_return,std_return,mean_makespan"
    assert [r.split(",")[0] for r in rows[1:]] == ["128", "256"]
    assert all(float(r.split(",")[3]) >= 55 for r in rows[1:])  # ft06's optimum is 55


def test_policy_json_records_env_spaces_command_and_version(run_dir: Path) -> None:
    meta = json.loads((run_dir / POLICY_FILE).read_text())
    assert meta["schema_version"] == 1
    assert meta["algo"] == "maskable_ppo"
    assert meta["env_id"] == "autofab/JobShop-v0"
    assert meta["env_version"] == 0
    assert meta["env_kwargs"] == {"instance": "ft06"}
    assert meta["observation_space"]["type"] == "Box"
    assert meta["observation_space"]["shape"] == [FT06_SIZE]
    assert meta["action_space"] == {
        "type": "Discrete",
        "shape": [],
        "dtype": "int64",
        "n": 6,
        "start": 0,
    }
    assert meta["command"] == ["autofab", "train", "--algo", "maskable_ppo"]
    assert meta["autofab_version"]
    assert meta["total_timesteps"] == 256
    assert meta["normalized"] is False


def test_loaded_policy_plays_valid_masked_actions(run_dir: Path) -> None:
    env = _ft06()
    policy = load_policy(run_dir, env)
    assert isinstance(policy, LoadedPolicy)
    obs, _ = env.reset(seed=0)
    done = False
    info: dict[str, Any] = {}
    while not done:
        mask = env.action_masks()
        action = policy(obs, mask)
        assert isinstance(action, int)
        assert mask[action]
        assert policy(obs, mask) == action  # deterministic
        obs, _, done, _, info = env.step(action)
    validate_schedule(env.unwrapped.instance, info["schedule"])


def test_mask_with_one_valid_action_forces_it(run_dir: Path) -> None:
    policy = load_policy(run_dir)
    obs, _ = _ft06().reset(seed=0)
    for only in range(6):
        mask = np.zeros(6, dtype=bool)
        mask[only] = True
        assert policy(obs, mask) == only


def test_env_with_other_spaces_is_refused_naming_the_space(run_dir: Path) -> None:
    ta01 = gym.make("autofab/JobShop-v0", instance="ta01")
    with pytest.raises(PolicyLoadError, match="observation space") as info:
        load_policy(run_dir, ta01)
    message = str(info.value)
    assert "expected" in message
    assert "found" in message
    assert f'"shape": [{FT06_SIZE}]' in message
    assert f'"shape": [{TA01_SIZE}]' in message


class _SameObsOtherActions(gym.Env[Any, Any]):
    observation_space = spaces.Box(0.0, 1.0, (FT06_SIZE,), dtype=np.float32)
    action_space = spaces.Discrete(7)


def test_action_space_mismatch_is_refused(run_dir: Path) -> None:
    with pytest.raises(PolicyLoadError, match=r"action space .*differs in n.*\"n\": 6.*\"n\": 7"):
        load_policy(run_dir, _SameObsOtherActions())


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="does not exist"):
        load_policy(tmp_path / "nope")


def test_folder_without_policy_json(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match=r"policy\.json' is missing"):
        load_policy(tmp_path)


def test_corrupt_policy_json(run_copy: Path) -> None:
    (run_copy / POLICY_FILE).write_text("{not json")
    with pytest.raises(PolicyLoadError, match=r"policy\.json' is not valid JSON"):
        load_policy(run_copy)


def test_policy_json_of_another_schema_version(run_copy: Path) -> None:
    meta = json.loads((run_copy / POLICY_FILE).read_text())
    meta["schema_version"] = 99
    (run_copy / POLICY_FILE).write_text(json.dumps(meta))
    with pytest.raises(PolicyLoadError, match="schema_version 99"):
        load_policy(run_copy)


def test_policy_json_without_fields(run_copy: Path) -> None:
    (run_copy / POLICY_FILE).write_text('{"schema_version": 1}')
    with pytest.raises(PolicyLoadError, match="lacks field"):
        load_policy(run_copy)


def test_truncated_model_zip(run_copy: Path) -> None:
    data = (run_copy / MODEL_FILE).read_bytes()
    (run_copy / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyLoadError, match=r"model\.zip' cannot be loaded as a maskable_ppo"):
        load_policy(run_copy, _ft06())


def test_garbage_model_zip(run_copy: Path) -> None:
    (run_copy / MODEL_FILE).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(PolicyLoadError, match=r"model\.zip"):
        load_policy(run_copy)


def test_missing_model_zip(run_copy: Path) -> None:
    (run_copy / MODEL_FILE).unlink()
    with pytest.raises(PolicyLoadError, match=r"model\.zip' is missing"):
        load_policy(run_copy)


def test_space_signature_is_json_safe_and_ignores_masked_subclasses() -> None:
    assert space_signature(MaskedDiscrete(4)) == space_signature(spaces.Discrete(4))
    box = space_signature(spaces.Box(-np.inf, np.inf, (3, 2)))
    json.dumps(box, allow_nan=False)
    assert box["bounds"]["low_min"] == "-inf"
    assert box["shape"] == [3, 2]
    assert space_signature(spaces.MultiDiscrete([9, 5, 2]))["nvec"] == [9, 5, 2]
