"""``factory_parallel_v0``: every machine of a factory is an agent (PettingZoo).

Registered the PettingZoo way, as its own environments are: this module exposes
:func:`parallel_env` (the native :class:`FactoryParallelEnv`), :func:`env` (the AEC
version, through ``parallel_to_aec``) and :func:`raw_env` (AEC, without the
order-enforcing wrapper)::

    from autofab.envs import parallel as factory_parallel_v0

    env = factory_parallel_v0.parallel_env(plant="demo", horizon="2h")
    observations, infos = env.reset(seed=0)
    while env.agents:
        actions = {a: env.action_space(a).sample(infos[a]["action_mask"]) for a in env.agents}
        observations, rewards, terminations, truncations, infos = env.step(actions)

The environment steps the same :class:`~autofab.envs.factory_model.FactoryModel` as
``Factory-v0`` and observes it with the same :class:`~autofab.envs.factory.FactoryObserver`,
so a policy trained here meets the same plant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from numpy.typing import NDArray
from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec, parallel_to_aec_wrapper

from autofab.envs.factory import (
    FactoryObserver,
    FactorySettings,
    MaskedMultiDiscrete,
    PlantSpec,
    reward_totals,
    speed_of_level,
)
from autofab.envs.factory_model import FactoryModel, MachineStatus
from autofab.envs.model import InvalidActionError

__all__ = [
    "FactoryParallelEnv",
    "env",
    "parallel_env",
    "raw_env",
]

ObsArray = NDArray[np.float32]
ActionArray = NDArray[np.int64]
#: What ``step`` returns: observations, rewards, terminations, truncations, infos.
StepReturn = tuple[
    dict[str, ObsArray],
    dict[str, float],
    dict[str, bool],
    dict[str, bool],
    dict[str, dict[str, Any]],
]

_NO_JOBS = np.zeros(0, dtype=np.int64)


class FactoryParallelEnv(FactorySettings, ParallelEnv[str, ObsArray, ActionArray]):
    """Run one shift of a factory in which every machine is an agent.

    ## Description

    The plant is :class:`~autofab.envs.factory_model.FactoryModel`, the one ``Factory-v0``
    steps: orders arrive, machines process operations at their speed setpoints, wear,
    break down, draw power under a time-of-use tariff and a peak cap, consume material and
    make good or defective parts. Where ``Factory-v0`` decides for one idle machine at a
    time, here each machine decides for itself, and all machines that need a decision at
    the same instant decide together.

    ## Agents

    One agent per machine, named as the machine (``mill-1``, ``lathe-2``, ...), in the
    plant's machine order. Every agent is live from reset to the end of the shift.

    ## Action Space

    Per agent, ``MultiDiscrete([slots + 1, speed_levels, 2])`` as in ``Factory-v0``: the
    candidate slot to start (slot ``slots`` means wait), the speed level (evenly spaced
    over the machine's ``[min, max]``) and maintain (1 starts maintenance and overrides
    the slot).

    Each step, the actions of the agents whose machine needs a decision
    (``model.needs_decision()``) are applied in machine order. A slot whose job an earlier
    agent took this step (or whose material it used up) becomes a wait, counted in
    ``infos[agent]["conflicts"]``; so the first machine in plant order wins a contested
    job, deterministically. An empty slot also waits, counted in
    ``infos[agent]["invalid_actions"]`` (or raises with ``invalid_action="raise"``).
    The other agents still submit an action, as PettingZoo's parallel API asks, and it is
    ignored; ``actions`` may leave them out.

    ``infos[agent]["action_mask"]`` (and :meth:`action_mask`) is flat over the three
    components, like ``Factory-v0.action_masks()``. An agent that needs a decision may
    pick any filled slot or wait, any speed level, and maintain or not. An agent that
    needs none has one valid action, the no-op ``(slots, 0, 0)``: its action does not
    matter, and a single valid choice gives masked policy-gradient methods no gradient
    from a step its action did not influence. ``action_space(agent).sample()`` follows the
    live mask, as in ``Factory-v0``.

    ## Observation Space

    Per agent, ``Box(-10, 10, float32)``, built by :class:`FactoryObserver`: the agent's
    machine one-hot (so one shared policy can tell machines apart), its own machine
    features (whose ``needs_decision`` flag says whether its action counts), its own
    candidate-slot features (zeros when it needs no decision), the plant features, and,
    with ``others=True``, a summary of the other machines (:attr:`OTHER_FEATURES`): the
    share of them idle, running, down, in maintenance and needing a decision now, and the
    share of the machines sharing a capability with this one (its competitors for jobs)
    that also decide now. Health is not observed.

    ## Rewards

    A shared team reward: every agent gets the same reward each step,
    ``sum(weights[k] * change_k)`` over the step with ``Factory-v0``'s
    :data:`~autofab.envs.factory.DEFAULT_REWARD_WEIGHTS` (override any of them with
    ``reward_weights``): ``+parts`` finished, ``-tardiness_h`` accrued, ``-energy_cost``,
    ``-over_cap_h`` above the peak cap, ``-cap_violations`` and ``-scrap``. The plant's
    outcome is joint (parts need several machines; the cap and tariff are plant-wide), so
    credit is not split: the sum over an episode, for any agent, is the weighted sum of
    the final KPIs, as in ``Factory-v0``.

    ## Starting State

    The shift start, with orders, initial health and every other draw from the RNG seeded
    by ``reset(seed=...)``, as in ``Factory-v0`` (the same seed gives the same orders).

    ## Episode End

    Every agent terminates together at the end of the shift or when every order is done;
    nothing truncates. ``infos[agent]["kpis"]`` holds the plant's KPI dict
    (:meth:`~autofab.envs.factory_model.FactoryModel.kpis`) at every step; it is one dict,
    shared by all agents.

    ## Arguments

    * ``plant``: a shipped plant name (``"demo"``), a YAML path, a mapping or a config.
    * ``horizon``: shift length (``"8h"``, ``"30m"``, seconds); default the plant's.
    * ``slots``: candidate jobs each agent sees and can pick (default 8).
    * ``speed_levels``: number of speed choices (default 5).
    * ``reward_weights``: overrides of :data:`~autofab.envs.factory.DEFAULT_REWARD_WEIGHTS`.
    * ``invalid_action``: ``"wait"`` (default) or ``"raise"`` for an empty slot.
    * ``others``: append the summary of the other machines (default True).
    * ``render_mode``: ``"ansi"`` or None.

    ## Version History

    * v0: initial version.
    """

    metadata: dict[str, Any] = {  # noqa: RUF012
        "name": "factory_parallel_v0",
        "render_modes": ["ansi"],
        "is_parallelizable": True,
    }

    #: The summary of the other machines appended with ``others=True``.
    OTHER_FEATURES = ("idle", "running", "down", "maintenance", "needs_decision", "rivals")

    def __init__(
        self,
        plant: PlantSpec = "demo",
        horizon: str | float | None = None,
        slots: int = 8,
        speed_levels: int = 5,
        reward_weights: Mapping[str, float] | None = None,
        invalid_action: Literal["wait", "raise"] = "wait",
        others: bool = True,
        render_mode: str | None = None,
    ) -> None:
        self._configure(
            plant, horizon, slots, speed_levels, reward_weights, invalid_action, render_mode
        )
        self.others = bool(others)

        p = self.plant
        n = p.n_machines
        self.possible_agents: list[str] = list(p.machine_names)
        self.agents: list[str] = []
        self._index = {name: i for i, name in enumerate(self.possible_agents)}
        machine_width = len(FactoryObserver.MACHINE_FEATURES)
        self._size = (
            n
            + machine_width
            + self.observer.slot_size
            + self.observer.plant_size
            + len(self.OTHER_FEATURES) * self.others
        )
        clip = FactoryObserver.CLIP
        self.observation_spaces: dict[str, spaces.Space[Any]] = {
            a: spaces.Box(-clip, clip, (self._size,), dtype=np.float32)
            for a in self.possible_agents
        }
        self.action_spaces: dict[str, spaces.Space[Any]] = {
            a: MaskedMultiDiscrete([slots + 1, speed_levels, 2]) for a in self.possible_agents
        }
        caps = p.machine_capabilities
        self._rivals = np.array(
            [[i != j and bool(caps[i] & caps[j]) for j in range(n)] for i in range(n)]
        )
        # Masks: a decider may choose freely but for empty slots; the rest have the no-op.
        self._noop_mask = np.zeros(slots + 1 + speed_levels + 2, dtype=bool)
        self._noop_mask[[slots, slots + 1, slots + 1 + speed_levels]] = True

        self.model: FactoryModel | None = None
        self._np_random: np.random.Generator | None = None
        self._deciders = np.zeros(0, dtype=np.int64)
        self._slot_jobs: list[NDArray[np.int64]] = [_NO_JOBS] * n
        self._masks = np.tile(self._noop_mask, (n, 1))
        self._totals: dict[str, float] = {}
        #: Per machine, this episode: choices that became waits because an earlier agent
        #: took the job (or its material) in the same step.
        self.conflicts = np.zeros(n, dtype=np.int64)
        #: Per machine, this episode: empty slots chosen (waits).
        self.invalid_actions = np.zeros(n, dtype=np.int64)

    # ------------------------------------------------------------------ spaces

    def observation_space(self, agent: str) -> spaces.Space[Any]:
        self._agent_index(agent)  # names an unknown agent
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space[Any]:
        self._agent_index(agent)
        return self.action_spaces[agent]

    @property
    def np_random(self) -> np.random.Generator:
        """The environment's RNG, seeded by ``reset(seed=...)`` (the model draws from it)."""
        if self._np_random is None:
            self._np_random, _ = seeding.np_random()
        return self._np_random

    # ------------------------------------------------------------------ API

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, ObsArray], dict[str, dict[str, Any]]]:
        """Start a new shift; with ``seed`` the RNG is reseeded, without it the RNG goes on
        (Gymnasium's convention), so a seeded first reset makes the whole run repeatable."""
        if seed is not None or self._np_random is None:
            self._np_random, _ = seeding.np_random(seed)
        self.model = FactoryModel.from_config(self.plant, self._np_random, self.horizon_s)
        self.agents = list(self.possible_agents)
        self.conflicts[:] = 0
        self.invalid_actions[:] = 0
        self._totals = self._reward_totals()
        self.model.advance_to_decision()
        self._prepare_decisions()
        return self._observations(), self._infos()

    def step(self, actions: Mapping[str, Any]) -> StepReturn:
        """Apply the deciding agents' actions in machine order, then run the plant until
        some machine needs a decision or the shift ends."""
        model = self.model
        if model is None:
            raise InvalidActionError("call reset() before step()")
        if not self.agents:
            raise InvalidActionError("the shift is over; call reset()")
        unknown = set(actions) - set(self.possible_agents)
        if unknown:
            raise InvalidActionError(
                f"actions for unknown agents {sorted(unknown)}; agents: {self.possible_agents}"
            )
        chosen: list[tuple[int, int, int, int]] = []
        for m in self._deciders.tolist():
            name = self.possible_agents[m]
            if name not in actions:
                raise InvalidActionError(
                    f"agent {name} needs a decision but has no action; deciding now: "
                    f"{self.deciders}"
                )
            slot, level, maintain = self._parse(name, actions[name])
            n_jobs = len(self._slot_jobs[m])
            if n_jobs <= slot < self.slots and not maintain and self.invalid_action == "raise":
                raise InvalidActionError(
                    f"agent {name}: slot {slot} is empty ({n_jobs} candidates); valid "
                    f"slots: {[*range(n_jobs), self.slots]}"
                )
            chosen.append((m, slot, level, maintain))
        for m, slot, level, maintain in chosen:
            self._apply(model, m, slot, level, maintain)
        model.advance_to_decision()
        totals = self._reward_totals()
        w = self.reward_weights
        reward = float(sum(w[k] * (totals[k] - self._totals[k]) for k in w))
        self._totals = totals
        done = model.done
        self._prepare_decisions()
        agents = self.agents
        observations = self._observations()
        infos = self._infos()
        rewards = dict.fromkeys(agents, reward)
        terminations = dict.fromkeys(agents, done)
        truncations = dict.fromkeys(agents, False)
        if done:
            self.agents = []
        return observations, rewards, terminations, truncations, infos

    def action_mask(self, agent: str) -> NDArray[np.bool_]:
        """``agent``'s valid choices now, flat over slot, speed level and maintain."""
        return self._masks[self._agent_index(agent)].copy()

    @property
    def deciders(self) -> list[str]:
        """The agents whose action counts this step (their machine needs a decision)."""
        return [self.possible_agents[m] for m in self._deciders.tolist()]

    def slot_jobs(self, agent: str) -> NDArray[np.int64]:
        """The jobs in ``agent``'s candidate slots now (empty unless it needs a decision)."""
        return self._slot_jobs[self._agent_index(agent)].copy()

    def speed_of_level(self, agent: str, level: int) -> float:
        """The speed setpoint that ``level`` means for ``agent``'s machine."""
        return self._speed(self._agent_index(agent), level)

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self.model is None:
            return None
        m = self.model
        deciding = set(self._deciders.tolist())
        states = " ".join(
            f"{n}:{MachineStatus(int(s)).name[0]}{'*' if i in deciding else ''}"
            for i, (n, s) in enumerate(zip(self.possible_agents, m.status, strict=True))
        )
        return f"t={m.now / 3600:.2f}h parts={m.jobs_done} {states}"

    def close(self) -> None:
        """Nothing to release: the environment holds no files, windows or processes."""

    # ------------------------------------------------------------------ internals

    def _agent_index(self, agent: str) -> int:
        try:
            return self._index[agent]
        except KeyError:
            raise KeyError(f"unknown agent {agent!r}; agents: {self.possible_agents}") from None

    def _parse(self, agent: str, action: Any) -> tuple[int, int, int]:
        arr = np.asarray(action)
        if arr.shape != (3,) or arr.dtype.kind not in "iu":
            raise InvalidActionError(
                f"agent {agent}: action {action!r} must be 3 integers: slot, speed level, "
                "and maintain"
            )
        slot, level, maintain = (int(x) for x in arr)
        for name, value, n in (
            ("slot", slot, self.slots + 1),
            ("speed level", level, self.speed_levels),
            ("maintain", maintain, 2),
        ):
            if not 0 <= value < n:
                raise InvalidActionError(
                    f"agent {agent}: action {arr.tolist()}: {name} {value} not in [0, {n})"
                )
        return slot, level, maintain

    def _speed(self, m: int, level: int) -> float:
        return speed_of_level(self.plant, m, level, self.speed_levels)

    def _apply(self, model: FactoryModel, m: int, slot: int, level: int, maintain: int) -> None:
        """One agent's decision; a job no longer startable (taken earlier this step) or an
        empty slot becomes a wait."""
        jobs = self._slot_jobs[m]
        job: int | None = None
        if not maintain:
            if slot < len(jobs):
                candidate = int(jobs[slot])
                if candidate in model.candidates(m):
                    job = candidate
                else:
                    self.conflicts[m] += 1
            elif slot != self.slots:
                self.invalid_actions[m] += 1
        model.decide(m, job, self._speed(m, level), bool(maintain))

    def _prepare_decisions(self) -> None:
        """Who decides now, their candidate slots and everyone's masks."""
        model = self.model
        assert model is not None
        n = self.plant.n_machines
        self._deciders = _NO_JOBS if model.done else model.needs_decision()
        self._slot_jobs = [_NO_JOBS] * n
        self._masks = np.tile(self._noop_mask, (n, 1))
        for m in self._deciders.tolist():
            jobs = self.observer.slot_jobs(model, m)
            self._slot_jobs[m] = jobs
            row = self._masks[m]
            row[: len(jobs)] = True
            row[self.slots + 1 :] = True
        for i, agent in enumerate(self.possible_agents):
            space = self.action_spaces[agent]
            assert isinstance(space, MaskedMultiDiscrete)
            space.live_mask = self._masks[i]

    def _reward_totals(self) -> dict[str, float]:
        # The same running totals as Factory-v0's, so the weights mean the same thing.
        assert self.model is not None
        return reward_totals(self.model)

    def _observations(self) -> dict[str, ObsArray]:
        model = self.model
        assert model is not None
        obs = self.observer
        n = self.plant.n_machines
        machines = obs.machines(model, model.sensors())
        if model.done:
            machines[:, -1] = 0.0  # the shift is over: nobody decides any more
        out = np.zeros((n, self._size))
        out[:, :n] = np.eye(n)
        col = n + machines.shape[1]
        out[:, n:col] = machines
        for m in self._deciders.tolist():
            out[m, col : col + obs.slot_size] = obs.slot_features(
                model, m, self._slot_jobs[m]
            ).reshape(-1)
        col += obs.slot_size
        out[:, col : col + obs.plant_size] = obs.plant_features(model)
        col += obs.plant_size
        if self.others:
            out[:, col:] = self._others_summary(machines)
        clipped = np.clip(out, -obs.CLIP, obs.CLIP).astype(np.float32)
        return {a: clipped[i] for i, a in enumerate(self.possible_agents)}

    def _others_summary(self, machines: NDArray[np.float64]) -> NDArray[np.float64]:
        n = len(machines)
        status_and_due = machines[:, [0, 1, 2, 3, len(FactoryObserver.MACHINE_FEATURES) - 1]]
        others = (status_and_due.sum(axis=0) - status_and_due) / max(n - 1, 1)
        due = status_and_due[:, -1]
        rivals = self._rivals.sum(axis=1)
        rivals_due = (self._rivals @ due) / np.maximum(rivals, 1)
        return np.column_stack((others, rivals_due))

    def _infos(self) -> dict[str, dict[str, Any]]:
        model = self.model
        assert model is not None
        kpis = model.kpis()
        deciding = set(self._deciders.tolist())
        return {
            a: {
                "action_mask": self._masks[i].copy(),
                "needs_decision": i in deciding,
                "conflicts": int(self.conflicts[i]),
                "invalid_actions": int(self.invalid_actions[i]),
                "kpis": kpis,
            }
            for i, a in enumerate(self.possible_agents)
        }


def parallel_env(**kwargs: Any) -> FactoryParallelEnv:
    """The native parallel environment; ``kwargs`` as for :class:`FactoryParallelEnv`."""
    return FactoryParallelEnv(**kwargs)


def raw_env(**kwargs: Any) -> AECEnv[str, ObsArray, ActionArray | None]:
    """The AEC version without the order-enforcing wrapper: agents act one after another
    in machine order, and the plant steps once all have acted."""
    return parallel_to_aec_wrapper(parallel_env(**kwargs))


def env(**kwargs: Any) -> AECEnv[str, ObsArray, ActionArray | None]:
    """The AEC version, as PettingZoo's ``env()`` constructors return it (order-enforced)."""
    return parallel_to_aec(parallel_env(**kwargs))
