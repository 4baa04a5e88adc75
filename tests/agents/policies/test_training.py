"""Training: hyperparameter parsing (never eval), input checks, and tiny runs per algorithm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import yaml
from torch import nn

import autofab.envs  # noqa: F401  (registers the env ids)
from autofab.agents.policies.artifacts import SB3_ALGOS, load_policy
from autofab.agents.policies.training import (
    CONFIG_DIR,
    TrainingError,
    TrainSpec,
    build_policy_kwargs,
    check_hyperparams,
    load_hyperparams,
    parse_env_kwargs,
    parse_hyperparam_overrides,
    run_folder_name,
    train_one,
)


def _spec(tmp_path: Path, **changes: Any) -> TrainSpec:
    base: dict[str, Any] = {
        "algo": "ppo",
        "env_id": "autofab/JobShop-v0",
        "n_timesteps": 128,
        "env_kwargs": {"instance": "ft06"},
        "hyperparams": {"n_envs": 2, "n_steps": 32, "batch_size": 32, "n_epochs": 1},
        "eval_freq": 0,
        "eval_episodes": 1,
        "log_folder": str(tmp_path / "runs"),
    }
    base.update(changes)
    return TrainSpec(**base)


# --------------------------------------------------------------------------- parsing


def test_overrides_are_read_as_yaml_values() -> None:
    parsed = parse_hyperparam_overrides(
        [
            "learning_rate:1e-3",
            "n_steps:128",
            "normalize:true",
            "policy_kwargs:{net_arch: [32, 32], activation_fn: relu}",
            "ent_coef: 0.0",
        ]
    )
    assert parsed["n_steps"] == 128
    assert parsed["normalize"] is True
    assert parsed["policy_kwargs"] == {"net_arch": [32, 32], "activation_fn": "relu"}
    assert parsed["ent_coef"] == 0.0
    run, kwargs = check_hyperparams("ppo", parsed)
    assert kwargs["learning_rate"] == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert kwargs["policy_kwargs"] == {"net_arch": [32, 32], "activation_fn": nn.ReLU}
    assert run["normalize"] is True


@pytest.mark.parametrize("item", ["no_colon", ":1", "x:[1, 2"])
def test_malformed_override_is_refused(item: str) -> None:
    with pytest.raises(TrainingError, match="--hyperparams"):
        parse_hyperparam_overrides([item])


def test_activation_names_go_through_the_whitelist() -> None:
    assert build_policy_kwargs({"activation_fn": "Tanh"}) == {"activation_fn": nn.Tanh}
    for bad in ("nn.ReLU", "__import__('os').system('true')", "torch.nn.Tanh"):
        with pytest.raises(TrainingError, match="activation_fn"):
            build_policy_kwargs({"activation_fn": bad})
    with pytest.raises(TrainingError, match="unknown policy_kwargs key 'features_extractor_class'"):
        build_policy_kwargs({"features_extractor_class": "NatureCNN"})
    with pytest.raises(TrainingError, match="net_arch"):
        build_policy_kwargs({"net_arch": "[64, 64]"})
    assert build_policy_kwargs({"net_arch": {"pi": [8], "vf": [8]}}) == {
        "net_arch": {"pi": [8], "vf": [8]}
    }


def test_malicious_strings_in_yaml_stay_strings_and_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    conf = tmp_path / "evil.yml"
    conf.write_text(
        yaml.safe_dump(
            {"autofab/JobShop-v0": {"learning_rate": f"__import__('os').system('touch {marker}')"}}
        )
    )
    params = load_hyperparams("ppo", "autofab/JobShop-v0", conf)
    assert isinstance(params["learning_rate"], str)
    with pytest.raises(TrainingError, match="'learning_rate' must be a number"):
        check_hyperparams("ppo", params)
    # A Python tag is refused by the safe loader instead of being run.
    conf.write_text(
        f'autofab/JobShop-v0:\n  gamma: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    with pytest.raises(TrainingError, match="cannot read"):
        load_hyperparams("ppo", "autofab/JobShop-v0", conf)
    assert not marker.exists()


def test_unknown_and_mistyped_hyperparameters_are_named() -> None:
    with pytest.raises(TrainingError, match=r"unknown hyperparameter 'n_step' for ppo; known: \["):
        check_hyperparams("ppo", {"n_step": 64})
    with pytest.raises(TrainingError, match=r"'n_steps' must be an integer, got 64\.5"):
        check_hyperparams("ppo", {"n_steps": 64.5})
    with pytest.raises(TrainingError, match="'normalize_advantage' must be true or false"):
        check_hyperparams("ppo", {"normalize_advantage": "yes please"})
    with pytest.raises(TrainingError, match="'n_envs' must be an integer >= 1"):
        check_hyperparams("a2c", {"n_envs": 0})
    with pytest.raises(TrainingError, match="'rollout_buffer_class' cannot be set"):
        check_hyperparams("ppo", {"rollout_buffer_class": "os.system"})


def test_env_kwargs_must_be_a_json_object() -> None:
    assert parse_env_kwargs('{"instance": {"jobs": 3, "machines": 2}}') == {
        "instance": {"jobs": 3, "machines": 2}
    }
    assert parse_env_kwargs(None) == {}
    with pytest.raises(TrainingError, match="not valid JSON"):
        parse_env_kwargs("{'instance': 'ft06'}")
    with pytest.raises(TrainingError, match="must be a JSON object"):
        parse_env_kwargs('["ft06"]')


@pytest.mark.parametrize("algo", sorted(SB3_ALGOS))
def test_shipped_configs_are_valid(algo: str) -> None:
    data = yaml.safe_load((CONFIG_DIR / f"{algo}.yml").read_text())
    assert "autofab/JobShop-v0" in data
    for env_id in data:
        check_hyperparams(algo, load_hyperparams(algo, env_id))


def test_run_folder_name_is_folder_safe() -> None:
    assert run_folder_name("autofab/JobShop-v0", "ppo", 3, 1700000000.5) == (
        "autofab-JobShop-v0__ppo__3__1700000000"
    )


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algo": "sac"}, "unknown algo 'sac'"),
        ({"env_id": "autofab/Nope-v0"}, "unknown env id 'autofab/Nope-v0'"),
        ({"env_kwargs": {"instance": "nope"}}, "cannot make autofab/JobShop-v0"),
        ({"env_kwargs": {"colour": "red"}}, "cannot make autofab/JobShop-v0"),
        (
            {"algo": "dqn", "env_id": "autofab/Factory-v0", "env_kwargs": {}},
            "dqn needs a Discrete action space",
        ),
        ({"algo": "maskable_ppo", "env_id": "CartPole-v1", "env_kwargs": {}}, "action_masks"),
        ({"hyperparams": {"gamma": "high"}}, "'gamma' must be a number"),
        ({"n_timesteps": 0}, "number of timesteps"),
    ],
)
def test_bad_input_raises_training_error_and_leaves_no_folder(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        train_one(_spec(tmp_path, **changes))
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- tiny runs


@pytest.mark.parametrize(
    ("algo", "hyperparams"),
    [
        ("ppo", {"n_envs": 2, "n_steps": 32, "batch_size": 32, "n_epochs": 1}),
        ("a2c", {"n_envs": 2, "n_steps": 8}),
        ("dqn", {"learning_starts": 32, "buffer_size": 500}),
    ],
)
def test_unmasked_algorithms_train_and_deploy_with_valid_actions(
    tmp_path: Path, algo: str, hyperparams: dict[str, Any]
) -> None:
    result = train_one(_spec(tmp_path, algo=algo, hyperparams=hyperparams))
    assert result.timesteps >= 128
    assert result.mean_makespan is not None
    env = gym.make("autofab/JobShop-v0", instance="ft06")
    policy = load_policy(result.run_dir, env)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        mask = env.action_masks()
        action = policy(obs, mask)
        assert mask[action]  # the best valid action, although the model has no masking
        obs, _, done, _, _ = env.step(action)


def test_normalised_run_saves_and_reloads_the_normaliser(tmp_path: Path) -> None:
    hyperparams = {"n_envs": 2, "n_steps": 32, "batch_size": 32, "n_epochs": 1, "normalize": True}
    result = train_one(_spec(tmp_path, algo="maskable_ppo", hyperparams=hyperparams))
    assert (Path(result.run_dir) / "vecnormalize.pkl").is_file()
    policy = load_policy(result.run_dir)
    assert policy.normalizer is not None
    assert policy.meta["normalized"] is True
    env = gym.make("autofab/JobShop-v0", instance="ft06")
    obs, _ = env.reset(seed=0)
    assert env.action_masks()[policy(obs, env.action_masks())]


def test_same_seed_same_policy(tmp_path: Path) -> None:
    first = load_policy(train_one(_spec(tmp_path / "a")).run_dir)
    second = load_policy(train_one(_spec(tmp_path / "b")).run_dir)
    for a, b in zip(first.model.policy.parameters(), second.model.policy.parameters(), strict=True):
        assert (a == b).all()
