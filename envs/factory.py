"""``autofab/Factory-v0``: run a factory shift, deciding for one idle machine at a time."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

from autofab.envs.factory_model import Decision, FactoryModel, MachineStatus
from autofab.envs.model import InvalidActionError
from autofab.envs.plant import PlantArrays, PlantConfig, compile_plant, load_plant, parse_duration

__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "FactoryEnv",
    "FactoryObserver",
    "FactorySettings",
    "MaskedMultiDiscrete",
    "check_factory_args",
    "merge_reward_weights",
    "plant_arrays",
    "reward_totals",
    "speed_of_level",
]

#: Reward = sum of weight x change over the step, see :class:`FactoryEnv`.
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {
    "parts": 1.0,  # per good part (finished order)
    "tardiness_h": 0.05,  # per hour of tardiness accrued (all late orders, open or done)
    "energy_cost": 0.05,  # per currency unit of energy bought
    "over_cap_h": 20.0,  # per hour spent above the plant peak-power cap
    "cap_violations": 1.0,  # per new excursion above the cap
    "scrap": 0.5,  # per scrapped part
    "maintenance": 0.25,  # per maintenance started (technician time and parts)
}

PlantSpec = str | Path | Mapping[str, Any] | PlantConfig | PlantArrays


def plant_arrays(plant: PlantSpec) -> PlantArrays:
    """Compile a plant given by name, path, mapping or config (arrays pass through)."""
    if isinstance(plant, PlantArrays):
        return plant
    return compile_plant(load_plant(plant))


def check_factory_args(
    slots: int, speed_levels: int, invalid_action: str, render_mode: str | None
) -> None:
    """The argument checks shared by ``Factory-v0`` and ``factory_parallel_v0``."""
    if render_mode is not None and render_mode != "ansi":
        raise ValueError(f"render_mode {render_mode!r} is not supported; use 'ansi' or None")
    if not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
    if not isinstance(speed_levels, int) or speed_levels < 1:
        raise ValueError(f"speed_levels must be an integer >= 1, got {speed_levels!r}")
    if invalid_action not in ("wait", "raise"):
        raise ValueError(f"invalid_action must be 'wait' or 'raise', got {invalid_action!r}")


def merge_reward_weights(overrides: Mapping[str, float] | None) -> dict[str, float]:
    """:data:`DEFAULT_REWARD_WEIGHTS` with ``overrides``; unknown or non-finite ones refused."""
    weights = dict(DEFAULT_REWARD_WEIGHTS)
    for key, value in (overrides or {}).items():
        if key not in weights:
            raise ValueError(
                f"unknown reward weight {key!r}; known: {sorted(DEFAULT_REWARD_WEIGHTS)}"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"reward weight {key!r} must be a finite number, got {value!r}")
        weights[key] = float(value)
    return weights


def reward_totals(model: FactoryModel) -> dict[str, float]:
    """Running totals whose weighted change is the reward (costs enter negated)."""
    return {
        "parts": float(model.jobs_done),
        "tardiness_h": -model.tardiness() / 3600.0,
        "energy_cost": -model.cost,
        "over_cap_h": -model.over_cap_s / 3600.0,
        "cap_violations": -float(model.cap_violations),
        "scrap": -float(model.jobs_scrapped),
        "maintenance": -float(model.maintenances.sum()),
    }


class FactorySettings:
    """The settings both factory environments take, checked once: the compiled plant,
    the horizon, the slots and speed levels of an action, the reward weights and what an
    invalid slot does. ``Factory-v0`` and ``factory_parallel_v0`` inherit it."""

    def _configure(
        self,
        plant: PlantSpec,
        horizon: str | float | None,
        slots: int,
        speed_levels: int,
        reward_weights: Mapping[str, float] | None,
        invalid_action: Literal["wait", "raise"],
        render_mode: str | None,
    ) -> None:
        check_factory_args(slots, speed_levels, invalid_action, render_mode)
        self.render_mode = render_mode
        self.plant = plant_arrays(plant)
        self.horizon_s = (
            self.plant.config.horizon_seconds if horizon is None else parse_duration(horizon)
        )
        self.reward_weights = merge_reward_weights(reward_weights)
        self.invalid_action = invalid_action
        self.slots = slots
        self.speed_levels = speed_levels
        self.observer = FactoryObserver(self.plant, slots)


def speed_of_level(plant: PlantArrays, machine: int, level: int, levels: int) -> float:
    """Speed level ``level`` of ``levels``, evenly spaced over the machine's [min, max]."""
    low, high = float(plant.speed_min[machine]), float(plant.speed_max[machine])
    return low if levels == 1 else low + (high - low) * level / (levels - 1)


class MaskedMultiDiscrete(spaces.MultiDiscrete):
    """``MultiDiscrete`` whose ``sample()`` draws each component from the env's live mask."""

    def __init__(self, nvec: list[int], seed: int | None = None) -> None:
        super().__init__(nvec, seed=seed)
        #: The environment's current flat mask (length ``sum(nvec)``), or None.
        self.live_mask: NDArray[np.bool_] | None = None

    def sample(self, mask: Any = None, probability: Any = None) -> NDArray[np.int64]:
        """Sample from ``mask`` (a tuple per component, or one flat boolean array like
        ``action_masks()``), else from the live mask, else uniformly."""
        if isinstance(mask, np.ndarray) and mask.shape == (int(self.nvec.sum()),):
            mask = tuple(np.split(mask.astype(np.int8), np.cumsum(self.nvec)[:-1]))
        live = self.live_mask
        if mask is None and probability is None and live is not None:
            parts = np.split(live.astype(np.int8), np.cumsum(self.nvec)[:-1])
            if all(p.any() for p in parts):
                mask = tuple(parts)
        return super().sample(mask=mask, probability=probability)


class FactoryObserver:
    """Builds fixed-size observations of a :class:`FactoryModel` (shared by the single-
    and multi-agent environments). Health is never observed: only sensors.

    * per machine (``MACHINE_FEATURES``): status one-hot (idle, running, down,
      maintenance), speed / max speed, vibration relative to a healthy machine at its
      speed, temperature rise / 50 K, power / rated power at max speed, running hours since
      maintenance / 8, and whether it waits for a decision;
    * per candidate slot of one machine (``SLOT_FEATURES``): processing time on that
      machine (h), work left (h), slack to due date (h / 8), waiting time (h), and whether
      the slot holds a job;
    * plant (``PLANT_FEATURES`` + one per material): time of day (sin, cos), shift
      progress, tariff now and in one hour (/ max tariff), plant power / cap, share of
      released orders still open, and each material's stock / (2 x reorder point).

    Values are clipped to ``[-CLIP, CLIP]``.
    """

    MACHINE_FEATURES = (
        "idle",
        "running",
        "down",
        "maintenance",
        "speed",
        "vibration",
        "temperature",
        "power",
        "hours_since_maintenance",
        "needs_decision",
    )
    SLOT_FEATURES = ("processing_h", "work_left_h", "slack", "waiting_h", "present")
    PLANT_FEATURES = (
        "hour_sin",
        "hour_cos",
        "progress",
        "tariff_now",
        "tariff_next_hour",
        "power_vs_cap",
        "open_orders",
    )
    CLIP = 10.0

    def __init__(self, plant: PlantArrays, slots: int) -> None:
        self.plant = plant
        self.slots = slots
        p = plant
        self._rated_w = p.idle_w + p.load_w * p.speed_max**p.power_exponent
        self._tariff_max = max(float(p.tariff_per_j.max()), 1e-30)
        self._reorder = np.maximum(p.material_reorder_point, 1.0)

    @property
    def machine_size(self) -> int:
        return self.plant.n_machines * len(self.MACHINE_FEATURES)

    @property
    def slot_size(self) -> int:
        return self.slots * len(self.SLOT_FEATURES)

    @property
    def plant_size(self) -> int:
        return len(self.PLANT_FEATURES) + len(self.plant.material_names)

    def machines(
        self, model: FactoryModel, sensors: dict[str, NDArray[np.float64]]
    ) -> NDArray[np.float64]:
        p = self.plant
        n = p.n_machines
        out = np.zeros((n, len(self.MACHINE_FEATURES)))
        out[np.arange(n), model.status] = 1.0
        out[:, 4] = model.speed / p.speed_max
        out[:, 5] = sensors["vibration_mm_s"] / model.expected_vibration_mm_s()
        out[:, 6] = (sensors["temperature_c"] - p.ambient_c) / 50.0
        out[:, 7] = sensors["power_w"] / self._rated_w
        out[:, 8] = model.run_since_maintenance_s / (8 * 3600.0)
        out[:, 9] = model.decision_due & (model.status == MachineStatus.IDLE)
        return out

    def slot_jobs(self, model: FactoryModel, machine: int) -> NDArray[np.int64]:
        """The candidate jobs filling ``machine``'s slots, earliest due date first."""
        jobs = model.candidates(machine)
        order = np.argsort(model.instance.due[jobs], kind="stable")
        return jobs[order][: self.slots]

    def slot_features(
        self, model: FactoryModel, machine: int, jobs: NDArray[np.int64]
    ) -> NDArray[np.float64]:
        out = np.zeros((self.slots, len(self.SLOT_FEATURES)))
        k = len(jobs)
        if k:
            ops = model.job_next[jobs]
            out[:k, 0] = model.processing_times(ops)[:, machine] / 3600.0
            out[:k, 1] = model.job_work_left[jobs] / 3600.0
            out[:k, 2] = (model.instance.due[jobs] - model.now) / (8 * 3600.0)
            out[:k, 3] = (model.now - model.job_ready[jobs]) / 3600.0
            out[:k, 4] = 1.0
        return out

    def plant_features(self, model: FactoryModel) -> NDArray[np.float64]:
        p = self.plant
        clock = (model.clock0 + model.now) / 86400.0 * 2 * math.pi
        hour = model.clock_hour()
        released = model.instance.release <= model.now
        open_orders = released & np.isnan(model.job_done_time)
        feats = [
            math.sin(clock),
            math.cos(clock),
            model.now / model.horizon,
            p.tariff_per_j[hour] / self._tariff_max,
            p.tariff_per_j[(hour + 1) % 24] / self._tariff_max,
            model.plant_power_w() / model.cap_w,
            open_orders.sum() / max(int(released.sum()), 1),
        ]
        stock = model.stock / (2 * self._reorder)
        return np.concatenate((np.asarray(feats), stock))


class FactoryEnv(FactorySettings, gym.Env[NDArray[np.float32], NDArray[np.int64]]):
    """Run one shift of a factory, deciding for one idle machine at a time.

    ## Description

    The factory model (:class:`~autofab.envs.factory_model.FactoryModel`) simulates a
    shift event by event: orders arrive, machines process operations at their speed
    setpoints, wear, break down and get repaired, draw power under a time-of-use tariff
    and a peak cap, consume material from stock, and make good or defective parts. When a
    machine is idle and needs a decision (it just finished, work for it appeared, or its
    wait ran out), the agent decides for that *focus* machine: which job to start, at what
    speed, or to maintain it instead. Then the model runs to the next decision.

    ## Action Space

    ``MultiDiscrete([slots + 1, speed_levels, 2])``: the candidate slot to start (slot
    ``slots`` means wait), the speed level (evenly spaced over the machine's
    ``[min, max]``), and maintain (1 starts maintenance and overrides the slot).
    :meth:`action_masks` flags valid choices per component (empty slots are invalid),
    for sb3-contrib's ``MaskablePPO``. An invalid slot waits and is counted in
    ``info["invalid_actions"]``, or raises with ``invalid_action="raise"``.

    ## Observation Space

    ``Box(-10, 10, float32)``: the focus machine one-hot, then
    :class:`FactoryObserver`'s per-machine, focus-slot and plant features. Health is not
    observed: a policy must infer wear from vibration, temperature and power.

    ## Rewards

    ``sum(weights[k] * change_k)`` over the step, with :data:`DEFAULT_REWARD_WEIGHTS`
    (override any of them with ``reward_weights``): ``+parts`` finished, ``-tardiness_h``
    accrued by late orders, ``-energy_cost``, ``-over_cap_h`` above the peak cap,
    ``-cap_violations`` (new excursions) and ``-scrap``.

    ## Starting State

    The shift start, with orders sampled from the env's RNG (initial backlog plus Poisson
    arrivals), machine health drawn from each type's initial range, and full stock.

    ## Episode End

    Terminated at the end of the shift (``horizon``) or when every order is done.
    ``info["kpis"]`` holds the KPI dict at every step (parts, makespan, tardiness, OEE
    and its components, kWh, cost, kg CO2, peak kW, cap violations, breakdowns,
    maintenance count).

    ## Arguments

    * ``plant``: a shipped plant name (``"demo"``), a YAML path, a mapping or a config.
    * ``horizon``: shift length (``"8h"``, ``"30m"``, seconds); default the plant's.
    * ``slots``: how many candidate jobs the agent sees and can pick (default 8).
    * ``speed_levels``: number of speed choices (default 5).
    * ``reward_weights``: overrides of :data:`DEFAULT_REWARD_WEIGHTS`.
    * ``invalid_action``: ``"wait"`` (default) or ``"raise"``.

    ## Version History

    * v0: initial version.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        plant: PlantSpec = "demo",
        horizon: str | float | None = None,
        slots: int = 8,
        speed_levels: int = 5,
        reward_weights: Mapping[str, float] | None = None,
        invalid_action: Literal["wait", "raise"] = "wait",
        render_mode: str | None = None,
    ) -> None:
        self._configure(
            plant, horizon, slots, speed_levels, reward_weights, invalid_action, render_mode
        )
        n = self.plant.n_machines
        size = n + self.observer.machine_size + self.observer.slot_size + self.observer.plant_size
        clip = FactoryObserver.CLIP
        self.observation_space = spaces.Box(-clip, clip, (size,), dtype=np.float32)
        self.action_space = MaskedMultiDiscrete([slots + 1, speed_levels, 2])
        self.model: FactoryModel | None = None
        self.focus = -1
        self._slot_jobs = np.zeros(0, dtype=np.int64)
        self._totals: dict[str, float] = {}
        self.invalid_actions = 0

    # ------------------------------------------------------------------ API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed, options=options)
        self.model = FactoryModel.from_config(self.plant, self.np_random, self.horizon_s)
        self.invalid_actions = 0
        self._totals = self._reward_totals()
        self._next_focus()
        return self._observation(), self._info()

    def step(
        self, action: NDArray[np.int64] | list[int] | tuple[int, int, int]
    ) -> tuple[NDArray[np.float32], SupportsFloat, bool, bool, dict[str, Any]]:
        model = self.model
        if model is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if model.done:
            raise InvalidActionError("the shift is over; call reset()")
        slot, level, maintain = self._parse(action)
        m = self.focus
        p = self.plant
        speed = speed_of_level(p, m, level, self.speed_levels)
        job: int | None = None
        if slot < len(self._slot_jobs):
            job = int(self._slot_jobs[slot])
        elif slot != self.slots and not maintain:
            if self.invalid_action == "raise":
                raise InvalidActionError(
                    f"slot {slot} is empty on machine {p.machine_names[m]} "
                    f"({len(self._slot_jobs)} candidates); valid slots: "
                    f"{[*range(len(self._slot_jobs)), self.slots]}"
                )
            self.invalid_actions += 1
        decision = Decision(job=job, speed=speed, maintain=bool(maintain))
        model.decide(m, decision.job, decision.speed, decision.maintain)
        self._next_focus()
        totals = self._reward_totals()
        w = self.reward_weights
        reward = sum(w[k] * (totals[k] - self._totals[k]) for k in w)
        self._totals = totals
        return self._observation(), float(reward), model.done, False, self._info()

    def action_masks(self) -> NDArray[np.bool_]:
        """Valid choices for the focus machine, flat over the three components."""
        slots = np.zeros(self.slots + 1, dtype=bool)
        slots[: len(self._slot_jobs)] = True
        slots[self.slots] = True
        return np.concatenate((slots, np.ones(self.speed_levels, bool), np.ones(2, bool)))

    def render(self) -> str | None:  # type: ignore[override]
        if self.render_mode != "ansi" or self.model is None:
            return None
        m = self.model
        states = " ".join(
            f"{n}:{MachineStatus(s).name[0]}"
            for n, s in zip(self.plant.machine_names, m.status, strict=True)
        )
        return f"t={m.now / 3600:.2f}h focus={self.focus} parts={m.jobs_done} {states}"

    # ------------------------------------------------------------------ internals

    def _parse(self, action: Any) -> tuple[int, int, int]:
        arr = np.asarray(action)
        if arr.shape != (3,) or arr.dtype.kind not in "iu":
            raise InvalidActionError(
                f"action {action!r} must be 3 integers (slot, speed level, maintain)"
            )
        slot, level, maintain = (int(x) for x in arr)
        for name, value, n in (
            ("slot", slot, self.slots + 1),
            ("speed level", level, self.speed_levels),
            ("maintain", maintain, 2),
        ):
            if not 0 <= value < n:
                raise InvalidActionError(f"action {arr.tolist()}: {name} {value} not in [0, {n})")
        return slot, level, maintain

    def _next_focus(self) -> None:
        model = self.model
        assert model is not None
        model.advance_to_decision()
        due = model.needs_decision()
        self.focus = int(due[0]) if len(due) and not model.done else 0
        self._slot_jobs = (
            self.observer.slot_jobs(model, self.focus)
            if len(due) and not model.done
            else np.zeros(0, dtype=np.int64)
        )
        self.action_space.live_mask = self.action_masks()

    def _reward_totals(self) -> dict[str, float]:
        assert self.model is not None
        return reward_totals(self.model)

    def _observation(self) -> NDArray[np.float32]:
        model = self.model
        assert model is not None
        obs = self.observer
        focus = np.zeros(self.plant.n_machines)
        focus[self.focus] = 1.0
        sensors = model.sensors()
        out = np.concatenate(
            (
                focus,
                obs.machines(model, sensors).reshape(-1),
                obs.slot_features(model, self.focus, self._slot_jobs).reshape(-1),
                obs.plant_features(model),
            )
        )
        return np.clip(out, -obs.CLIP, obs.CLIP).astype(np.float32)

    def _info(self) -> dict[str, Any]:
        model = self.model
        assert model is not None
        return {
            "focus_machine": self.plant.machine_names[self.focus],
            "kpis": model.kpis(),
            "invalid_actions": self.invalid_actions,
        }
