"""One learned policy for every machine: parameter sharing on ``factory_parallel_v0``.

Every machine of the plant is an agent of :class:`~autofab.envs.parallel.FactoryParallelEnv`,
and all of them act through one sb3-contrib ``MaskablePPO`` policy, trained on all the
machines' experience at once. The agent's machine one-hot in its observation lets the
one policy act differently per machine, and sharing means a machine type with few
decisions still learns from the others.

Why not SuperSuit: ``pettingzoo_env_to_vec_env_v1`` + ``concat_vec_envs_v1`` (SuperSuit
3.11) does run PPO on this environment, but its vector env has neither ``seed`` (so
``PPO(..., seed=...)`` fails with SB3 2.x) nor ``env_method`` (so ``MaskablePPO`` gets no
action masks). :class:`SharedPolicyVecEnv` is the small adapter that does both: each
(factory, machine) pair is one SB3 sub-environment, masks come from
``infos[agent]["action_mask"]``, and a factory resets itself when its shift ends.

Masks carry the multi-agent semantics into training: an agent whose machine needs no
decision has a single valid action, so its step gives the policy no gradient (its action
was ignored) and only trains the value function, with the shared team reward.

Train and compare with the dispatching baselines, from the repository root::

    python benchmarks/parallel_training.py -n 200000 --seed 0 --eval-seeds 0,1,2,3,4

or from Python::

    from autofab.agents.policies.shared_training import (
        evaluate_shared_policy, train_shared_policy)

    model = train_shared_policy(plant="demo", total_timesteps=200_000, seed=0)
    table = evaluate_shared_policy(model, plant="demo", seeds=range(5))
    # {"shared": {"team_return": ..., "parts_good": ...}, "mwkr": {...}, "first": {...}}

``total_timesteps`` counts agent steps: one environment step of an 8-machine plant is 8.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray
from sb3_contrib import MaskablePPO
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from autofab.envs.factory import PlantSpec
from autofab.envs.parallel import FactoryParallelEnv
from autofab.envs.rules import RULES

__all__ = [
    "KPI_SUMMARY",
    "ParallelPolicy",
    "RuleActions",
    "SharedPolicyActions",
    "SharedPolicyVecEnv",
    "evaluate_shared_policy",
    "make_shared_vec_env",
    "run_parallel_episode",
    "train_shared_policy",
]

#: Picks every live agent's action from the env, its observations and its infos.
ParallelPolicy = Callable[
    [FactoryParallelEnv, Mapping[str, NDArray[np.float32]], Mapping[str, Mapping[str, Any]]],
    dict[str, NDArray[np.int64]],
]

#: Figures averaged over seeds by :func:`evaluate_shared_policy` (KPI name -> how to read
#: it from an episode's result).
KPI_SUMMARY: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "team_return": lambda r: float(r["team_return"]),
    "parts_good": lambda r: float(r["parts_good"]),
    "parts_scrap": lambda r: float(r["parts_scrap"]),
    "tardiness_h": lambda r: float(r["tardiness_s"]) / 3600.0,
    "energy_kwh": lambda r: float(r["energy_kwh"]),
    "energy_cost": lambda r: float(r["energy_cost"]),
    "peak_kw": lambda r: float(r["peak_kw"]),
    "oee": lambda r: float(r["oee"]["oee"]),
    "breakdowns": lambda r: float(r["breakdowns"]),
    "maintenance": lambda r: float(r["maintenance"]),
    "conflicts": lambda r: float(r["conflicts"]),
    "invalid_actions": lambda r: float(r["invalid_actions"]),
}


class SharedPolicyVecEnv(VecEnv):
    """Several :class:`FactoryParallelEnv` as one SB3 ``VecEnv`` with one sub-env per
    (factory, agent): sub-env ``k * n_agents + i`` is agent ``i`` of factory ``k``.

    All agents of a factory step together, get the team reward and end together; a
    finished factory resets itself (``terminal_observation`` in the infos, as SB3 does).
    :meth:`action_masks` (and ``env_method("action_masks")``, what ``MaskablePPO``
    calls) returns each agent's current flat mask. ``seed()`` seeds factory ``k`` with
    the seed of its first sub-env; attributes and methods other than ``action_masks``
    are those of the agent's factory.
    """

    def __init__(self, envs: Sequence[FactoryParallelEnv]) -> None:
        if not envs:
            raise ValueError("SharedPolicyVecEnv needs at least one environment")
        self.envs = list(envs)
        first = self.envs[0]
        self.agents = list(first.possible_agents)
        for env in self.envs[1:]:
            if env.possible_agents != self.agents:
                raise ValueError(
                    f"every factory needs the same agents; got {env.possible_agents} and "
                    f"{self.agents}"
                )
        self.n_agents = len(self.agents)
        obs_space = first.observation_space(self.agents[0])
        act_space = first.action_space(self.agents[0])
        assert isinstance(obs_space, spaces.Box)
        assert isinstance(act_space, spaces.MultiDiscrete)
        super().__init__(
            len(self.envs) * self.n_agents,
            spaces.Box(obs_space.low, obs_space.high, dtype=np.float32),
            spaces.MultiDiscrete(act_space.nvec),
        )
        self._obs = np.zeros((self.num_envs, *obs_space.shape), dtype=np.float32)
        self._masks = np.ones((self.num_envs, int(act_space.nvec.sum())), dtype=bool)
        self._actions: NDArray[np.int64] | None = None

    # ------------------------------------------------------------------ VecEnv

    def reset(self) -> NDArray[np.float32]:
        for k, env in enumerate(self.envs):
            first = k * self.n_agents
            obs, infos = env.reset(seed=self._seeds[first], options=self._options[first] or None)
            self._store(k, obs, infos)
            for i, agent in enumerate(self.agents):
                self.reset_infos[first + i] = infos[agent]
        self._reset_seeds()
        self._reset_options()
        return self._obs.copy()

    def step_async(self, actions: NDArray[np.int64]) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async()")
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        out_infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for k, env in enumerate(self.envs):
            first = k * self.n_agents
            actions = {a: self._actions[first + i] for i, a in enumerate(self.agents)}
            obs, rew, terminated, truncated, infos = env.step(actions)
            done = not env.agents
            for i, agent in enumerate(self.agents):
                j = first + i
                rewards[j] = rew[agent]
                dones[j] = done
                info = dict(infos[agent])
                if done:
                    info["terminal_observation"] = obs[agent]
                    info["TimeLimit.truncated"] = truncated[agent] and not terminated[agent]
                out_infos[j] = info
            if done:
                obs, infos = env.reset()
                for i, agent in enumerate(self.agents):
                    self.reset_infos[first + i] = infos[agent]
            self._store(k, obs, infos)
        self._actions = None
        return self._obs.copy(), rewards, dones, out_infos

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def action_masks(self) -> NDArray[np.bool_]:
        """Every sub-env's flat action mask, ``(num_envs, sum(nvec))``."""
        return self._masks.copy()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "action_masks":
            return [functools.partial(self._mask, i) for i in self._get_indices(indices)]
        return [
            getattr(self.envs[i // self.n_agents], attr_name) for i in self._get_indices(indices)
        ]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._get_indices(indices):
            setattr(self.envs[i // self.n_agents], attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        return [
            method(*method_args, **method_kwargs) for method in self.get_attr(method_name, indices)
        ]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    # ------------------------------------------------------------------ internals

    def _mask(self, index: int) -> NDArray[np.bool_]:
        return self._masks[index].copy()

    def _store(
        self,
        k: int,
        obs: Mapping[str, NDArray[np.float32]],
        infos: Mapping[str, Mapping[str, Any]],
    ) -> None:
        first = k * self.n_agents
        for i, agent in enumerate(self.agents):
            self._obs[first + i] = obs[agent]
            self._masks[first + i] = infos[agent]["action_mask"]


def make_shared_vec_env(
    plant: PlantSpec = "demo",
    n_envs: int = 1,
    horizon: str | float | None = None,
    **env_kwargs: Any,
) -> VecMonitor:
    """``n_envs`` factories as one monitored :class:`SharedPolicyVecEnv`; ``env_kwargs``
    go to :class:`FactoryParallelEnv`. Episode returns in SB3's logs are team returns."""
    if not isinstance(n_envs, int) or n_envs < 1:
        raise ValueError(f"n_envs must be an integer >= 1, got {n_envs!r}")
    envs = [FactoryParallelEnv(plant, horizon=horizon, **env_kwargs) for _ in range(n_envs)]
    return VecMonitor(SharedPolicyVecEnv(envs))


def train_shared_policy(
    plant: PlantSpec = "demo",
    total_timesteps: int = 200_000,
    seed: int = 0,
    *,
    horizon: str | float | None = None,
    n_envs: int = 1,
    n_steps: int = 256,
    batch_size: int = 256,
    learning_rate: float = 3e-4,
    ent_coef: float = 0.01,
    verbose: int = 0,
    tensorboard_log: str | None = None,
    progress_bar: bool = False,
    env_kwargs: Mapping[str, Any] | None = None,
    **ppo_kwargs: Any,
) -> MaskablePPO:
    """Train one ``MaskablePPO`` policy for every machine of ``plant`` and return it.

    ``total_timesteps`` counts agent steps (environment steps x machines x ``n_envs``);
    ``n_steps`` is per sub-env, so one rollout holds ``n_steps x machines x n_envs``
    transitions. The same ``seed`` gives the same shifts and the same policy (on the same
    torch build and device). Further keyword arguments go to ``MaskablePPO``.
    """
    venv = make_shared_vec_env(plant, n_envs, horizon, **dict(env_kwargs or {}))
    model = MaskablePPO(
        "MlpPolicy",
        venv,
        n_steps=n_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        ent_coef=ent_coef,
        seed=seed,
        verbose=verbose,
        tensorboard_log=tensorboard_log,
        **ppo_kwargs,
    )
    model.learn(total_timesteps=total_timesteps, progress_bar=progress_bar)
    return model


# --------------------------------------------------------------------------- evaluation


class SharedPolicyActions:
    """A trained shared policy as a :data:`ParallelPolicy`: one batched, masked
    prediction for all agents of a step (deterministic by default)."""

    def __init__(self, model: MaskablePPO, deterministic: bool = True) -> None:
        self.model = model
        self.deterministic = deterministic

    def __call__(
        self,
        env: FactoryParallelEnv,
        observations: Mapping[str, NDArray[np.float32]],
        infos: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, NDArray[np.int64]]:
        agents = env.agents
        obs = np.stack([observations[a] for a in agents])
        masks = np.stack([infos[a]["action_mask"] for a in agents])
        actions, _ = self.model.predict(obs, action_masks=masks, deterministic=self.deterministic)
        return {a: np.asarray(actions[i], dtype=np.int64) for i, a in enumerate(agents)}


class RuleActions:
    """A dispatching rule in the parallel env's action space, as a baseline.

    Each deciding machine starts the best-scoring job by ``rule`` (any name in
    :data:`~autofab.envs.rules.RULES`) among its candidate slots, or with ``"first"`` the
    job in slot 0 (the earliest due date), at the speed level nearest nominal, and never
    maintains. Deciders go in machine order and skip jobs an earlier one claimed this
    step, so the baseline never loses a step to a conflict: it is the centralised
    dispatcher that the learned, decentralised agents are measured against.
    """

    def __init__(self, rule: str = "mwkr") -> None:
        key = rule.lower()
        if key != "first" and key not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose 'first' or one of {list(RULES)}")
        self.rule = key

    def __call__(
        self,
        env: FactoryParallelEnv,
        observations: Mapping[str, NDArray[np.float32]],
        infos: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, NDArray[np.int64]]:
        model = env.model
        assert model is not None
        scores = None if self.rule == "first" else RULES[self.rule](model)
        claimed: set[int] = set()
        actions = {a: np.array([env.slots, 0, 0], dtype=np.int64) for a in env.agents}
        for agent in env.deciders:
            jobs = env.slot_jobs(agent)
            free = [s for s, j in enumerate(jobs.tolist()) if j not in claimed]
            slot = env.slots
            if free:
                slot = free[0] if scores is None else min(free, key=lambda s: scores[jobs[s]])
                claimed.add(int(jobs[slot]))
            actions[agent] = np.array([slot, _nominal_level(env, agent), 0], dtype=np.int64)
        return actions


def _nominal_level(env: FactoryParallelEnv, agent: str) -> int:
    m = env.possible_agents.index(agent)
    nominal = float(env.plant.speed_nominal[m])
    gaps = [abs(env.speed_of_level(agent, level) - nominal) for level in range(env.speed_levels)]
    return int(np.argmin(gaps))


def run_parallel_episode(
    env: FactoryParallelEnv, policy: ParallelPolicy, seed: int
) -> dict[str, Any]:
    """One shift from ``reset(seed=seed)`` under ``policy``: the model's KPIs plus
    ``team_return`` (the summed team reward) and the episode's ``conflicts`` and
    ``invalid_actions`` over all agents."""
    observations, infos = env.reset(seed=seed)
    team_return = 0.0
    while env.agents:
        actions = policy(env, observations, infos)
        observations, rewards, _, _, infos = env.step(actions)
        team_return += next(iter(rewards.values()))
    result = dict(next(iter(infos.values()))["kpis"])
    result["team_return"] = team_return
    result["conflicts"] = sum(int(i["conflicts"]) for i in infos.values())
    result["invalid_actions"] = sum(int(i["invalid_actions"]) for i in infos.values())
    return result


def evaluate_shared_policy(
    model: MaskablePPO,
    plant: PlantSpec = "demo",
    seeds: Iterable[int] = (0, 1, 2),
    horizon: str | float | None = None,
    baselines: Sequence[str] = ("mwkr", "first"),
    deterministic: bool = True,
    env_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean :data:`KPI_SUMMARY` figures over ``seeds`` for the shared policy (key
    ``"shared"``) and each baseline rule (:class:`RuleActions`), all run through the same
    environment on the same seeds, so each seed gives every policy the same orders.

    ``env_kwargs`` must match what the policy was trained with (slots, speed levels,
    ``others``): the observation and action shapes depend on them.
    """
    env = FactoryParallelEnv(plant, horizon=horizon, **dict(env_kwargs or {}))
    policies: dict[str, ParallelPolicy] = {"shared": SharedPolicyActions(model, deterministic)}
    policies.update({name: RuleActions(name) for name in baselines})
    seed_list = list(seeds)
    if not seed_list:
        raise ValueError("evaluate_shared_policy needs at least one seed")
    table: dict[str, dict[str, float]] = {}
    for name, policy in policies.items():
        results = [run_parallel_episode(env, policy, seed) for seed in seed_list]
        table[name] = {
            kpi: float(np.mean([read(r) for r in results])) for kpi, read in KPI_SUMMARY.items()
        }
    return table
