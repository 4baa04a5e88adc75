"""The parameter-sharing training demo on factory_parallel_v0 (a few hundred agent steps)."""

import numpy as np
import pytest

from autofab.envs import parallel as factory_parallel_v0


@pytest.fixture(scope="module")
def shared_training():
    pytest.importorskip("sb3_contrib")
    from autofab.agents.policies import shared_training

    return shared_training


def test_vec_env_adapter_has_one_sub_env_per_agent_and_resets_finished_shifts(
    shared_training,
) -> None:
    envs = [factory_parallel_v0.parallel_env(horizon="30m") for _ in range(2)]
    venv = shared_training.SharedPolicyVecEnv(envs)
    n = len(envs[0].possible_agents)
    assert venv.num_envs == 2 * n
    venv.seed(3)
    obs = venv.reset()
    assert obs.shape == (2 * n, *envs[0].observation_space("mill-1").shape)
    assert envs[1].model.instance.release.tolist() != envs[0].model.instance.release.tolist()
    masks = np.stack(venv.env_method("action_masks"))
    assert np.array_equal(masks, venv.action_masks())
    assert np.array_equal(
        masks[n : 2 * n], np.stack([envs[1].action_mask(a) for a in envs[1].agents])
    )
    wait = np.tile([envs[0].slots, 0, 0], (venv.num_envs, 1))
    for _ in range(500):
        obs, rewards, dones, infos = venv.step(wait)
        assert len(set(rewards[:n].tolist())) == 1  # the team reward
        if dones.any():
            break
    assert dones[:n].all()
    assert all("terminal_observation" in info for info in infos[:n])
    assert envs[0].agents  # already reset for the next shift
    assert envs[0].model.now == 0.0


def test_shared_policy_trains_and_acts_within_the_masks(shared_training) -> None:
    model = shared_training.train_shared_policy(
        plant="demo", total_timesteps=256, seed=0, horizon="1h", n_steps=16, batch_size=64
    )
    assert model.num_timesteps >= 256
    env = factory_parallel_v0.parallel_env(horizon="1h")
    policy = shared_training.SharedPolicyActions(model)
    observations, infos = env.reset(seed=1)
    while env.agents:
        actions = policy(env, observations, infos)
        for agent, action in actions.items():
            mask = infos[agent]["action_mask"]
            assert mask[action[0]]
            assert mask[env.slots + 1 + action[1]]
            assert mask[env.slots + 1 + env.speed_levels + action[2]]
        observations, _, _, _, infos = env.step(actions)
    assert all(i["invalid_actions"] == 0 for i in infos.values())

    table = shared_training.evaluate_shared_policy(model, seeds=[5], horizon="1h")
    assert set(table) == {"shared", "mwkr", "first"}
    assert set(table["shared"]) == set(shared_training.KPI_SUMMARY)
    assert table["mwkr"]["conflicts"] == 0
    assert table["first"]["conflicts"] == 0


def test_baseline_kpis_are_the_environment_s(shared_training) -> None:
    env = factory_parallel_v0.parallel_env(horizon="2h")
    result = shared_training.run_parallel_episode(env, shared_training.RuleActions("mwkr"), 2)
    assert result["parts_good"] == env.model.kpis()["parts_good"]
    again = shared_training.run_parallel_episode(env, shared_training.RuleActions("mwkr"), 2)
    assert again == result
    with pytest.raises(ValueError, match="unknown rule"):
        shared_training.RuleActions("fastest")
