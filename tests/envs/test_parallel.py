"""factory_parallel_v0: PettingZoo conformance, seeding, conflicts, masks, rewards, KPIs."""

import warnings

import numpy as np
import pytest
from pettingzoo import AECEnv
from pettingzoo.test import api_test, parallel_api_test, parallel_seed_test, seed_test

from autofab.envs import parallel as factory_parallel_v0
from autofab.envs.factory import FactoryEnv, FactoryObserver
from autofab.envs.factory_model import FactoryModel, MachineStatus
from autofab.envs.model import InvalidActionError
from autofab.envs.parallel import FactoryParallelEnv
from autofab.envs.plant import PlantConfigError

# PettingZoo's checkers recommend Box/Discrete actions and player_0-style names; the
# actions are Factory-v0's MultiDiscrete and the agents carry the plant's machine names.
EXPECTED_WARNINGS = (
    "Action space for each agent probably should be",
    "We recommend agents to be named in the format",
)


def unexpected(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if not str(w.message).startswith(EXPECTED_WARNINGS) and "Passed" not in str(w.message)
    ]


def masked_actions(env: FactoryParallelEnv, infos: dict) -> dict:
    return {a: env.action_space(a).sample(infos[a]["action_mask"]) for a in env.agents}


def run(env: FactoryParallelEnv, seed: int, action_seed: int = 0) -> tuple[list, list, dict]:
    """A whole shift with masked random actions; (observations, rewards, final infos)."""
    obs, infos = env.reset(seed=seed)
    for i, agent in enumerate(env.possible_agents):
        env.action_space(agent).seed(action_seed + i)
    observations, rewards = [obs], []
    while env.agents:
        obs, rew, _, trunc, infos = env.step(masked_actions(env, infos))
        assert not any(trunc.values())
        observations.append(obs)
        rewards.append(rew)
    return observations, rewards, infos


@pytest.fixture
def short_env() -> FactoryParallelEnv:
    return factory_parallel_v0.parallel_env(horizon="2h")


# ---------------------------------------------------------------- PettingZoo conformance


def test_registered_the_pettingzoo_way() -> None:
    assert FactoryParallelEnv.metadata["name"] == "factory_parallel_v0"
    assert FactoryParallelEnv.metadata["is_parallelizable"] is True
    assert isinstance(factory_parallel_v0.parallel_env(), FactoryParallelEnv)
    aec = factory_parallel_v0.env(horizon="1h")
    raw = factory_parallel_v0.raw_env(horizon="1h")
    assert isinstance(aec, AECEnv)
    assert isinstance(raw, AECEnv)
    assert isinstance(aec.unwrapped, FactoryParallelEnv)


def test_parallel_api_test() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel_api_test(factory_parallel_v0.parallel_env(horizon="2h"), num_cycles=1000)
    assert unexpected(caught) == []


def test_parallel_seed_test() -> None:
    parallel_seed_test(lambda: factory_parallel_v0.parallel_env(horizon="2h"))


def test_aec_version_passes_api_test_and_seed_test() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        api_test(factory_parallel_v0.env(horizon="2h"), num_cycles=1000)
        seed_test(lambda: factory_parallel_v0.env(horizon="1h"), num_cycles=200)
    assert unexpected(caught) == []


def test_spaces_are_cached_and_observations_stay_in_the_box(
    short_env: FactoryParallelEnv,
) -> None:
    observations, _, _ = run(short_env, seed=2)
    for agent in short_env.possible_agents:
        assert short_env.observation_space(agent) is short_env.observation_space(agent)
        assert short_env.action_space(agent) is short_env.action_space(agent)
        assert list(short_env.action_space(agent).nvec) == [9, 5, 2]
    for obs in observations:
        for agent, o in obs.items():
            assert short_env.observation_space(agent).contains(o)


# ---------------------------------------------------------------- seeding and episodes


def test_same_seed_same_shift_and_different_seed_differs() -> None:
    a = run(factory_parallel_v0.parallel_env(horizon="3h"), seed=5)
    b = run(factory_parallel_v0.parallel_env(horizon="3h"), seed=5)
    c = run(factory_parallel_v0.parallel_env(horizon="3h"), seed=6)
    assert len(a[0]) == len(b[0])
    for x, y in zip(a[0], b[0], strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert a[1] == b[1]
    assert a[2]["mill-1"]["kpis"] == b[2]["mill-1"]["kpis"]
    assert a[2]["mill-1"]["kpis"] != c[2]["mill-1"]["kpis"]


def test_the_same_seed_gives_factory_v0_s_orders() -> None:
    env = factory_parallel_v0.parallel_env(horizon="2h")
    single = FactoryEnv(horizon="2h")
    env.reset(seed=7)
    single.reset(seed=7)
    assert np.array_equal(env.model.instance.release, single.model.instance.release)
    assert np.array_equal(env.model.orders.job_product, single.model.orders.job_product)


def test_reset_without_seed_goes_on_with_the_rng(short_env: FactoryParallelEnv) -> None:
    short_env.reset(seed=3)
    first = short_env.model.instance.release.copy()
    short_env.reset()
    assert not np.array_equal(first, short_env.model.instance.release)


def test_episode_ends_for_every_agent_at_the_horizon(short_env: FactoryParallelEnv) -> None:
    short_env.reset(seed=1)
    infos: dict = {}
    terminations: dict = {}
    while short_env.agents:
        _, _, terminations, _, infos = short_env.step(
            {a: short_env.action_space(a).sample() for a in short_env.agents}
        )
    assert set(terminations) == set(short_env.possible_agents)
    assert all(terminations.values())
    kpis = infos["mill-1"]["kpis"]
    assert kpis["sim_time_s"] == pytest.approx(7200.0) or kpis["parts_good"] == kpis["orders"]
    with pytest.raises(InvalidActionError, match="over"):
        short_env.step({})


# ---------------------------------------------------------------- decisions and conflicts


def test_contested_job_goes_to_the_first_machine_in_plant_order() -> None:
    env = factory_parallel_v0.parallel_env(horizon="2h")
    _, infos = env.reset(seed=0)
    assert {"mill-1", "mill-2"} <= set(env.deciders)
    job = int(env.slot_jobs("mill-1")[0])
    assert env.slot_jobs("mill-2")[0] == job
    wait = np.array([env.slots, 2, 0])
    actions = {a: wait for a in env.agents}
    actions["mill-2"] = np.array([0, 2, 0])
    actions["mill-1"] = np.array([0, 2, 0])  # inserted after mill-2: dict order is ignored
    mill1, mill2 = env.possible_agents.index("mill-1"), env.possible_agents.index("mill-2")
    _, _, _, _, infos = env.step(dict(reversed(actions.items())))
    op = env.model.instance.job_offsets[job]
    assert env.model.op_machine[op] == mill1
    assert env.model.status[mill2] == MachineStatus.IDLE
    assert infos["mill-2"]["conflicts"] == 1
    assert infos["mill-1"]["conflicts"] == 0
    assert infos["mill-2"]["invalid_actions"] == 0


def test_actions_of_agents_that_need_no_decision_are_ignored() -> None:
    a = factory_parallel_v0.parallel_env(horizon="2h")
    b = factory_parallel_v0.parallel_env(horizon="2h")
    a.reset(seed=4)
    b.reset(seed=4)
    while a.agents:
        assert a.deciders == b.deciders
        chosen = {x: np.array([0 if len(a.slot_jobs(x)) else a.slots, 2, 0]) for x in a.deciders}
        # a gets only the deciders' actions; b also gets "maintain" for everyone else.
        noisy = {x: chosen.get(x, np.array([0, 4, 1])) for x in b.agents}
        obs_a, *_ = a.step(chosen)
        obs_b, *_ = b.step(noisy)
        assert all(np.array_equal(obs_a[k], obs_b[k]) for k in obs_a)
    assert b.model.maintenances.sum() == 0
    assert a.model.kpis() == b.model.kpis()


def test_empty_slot_waits_by_default_and_raises_on_request() -> None:
    env = factory_parallel_v0.parallel_env(horizon="2h")
    env.reset(seed=0)
    agent = next(a for a in env.deciders if len(env.slot_jobs(a)) < env.slots)
    empty = len(env.slot_jobs(agent))
    actions = {a: np.array([env.slots, 2, 0]) for a in env.agents}
    actions[agent] = np.array([empty, 2, 0])
    _, _, _, _, infos = env.step(actions)
    assert infos[agent]["invalid_actions"] == 1

    strict = factory_parallel_v0.parallel_env(horizon="2h", invalid_action="raise")
    strict.reset(seed=0)
    actions = {a: np.array([strict.slots, 2, 0]) for a in strict.agents}
    actions[agent] = np.array([empty, 2, 0])
    before = strict.model.now
    with pytest.raises(InvalidActionError, match="valid slots"):
        strict.step(actions)
    assert strict.model.now == before
    assert (strict.model.status == MachineStatus.IDLE).all()


@pytest.mark.parametrize("action", [[0, 1], [0.5, 1, 0], [0, 99, 0], [-1, 0, 0], "go"])
def test_malformed_actions_are_refused(short_env: FactoryParallelEnv, action: object) -> None:
    short_env.reset(seed=0)
    agent = short_env.deciders[0]
    with pytest.raises(InvalidActionError, match=agent):
        short_env.step({agent: action})


def test_missing_decider_and_unknown_agent_are_named(short_env: FactoryParallelEnv) -> None:
    short_env.reset(seed=0)
    with pytest.raises(InvalidActionError, match="needs a decision"):
        short_env.step({})
    with pytest.raises(InvalidActionError, match="unknown agents"):
        short_env.step({"robot-9": np.array([0, 0, 0])})
    with pytest.raises(KeyError, match="unknown agent"):
        short_env.action_space("robot-9")


def test_maintain_and_speed_level_reach_the_model() -> None:
    env = factory_parallel_v0.parallel_env(horizon="2h", speed_levels=3)
    env.reset(seed=0)
    maintained, fast = env.deciders[0], env.deciders[1]
    actions = {a: np.array([env.slots, 1, 0]) for a in env.agents}
    actions[maintained] = np.array([0, 1, 1])
    actions[fast] = np.array([0, 2, 0])
    env.step(actions)
    m, f = env.possible_agents.index(maintained), env.possible_agents.index(fast)
    assert env.model.maintenances[m] == 1
    assert env.model.speed[f] == pytest.approx(env.plant.speed_max[f])
    assert env.speed_of_level(fast, 0) == pytest.approx(env.plant.speed_min[f])


# ---------------------------------------------------------------- masks and observations


def test_masks_match_candidates_and_the_needs_decision_flag(
    short_env: FactoryParallelEnv,
) -> None:
    _, infos = short_env.reset(seed=3)
    n = len(short_env.possible_agents)
    flag = n + FactoryObserver.MACHINE_FEATURES.index("needs_decision")
    slots, levels = short_env.slots, short_env.speed_levels
    noop = np.zeros(slots + 1 + levels + 2, dtype=bool)
    noop[[slots, slots + 1, slots + 1 + levels]] = True
    obs = None
    for _ in range(40):
        deciders = set(short_env.deciders)
        assert deciders
        for agent in short_env.agents:
            mask = infos[agent]["action_mask"]
            assert mask.dtype == bool
            assert np.array_equal(mask, short_env.action_mask(agent))
            assert infos[agent]["needs_decision"] == (agent in deciders)
            if obs is not None:
                assert obs[agent][flag] == float(agent in deciders)
            if agent in deciders:
                k = len(short_env.slot_jobs(agent))
                assert mask[:k].all()
                assert not mask[k:slots].any()
                assert mask[slots:].all()
            else:
                assert np.array_equal(mask, noop)
                assert len(short_env.slot_jobs(agent)) == 0
        obs, _, _, _, infos = short_env.step(masked_actions(short_env, infos))
        assert all(i["invalid_actions"] == 0 for i in infos.values())
        if not short_env.agents:
            break


def test_plain_sample_follows_the_live_mask(short_env: FactoryParallelEnv) -> None:
    _, infos = short_env.reset(seed=0)
    for agent in short_env.agents:
        space = short_env.action_space(agent)
        space.seed(0)
        mask = infos[agent]["action_mask"]
        for _ in range(20):
            slot, level, maintain = space.sample()
            assert mask[slot]
            assert mask[short_env.slots + 1 + level]
            assert mask[short_env.slots + 1 + short_env.speed_levels + maintain]


def test_observation_layout(short_env: FactoryParallelEnv) -> None:
    obs, _ = short_env.reset(seed=0)
    n = len(short_env.possible_agents)
    size = (
        n
        + len(FactoryObserver.MACHINE_FEATURES)
        + short_env.slots * len(FactoryObserver.SLOT_FEATURES)
        + len(FactoryObserver.PLANT_FEATURES)
        + len(short_env.plant.material_names)
        + len(FactoryParallelEnv.OTHER_FEATURES)
    )
    assert short_env.observation_space("mill-1").shape == (size,)
    for i, agent in enumerate(short_env.possible_agents):
        assert obs[agent][:n].tolist() == [float(j == i) for j in range(n)]
        others = obs[agent][-len(FactoryParallelEnv.OTHER_FEATURES) :]
        assert others[0] == pytest.approx(1.0)  # every other machine is idle at the start
        # ... and its rivals (machines sharing a capability) all decide now.
        assert others[-1] == (0.0 if agent in ("grind-1", "assembly-1") else 1.0)
    without = factory_parallel_v0.parallel_env(horizon="2h", others=False)
    assert without.observation_space("mill-1").shape == (size - 6,)


# ---------------------------------------------------------------- rewards and KPIs


def test_team_reward_is_shared_and_sums_to_the_weighted_kpis(expected_return) -> None:
    weights = {"parts": 2.0, "tardiness_h": 0.3, "energy_cost": 0.1, "scrap": 1.5}
    env = factory_parallel_v0.parallel_env(horizon="4h", reward_weights=weights)
    _, rewards, infos = run(env, seed=4)
    for step_rewards in rewards:
        assert len(set(step_rewards.values())) == 1
    k = infos["mill-1"]["kpis"]
    expected = expected_return(k, weights)
    assert sum(r["mill-1"] for r in rewards) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_reward_totals_are_factory_v0_s(short_env: FactoryParallelEnv) -> None:
    run(short_env, seed=2)
    single = FactoryEnv(horizon="2h")
    single.model = short_env.model
    assert short_env._reward_totals() == single._reward_totals()


def test_kpis_are_the_model_s_under_the_same_decisions() -> None:
    """A bare FactoryModel, stepped with the same decisions (first candidate, nominal
    speed) and the same sensor reads, ends with the KPIs the environment reports."""
    seed, horizon = 11, 3 * 3600.0
    env = factory_parallel_v0.parallel_env(horizon=horizon)
    level = (env.speed_levels - 1) // 2
    _, infos = env.reset(seed=seed)
    while env.agents:
        actions = {
            a: np.array([0 if len(env.slot_jobs(a)) else env.slots, level, 0]) for a in env.agents
        }
        _, _, _, _, infos = env.step(actions)

    model = FactoryModel.from_config(env.plant, np.random.default_rng(seed), horizon)
    observer = FactoryObserver(env.plant, env.slots)
    conflicts = 0
    model.advance_to_decision()
    model.sensors()
    while not model.done:
        # Every decider chose from what it observed, before anyone acted.
        seen = {m: observer.slot_jobs(model, m) for m in model.needs_decision().tolist()}
        for m, jobs in seen.items():
            job = int(jobs[0]) if len(jobs) else None
            if job is not None and job not in model.candidates(m):
                job, conflicts = None, conflicts + 1
            model.decide(m, job, env.speed_of_level(env.possible_agents[m], level))
        model.advance_to_decision()
        model.sensors()
    assert infos["mill-1"]["kpis"] == model.kpis()
    assert sum(i["conflicts"] for i in infos.values()) == conflicts


# ---------------------------------------------------------------- arguments and rendering


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reward_weights": {"profit": 1.0}}, "unknown reward weight"),
        ({"reward_weights": {"parts": float("nan")}}, "finite"),
        ({"slots": 0}, "slots"),
        ({"speed_levels": 0}, "speed_levels"),
        ({"horizon": "8x"}, "duration"),
        ({"invalid_action": "ignore"}, "invalid_action"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory_parallel_v0.parallel_env(**kwargs)


def test_bad_plant_config_is_named() -> None:
    with pytest.raises(PlantConfigError, match="not found"):
        factory_parallel_v0.parallel_env(plant="no-such-plant")


def test_step_before_reset_is_refused() -> None:
    with pytest.raises(InvalidActionError, match="reset"):
        factory_parallel_v0.parallel_env().step({})


def test_ansi_render_marks_the_deciders() -> None:
    env = factory_parallel_v0.parallel_env(horizon="1h", render_mode="ansi")
    assert env.render() is None
    env.reset(seed=0)
    text = env.render()
    assert text is not None
    assert text.startswith("t=0.00h parts=0 ")
    assert "mill-1:I*" in text
