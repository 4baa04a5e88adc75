"""Self-labeling dispatcher: features, a tiny training run, valid actions, save and load."""

from __future__ import annotations

import numpy as np
import pytest

from autofab.agents.policies.evaluation import evaluate
from autofab.agents.policies.self_labeling import (
    N_FEATURES,
    SelfLabelingPolicy,
    job_features,
    load,
    save,
    train_self_labeling,
)
from autofab.envs.jobshop import JobShopEnv


@pytest.fixture(scope="module")
def policy() -> SelfLabelingPolicy:
    return train_self_labeling(
        iterations=1, samples=2, sizes=[(4, 3)], imitation_instances=1, seed=0
    )


def test_features_follow_the_instance_size():
    env = JobShopEnv({"jobs": 5, "machines": 3})
    obs, _ = env.reset(seed=1)
    feats = job_features(obs, 5)
    assert feats.shape == (5, N_FEATURES)
    np.testing.assert_array_equal(feats[:, 5], env.action_masks().astype(np.float32))
    assert job_features(np.stack([obs, obs]), 5).shape == (2, 5, N_FEATURES)


@pytest.mark.parametrize("instance", ["ft06", {"jobs": 7, "machines": 4}])
def test_actions_are_valid_on_any_size(policy, instance):
    env = JobShopEnv(instance)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        mask = env.action_masks()
        action = policy(obs, mask)
        assert mask[action]
        obs, _, done, _, _ = env.step(action)


def test_save_and_load_round_trip(policy, tmp_path):
    path = save(policy, tmp_path / "slj.npz")
    again = load(path)
    env = JobShopEnv("ft06")
    obs, _ = env.reset(seed=0)
    mask = env.action_masks()
    feats = job_features(obs, len(mask))
    np.testing.assert_allclose(again.scores(feats), policy.scores(feats))


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, w0=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a self-labeling policy"):
        load(path)


def test_evaluate_runs_it_as_a_policy(policy):
    doc = evaluate(["ft06"], [], 1.0, policy=policy)
    assert doc["instances"]["ft06"]["methods"]["policy"]["makespan"] >= 55


def test_bad_arguments_name_the_fault():
    with pytest.raises(ValueError, match="samples=0"):
        train_self_labeling(iterations=1, samples=0)
