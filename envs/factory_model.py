"""The living factory: the plant model core with speeds, energy, wear, failures, sensors,
order arrivals, material supply and quality.

:class:`FactoryModel` extends :class:`~autofab.envs.model.PlantModel`, so the job
bookkeeping, schedules, makespan, tardiness and the dispatching rules are shared with
``JobShop-v0``. Time still moves from event to event; between events every rate is
constant or linear, so each quantity is integrated in closed form, not by ticks:

* **Wear.** A running machine's health falls linearly at ``wear * speed**a``.
* **Failures.** The hazard ``h0 * exp(k * (1 - health))`` integrates in closed form along
  that line; each machine draws an exponential "failure budget" and breaks down exactly
  when its cumulative hazard uses it up. A breakdown interrupts the running operation,
  which resumes after a lognormal repair. Maintenance takes a planned time, less than a
  repair, and restores health.
* **Energy.** Power is ``idle + load * speed**b * (1 + g * (1 - health))`` while running
  (linear in time between events, so energy is exact), ``idle`` when idle and ``down``
  during repair or maintenance. Cost and CO2 weight each interval's energy by the hourly
  tariff and carbon intensity, averaged over the interval.
* **Sensors.** Vibration, temperature (a first-order lag) and power follow health, speed
  and load, with seeded noise; :meth:`FactoryModel.sensors` is what a predictive
  maintenance model sees. Health itself is never in an observation.
* **Orders** arrive as a seeded Poisson stream (sampled at reset for the whole horizon),
  **supply** is a reorder-point stock per material with supplier lead times that can
  slip, and **quality** draws a defect at each completed operation with a probability that
  rises with speed and wear; a defective part is scrapped or reworked.

Decisions are per machine. An idle machine "needs a decision" when it becomes idle, when
work for it appears, or when its wake-up time passes; :meth:`FactoryModel.decide` then
starts an operation, starts maintenance, or waits until the next decision interval.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from autofab.envs.instances import Instance, InstanceError
from autofab.envs.model import InvalidActionError, PlantModel
from autofab.envs.plant import PlantArrays, PlantConfig, compile_plant

__all__ = [
    "Decision",
    "FactoryModel",
    "MachinePolicy",
    "MachineStatus",
    "OrderBook",
    "generate_orders",
    "run_shift",
]

_INF = math.inf
_EPS = 1e-9


class MachineStatus(IntEnum):
    IDLE = 0
    RUNNING = 1
    DOWN = 2  # broken, under repair
    MAINTENANCE = 3


# Plain ints for the hot paths (an Enum member lookup costs a metaclass __getattr__).
IDLE, RUNNING, DOWN, MAINTENANCE = (int(s) for s in MachineStatus)


@dataclass(frozen=True)
class Decision:
    """What an idle machine does next: start ``job``'s next operation (``None``: wait until
    the next event or decision interval), at ``speed`` (``None``: keep the setpoint), or
    ``maintain`` (which takes precedence over ``job``)."""

    job: int | None = None
    speed: float | None = None
    maintain: bool = False


class MachinePolicy(Protocol):
    """Decides for one idle machine of a factory model (rules, baselines, learned)."""

    def __call__(self, model: FactoryModel, machine: int) -> Decision: ...


@dataclass(frozen=True, eq=False)
class OrderBook:
    """A shift's orders: the job-shop instance plus what the factory adds to it."""

    instance: Instance
    job_product: NDArray[np.int64]  # product index of each job
    op_material: NDArray[np.int64]  # material index consumed at start, -1 for none
    op_quantity: NDArray[np.float64]
    op_load: NDArray[np.float64]  # relative load: scales load power, wear and vibration


def generate_orders(plant: PlantArrays, horizon_s: float, rng: np.random.Generator) -> OrderBook:
    """Sample a shift's orders: the initial backlog plus Poisson arrivals over the horizon.

    Each order is one job following its product's route; an operation can run on every
    machine offering its capability, taking ``minutes * 60 / speed`` seconds there.
    """
    cfg = plant.config
    products = cfg.products
    mix = np.array([p.mix for p in products], dtype=np.float64)
    mix /= mix.sum()
    arrivals = [0.0] * cfg.orders.initial
    if cfg.dynamics.orders and cfg.orders.rate_per_hour > 0:
        n = rng.poisson(cfg.orders.rate_per_hour * horizon_s / 3600.0)
        arrivals += sorted(rng.uniform(0.0, horizon_s, size=n).tolist())
    if not arrivals:
        raise InstanceError(
            f"plant {cfg.name!r}: no orders in the horizon; set orders.initial > 0 or "
            "orders.rate_per_hour > 0"
        )
    kinds = rng.choice(len(products), size=len(arrivals), p=mix)
    material_index = {name: i for i, name in enumerate(plant.material_names)}
    names = plant.machine_names
    capable = {
        cap: [m for m, caps in enumerate(plant.machine_capabilities) if cap in caps]
        for p in products
        for cap in (s.capability for s in p.route)
    }
    offsets = [0]
    rows: list[tuple[list[int], float]] = []
    op_cap: list[str] = []
    op_material: list[int] = []
    op_qty: list[float] = []
    op_load: list[float] = []
    due: list[float] = []
    for arrival, k in zip(arrivals, kinds, strict=True):
        product = products[int(k)]
        work = 0.0
        for step in product.route:
            seconds = step.minutes * 60.0
            rows.append((capable[step.capability], seconds))
            op_cap.append(step.capability)
            use = cfg.dynamics.supply and step.material is not None
            op_material.append(material_index[step.material] if use else -1)  # type: ignore[index]
            op_qty.append(step.quantity if use else 0.0)
            op_load.append(step.load)
            work += seconds
        offsets.append(offsets[-1] + len(product.route))
        due.append(arrival + cfg.orders.due_slack * work)
    durations = np.zeros((len(rows), len(names)))
    eligible = np.zeros((len(rows), len(names)), dtype=bool)
    for o, (machines, seconds) in enumerate(rows):
        durations[o, machines] = seconds
        eligible[o, machines] = True
    instance = Instance(
        name=f"{cfg.name}-orders",
        machine_names=names,
        machine_capabilities=plant.machine_capabilities,
        job_offsets=np.asarray(offsets, dtype=np.int64),
        op_capability=tuple(op_cap),
        durations=durations,
        eligible=eligible,
        release=np.asarray(arrivals, dtype=np.float64),
        due=np.asarray(due, dtype=np.float64),
    )
    return OrderBook(
        instance=instance,
        job_product=kinds.astype(np.int64),
        op_material=np.asarray(op_material, dtype=np.int64),
        op_quantity=np.asarray(op_qty, dtype=np.float64),
        op_load=np.asarray(op_load, dtype=np.float64),
    )


class FactoryModel(PlantModel):
    """One shift of a factory, stepped event by event.

    Build it with :meth:`from_config` (which samples the orders) for a seeded run.

    Machine arrays (length ``n_machines``): ``status`` (:class:`MachineStatus`), ``health``
    (1 new; may dip below 0 past the wear limit), ``speed`` (setpoint), ``temperature_c``,
    ``status_until`` (end of repair or maintenance), ``work_left`` (work of the running or
    interrupted operation, in seconds at speed 1), and the OEE counters ``run_s``,
    ``down_s``, ``maintenance_s``, ``ideal_s``, ``parts_good``, ``parts_defective``, plus
    ``breakdowns``, ``maintenances`` and ``energy_j``.

    Plant totals: ``energy_j``, ``cost``, ``co2_g``, ``peak_w``, ``over_cap_s``,
    ``cap_violations``, ``stock`` per material, ``jobs_done``, ``jobs_scrapped``.
    """

    def __init__(
        self,
        plant: PlantArrays,
        orders: OrderBook,
        horizon_s: float,
        rng: np.random.Generator,
    ) -> None:
        self.plant = plant
        self.orders = orders
        self.horizon = float(horizon_s)
        self.rng = rng
        self.dyn = plant.config.dynamics
        self.decision_interval = plant.config.decision_interval_minutes * 60.0
        self.clock0 = plant.config.shift_start_hour * 3600.0
        self.cap_w = plant.config.energy.peak_cap_kw * 1e3
        self.base_w = plant.config.energy.base_load_kw * 1e3
        super().__init__(orders.instance)
        self._max_duration = float(orders.instance.durations.max())

    @classmethod
    def from_config(
        cls,
        config: PlantConfig | PlantArrays,
        seed: int | np.random.Generator | None = None,
        horizon_s: float | None = None,
    ) -> FactoryModel:
        """Sample a shift's orders for ``config`` and return the model at time 0."""
        plant = config if isinstance(config, PlantArrays) else compile_plant(config)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        horizon = plant.config.horizon_seconds if horizon_s is None else float(horizon_s)
        return cls(plant, generate_orders(plant, horizon, rng), horizon, rng)

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        super().reset()
        p = self.plant
        n = p.n_machines
        self.speed[:] = p.speed_nominal
        self._refresh()
        self.status = np.zeros(n, dtype=np.int64)
        self.health = (
            self.rng.uniform(p.health0_min, p.health0_max) if self.dyn.wear else np.ones(n)
        )
        self.status_until = np.full(n, _INF)
        self.work_left = np.zeros(n)
        self.temperature_c = p.ambient_c.copy()
        self.budget = self.rng.exponential(1.0, size=n)
        # Sensor noise has its own stream, so reading sensors never changes the run.
        self.sensor_rng = np.random.default_rng(int(self.rng.integers(2**63)))
        #: Relative load of the operation each machine runs (1 when idle).
        self.load = np.ones(n)
        self._material_taken = np.zeros(self.instance.n_ops, dtype=bool)
        self.decision_due = np.ones(n, dtype=bool)
        self.wake_at = np.full(n, _INF)
        self.last_maintenance = np.zeros(n)
        # A machine's age in running time since its last maintenance, consistent with the
        # health it starts the shift with (at rated speed and load); a maintenance log
        # would tell a fixed-interval planner as much.
        with np.errstate(divide="ignore", invalid="ignore"):
            age = np.where(p.wear_per_s > 0, (1 - self.health) / p.wear_per_s, 0.0)
        self.run_since_maintenance_s = age
        # OEE counters and totals per machine.
        self.run_s = np.zeros(n)
        self.down_s = np.zeros(n)
        self.maintenance_s = np.zeros(n)
        self.ideal_s = np.zeros(n)
        self.parts_good = np.zeros(n, dtype=np.int64)
        self.parts_defective = np.zeros(n, dtype=np.int64)
        self.breakdowns = np.zeros(n, dtype=np.int64)
        self.maintenances = np.zeros(n, dtype=np.int64)
        self.machine_energy_j = np.zeros(n)
        # Plant totals.
        self.energy_j = 0.0
        self.cost = 0.0
        self.co2_g = 0.0
        self.peak_w = 0.0
        self.over_cap_s = 0.0
        self.cap_violations = 0
        self.stock = p.material_initial.copy()
        self.on_order = np.zeros(len(p.material_names))
        self._deliveries: list[tuple[float, int, float]] = []
        self.deliveries_late = 0
        self.job_done_time = np.full(self.instance.n_jobs, np.nan)
        self.jobs_done = 0
        self.jobs_scrapped = 0
        self.ops_reworked = 0
        #: (time, kind, machine, detail) for breakdowns, repairs, maintenance, defects.
        self.events: list[tuple[float, str, int, str]] = []
        #: (time, plant watts) at the start and end of every interval: the power curve.
        self.power_trace: list[tuple[float, float]] = []
        #: Every attempt at an operation, including scrapped and reworked ones.
        self.attempts: list[dict[str, Any]] = []
        self._over_cap = False
        self._op_speed = np.ones(self.instance.n_ops)

    # ------------------------------------------------------------------ queries

    @property
    def done(self) -> bool:
        """The shift is over, or every order is finished."""
        return self.now >= self.horizon - _EPS or self.jobs_done == self.instance.n_jobs

    def startable(self) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        """Each job's next operation, and whether it could start now on a free eligible
        machine: the job is unfinished, its previous operation is done, it is released,
        and the stock covers its material. (Which machines are free is the caller's part.)
        """
        nxt = np.minimum(self.job_next, self.last_op)
        ok = (
            (self.job_next < self.job_end)
            & (self.job_ready <= self.now + _EPS)
            & self.material_available(nxt)
        )
        return nxt, ok

    def candidates(self, machine: int) -> NDArray[np.int64]:
        """Jobs whose next operation ``machine`` could start now, oldest release first."""
        nxt, ok = self.startable()
        jobs = np.flatnonzero(ok & self._eligible[nxt, machine])
        return jobs[np.argsort(self.instance.release[jobs], kind="stable")]

    def material_available(self, ops: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Whether the stock covers each operation's material now."""
        mat = self.orders.op_material[ops]
        need = self.orders.op_quantity[ops]
        have = np.where(mat >= 0, self.stock[np.maximum(mat, 0)] if len(self.stock) else 0.0, _INF)
        return have >= need - _EPS

    def action_mask(self) -> NDArray[np.bool_]:
        """Jobs that some idle machine could start now (material included)."""
        nxt, ok = self.startable()
        return ok & (self._eligible[nxt] & (self.status == IDLE)).any(axis=1)

    def needs_decision(self) -> NDArray[np.int64]:
        """Idle machines waiting for a decision now."""
        return np.flatnonzero(self.decision_due & (self.status == IDLE))

    def power_w(self) -> NDArray[np.float64]:
        """Each machine's electrical power now."""
        return self._power(self.health)

    def _power(self, health: NDArray[np.float64]) -> NDArray[np.float64]:
        p = self.plant
        if not self.dyn.energy:
            return np.zeros(p.n_machines)
        load = (
            p.load_w
            * self.load
            * self.speed**p.power_exponent
            * (1 + p.power_wear_gain * (1 - health))
        )
        status = self.status
        return np.where(
            status == RUNNING,
            p.idle_w + load,
            np.where(status == IDLE, p.idle_w, p.down_w),
        )

    def plant_power_w(self) -> float:
        return self.base_w * self.dyn.energy + float(self.power_w().sum())

    def predicted_power_w(self, machine: int, speed: float) -> float:
        """Power ``machine`` would draw running at ``speed`` (for cap-aware decisions)."""
        p = self.plant
        if not self.dyn.energy:
            return 0.0
        wear = 1 + p.power_wear_gain[machine] * (1 - self.health[machine])
        return float(
            p.idle_w[machine] + p.load_w[machine] * speed ** p.power_exponent[machine] * wear
        )

    def sensors(self, noise: bool = True) -> dict[str, NDArray[np.float64]]:
        """Vibration (mm/s), temperature (deg C) and power (W) per machine, with noise."""
        p = self.plant
        n = p.n_machines
        running = self.status == RUNNING
        wear = np.maximum(1 - self.health, 0.0) if self.dyn.wear else np.zeros(n)
        vib = np.where(
            running,
            p.vib_mm_s * self.speed * np.sqrt(self.load) * (1 + p.vib_wear_gain * wear**2),
            p.vib_idle_mm_s,
        )
        out = {
            "vibration_mm_s": vib,
            "temperature_c": self.temperature_c.copy(),
            "power_w": self.power_w(),
        }
        if noise and self.dyn.sensors:
            for key in out:
                out[key] = out[key] * (1 + p.sensor_noise * self.sensor_rng.standard_normal(n))
        return out

    def expected_vibration_mm_s(self) -> NDArray[np.float64]:
        """Vibration a healthy machine would show now (at its speed and load, or idle):
        the yardstick that condition monitoring divides readings by."""
        p = self.plant
        running = self.status == RUNNING
        healthy = p.vib_mm_s * self.speed * np.sqrt(self.load)
        return np.where(running, healthy, np.maximum(p.vib_idle_mm_s, 1e-9))

    def hazard_per_s(self) -> NDArray[np.float64]:
        """Breakdown hazard of each machine now (only running machines wear and fail)."""
        p = self.plant
        return p.hazard_per_s * np.exp(p.hazard_sensitivity * (1 - self.health))

    def defect_probability(self, machine: int) -> float:
        p = self.plant
        x = p.defect_speed[machine] * (self.speed[machine] - p.speed_nominal[machine])
        x += p.defect_wear[machine] * max(1 - self.health[machine], 0.0)
        return float(min(1.0, p.defect_base[machine] * math.exp(x)))

    def clock_hour(self, t: float | None = None) -> int:
        """Hour of the day (0-23) at plant time ``t`` (default now)."""
        t = self.now if t is None else t
        return int(((self.clock0 + t) // 3600) % 24)

    def tariff_now(self) -> float:
        """Energy price per kWh now."""
        return float(self.plant.tariff_per_j[self.clock_hour()] * 3.6e6)

    # ------------------------------------------------------------------ decisions

    def set_speed(self, machine: int, speed: float) -> None:
        """Change a machine's speed setpoint, within its limits; a running operation's
        remaining work continues at the new speed."""
        self._check_speed(machine, speed)
        if not self.dyn.speed:
            speed = float(self.plant.speed_nominal[machine])
        self.speed[machine] = speed
        if self.status[machine] == RUNNING:
            self._reschedule_running(machine)
        nxt = np.minimum(self.job_next, self.last_op)
        self.job_op_time[:] = np.where(
            self.job_next < self.job_end, self.processing_times(nxt).min(axis=1), 0.0
        )

    def decide(
        self,
        machine: int,
        job: int | None = None,
        speed: float | None = None,
        maintain: bool = False,
    ) -> None:
        """Apply a decision for an idle ``machine``: maintain it, start ``job``'s next
        operation on it (at ``speed``), or wait (``job=None``) until the next event or the
        decision interval. Everything is checked first: a refused decision changes nothing.
        """
        n = self.plant.n_machines
        if not isinstance(machine, int | np.integer) or not 0 <= machine < n:
            raise InvalidActionError(
                f"machine {machine!r} does not exist (machines are 0..{n - 1})"
            )
        name = self.plant.machine_names[machine]
        if self.status[machine] != IDLE:
            raise InvalidActionError(
                f"machine {name} is {MachineStatus(self.status[machine]).name.lower()}, not idle"
            )
        if speed is not None:
            self._check_speed(machine, speed)
        if not maintain and job is not None:
            candidates = self.candidates(machine)
            if job not in set(candidates.tolist()):
                raise InvalidActionError(
                    f"job {job} cannot start on machine {name} now; candidates: "
                    f"{candidates.tolist()}"
                )
        if speed is not None:
            self.set_speed(machine, speed)
        self.decision_due[machine] = False
        if maintain:
            self.start_maintenance(machine)
        elif job is not None:
            self._start_op(int(job), machine)
        else:
            self.wake_at[machine] = self.now + self.decision_interval

    def abort_operation(self, machine: int) -> int | None:
        """Give up the operation interrupted on a broken-down ``machine``.

        The job goes back to that operation, ready now, so it can start again on any
        eligible machine; the material it took stays taken (the part carries it). This is
        how a plant run by agents behaves: they announce a broken machine's work again
        rather than wait for the repair. Returns the job, or None when the machine is not
        down with an operation in hand.
        """
        op = int(self.machine_op[machine])
        if self.status[machine] != DOWN or op < 0 or self.work_left[machine] <= 1e-9:
            return None
        job = int(self.instance.op_job[op])
        self.work_left[machine] = 0.0
        self.machine_op[machine] = -1
        self.load[machine] = 1.0
        self.machine_free_at[machine] = self.status_until[machine]
        self._rewind(job, op)
        self.job_ready[job] = self.now
        self._mask = None
        self.events.append((self.now, "abort", machine, f"job {job} op {op}"))
        return job

    def _check_speed(self, machine: int, speed: float) -> None:
        p = self.plant
        if not isinstance(speed, int | float | np.number) or not math.isfinite(speed):
            raise InvalidActionError(
                f"machine {p.machine_names[machine]}: speed must be a finite number, got {speed!r}"
            )
        if not p.speed_min[machine] - _EPS <= speed <= p.speed_max[machine] + _EPS:
            raise InvalidActionError(
                f"machine {p.machine_names[machine]}: speed {speed} outside "
                f"[{p.speed_min[machine]}, {p.speed_max[machine]}]"
            )

    def start_maintenance(self, machine: int) -> None:
        """Start planned maintenance on an idle machine (a broken one is being repaired)."""
        status = self.status[machine]
        if status != IDLE:
            raise InvalidActionError(
                f"machine {self.plant.machine_names[machine]}: maintenance needs an idle "
                f"machine, it is {MachineStatus(status).name.lower()}"
            )
        self.status[machine] = MAINTENANCE
        self.status_until[machine] = self.now + self.plant.maintenance_s[machine]
        self.machine_free_at[machine] = self.status_until[machine]
        self.decision_due[machine] = False
        self.maintenances[machine] += 1
        self.events.append((self.now, "maintenance", machine, ""))
        self._record_power()

    def _start_op(self, job: int, machine: int) -> None:
        op = int(self.job_next[job])
        mat = int(self.orders.op_material[op])
        if mat >= 0 and not self._material_taken[op]:
            self.stock[mat] -= self.orders.op_quantity[op]
            self._material_taken[op] = True
            self._maybe_reorder(mat)
        self.start(job, machine)
        self.load[machine] = self.orders.op_load[op]
        self.status[machine] = RUNNING
        self.work_left[machine] = self._durations[op, machine]
        self._op_speed[op] = self.speed[machine]
        self.wake_at[machine] = _INF
        self._record_power()

    def _maybe_reorder(self, mat: int) -> None:
        p = self.plant
        if self.stock[mat] + self.on_order[mat] <= p.material_reorder_point[mat] + _EPS:
            qty = float(p.material_reorder_qty[mat])
            delay = float(p.material_lead_s[mat])
            if self.rng.random() < p.material_disruption_p[mat]:
                delay += float(p.material_disruption_s[mat])
                self.deliveries_late += 1
            self.on_order[mat] += qty
            heapq.heappush(self._deliveries, (self.now + delay, mat, qty))

    def _reschedule_running(self, machine: int) -> None:
        op = int(self.machine_op[machine])
        end = self.now + self.work_left[machine] / self.speed[machine]
        self.op_end[op] = end
        self.machine_free_at[machine] = end
        self.job_ready[self.instance.op_job[op]] = end

    # ------------------------------------------------------------------ time

    def _failure_dt(self) -> NDArray[np.float64]:
        """Time until each running machine breaks down, from its remaining hazard budget."""
        p = self.plant
        n = p.n_machines
        if not self.dyn.failures:
            return np.full(n, _INF)
        running = self.status == RUNNING
        a = self.hazard_per_s()
        r = self._wear_rate() * running
        kr = p.hazard_sensitivity * r
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            grow = np.log1p(self.budget * kr / a) / kr
            flat = self.budget / a
        dt = np.where(kr > 1e-15, grow, flat)
        return np.where(running & (a > 0), dt, _INF)

    def _wear_rate(self) -> NDArray[np.float64]:
        p = self.plant
        if not self.dyn.wear:
            return np.zeros(p.n_machines)
        return p.wear_per_s * self.load * self.speed**p.wear_speed_exponent

    def next_event_time(self) -> float:
        """The next time anything happens: completion, breakdown, end of repair or
        maintenance, order arrival, delivery, a machine's wake-up, or the horizon."""
        running = self.status == RUNNING
        t = self.horizon
        if running.any():
            t = min(t, float((self.now + self.work_left[running] / self.speed[running]).min()))
            t = min(t, self.now + float(self._failure_dt().min()))
        t = min(t, float(self.status_until.min()))
        release = self.instance.release
        upcoming = release[release > self.now + _EPS]
        if upcoming.size:
            t = min(t, float(upcoming.min()))
        if self._deliveries:
            t = min(t, self._deliveries[0][0])
        idle = self.status == IDLE
        if idle.any():
            t = min(t, float(self.wake_at[idle].min()))
        return max(t, self.now)

    def _integrate(self, t: float) -> None:
        """Move the continuous state (energy, wear, hazard, temperature, counters) to ``t``."""
        dt = t - self.now
        if dt <= 0:
            return
        p = self.plant
        status = self.status
        running = status == RUNNING
        # Power is linear in time while running (health falls linearly): exact energy.
        r = self._wear_rate() * running
        p0 = self._power(self.health)
        p1 = self._power(self.health - r * dt)
        energy = 0.5 * (p0 + p1) * dt
        if self.dyn.energy:
            plant0 = self.base_w + float(p0.sum())
            plant1 = self.base_w + float(p1.sum())
            total = float(energy.sum()) + self.base_w * dt
            self.machine_energy_j += energy
            self.energy_j += total
            self.cost += total * self._hourly_mean(p.tariff_per_j, self.now, t)
            self.co2_g += total * self._hourly_mean(p.carbon_g_per_j, self.now, t)
            self.power_trace.append((self.now, plant0))
            self.power_trace.append((t, plant1))
            top = max(plant0, plant1)
            self.peak_w = max(self.peak_w, top)
            cap = self.cap_w
            if top > cap + _EPS:
                # Power is linear over the interval: count only the part above the cap.
                low = min(plant0, plant1)
                share = 1.0 if low >= cap else (top - cap) / (top - low)
                self.over_cap_s += dt * share
                if not self._over_cap:
                    self.cap_violations += 1
                self._over_cap = plant1 > cap + _EPS
            else:
                self._over_cap = False
        # Hazard budget used by running machines over the interval.
        if self.dyn.failures:
            a = self.hazard_per_s()
            kr = p.hazard_sensitivity * r
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                used = np.where(kr > 1e-15, a * np.expm1(kr * dt) / kr, a * dt)
            self.budget -= np.where(running, used, 0.0)
        self.health -= r * dt
        # Temperature relaxes toward its steady state for the interval's mean power.
        steady = p.ambient_c + p.rise_c_per_w * 0.5 * (p0 + p1) * (
            1 + p.temp_wear_gain * np.maximum(1 - self.health, 0)
        )
        self.temperature_c = steady + (self.temperature_c - steady) * np.exp(-dt / p.temp_tau_s)
        # Counters.
        self.run_s += dt * running
        self.run_since_maintenance_s += dt * running
        self.down_s += dt * (status == DOWN)
        self.maintenance_s += dt * (status == MAINTENANCE)
        self.work_left -= np.where(running, self.speed * dt, 0.0)
        self.now = t

    def _hourly_mean(self, curve: NDArray[np.float64], t0: float, t1: float) -> float:
        """Mean of an hourly curve (24 values, by hour of day) over plant times [t0, t1]."""
        a, b = self.clock0 + t0, self.clock0 + t1
        if b - a <= _EPS:
            return float(curve[int(a // 3600) % 24])
        total = 0.0
        x = a
        while x < b - _EPS:
            hour_end = (math.floor(x / 3600.0) + 1) * 3600.0
            y = min(hour_end, b)
            total += float(curve[int(x // 3600) % 24]) * (y - x)
            x = y
        return total / (b - a)

    def _record_power(self) -> None:
        if self.dyn.energy:
            w = self.plant_power_w()
            self.power_trace.append((self.now, w))
            self.peak_w = max(self.peak_w, w)
            if w > self.cap_w + _EPS and not self._over_cap:
                self.cap_violations += 1
                self._over_cap = True

    def advance(self) -> float:
        """Process the next event (or events at the same time); returns the new time."""
        t0 = self.now
        self._integrate(self.next_event_time())
        self._handle_events(t0)
        return self.now

    def advance_to_decision(self) -> None:
        """Process events until some idle machine needs a decision, or the shift ends."""
        while not self.done and len(self.needs_decision()) == 0:
            self.advance()

    def run_until(self, t: float) -> None:
        """Advance to plant time ``t`` (at most the horizon), handling events on the way;
        decisions falling due are left pending (idle machines simply wait)."""
        t = min(t, self.horizon)
        while self.now < t - _EPS:
            nxt = self.next_event_time()
            if nxt > t + _EPS:
                self._integrate(t)
                break
            t0 = self.now
            self._integrate(nxt)
            self._handle_events(t0)

    def _handle_events(self, t0: float) -> None:
        """Apply every event due at the current time; ``t0`` is the previous time."""
        now = self.now
        self._mask = None
        new_work = False
        # Completions first: a machine that finishes at the instant it would fail, finishes.
        running = self.status == RUNNING
        for m in np.flatnonzero(running & (self.work_left <= 1e-6 * self._max_duration)):
            self._complete(int(m))
            new_work = True
        running = self.status == RUNNING
        for m in np.flatnonzero(running & (self.budget <= 1e-12)):
            self._breakdown(int(m))
        for m in np.flatnonzero(self.status_until <= now + _EPS):
            self._restore(int(m))
            new_work = True
        while self._deliveries and self._deliveries[0][0] <= now + _EPS:
            _, mat, qty = heapq.heappop(self._deliveries)
            self.stock[mat] += qty
            self.on_order[mat] -= qty
            new_work = True
        release = self.instance.release
        if np.any((release > t0 + _EPS) & (release <= now + _EPS)):
            new_work = True
        idle = self.status == IDLE
        woken = idle & (self.wake_at <= now + _EPS)
        self.wake_at[woken] = _INF
        self.decision_due |= woken
        if new_work and idle.any():
            self.decision_due |= idle & self._machines_with_work()

    def _machines_with_work(self) -> NDArray[np.bool_]:
        """Machines for which some job could start now (capability, readiness, material)."""
        nxt, ok = self.startable()
        return self._eligible[nxt[ok]].any(axis=0)

    def _breakdown(self, m: int) -> None:
        p = self.plant
        mean, cv = p.repair_mean_s[m], p.repair_cv[m]
        sigma = math.sqrt(math.log1p(cv * cv))
        repair = float(self.rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma))
        self.status[m] = DOWN
        self.status_until[m] = self.now + repair
        self.breakdowns[m] += 1
        self.events.append((self.now, "breakdown", m, f"repair {repair / 3600:.2f} h"))
        op = int(self.machine_op[m])
        if op >= 0 and self.work_left[m] > 0:
            # The interrupted operation resumes after the repair.
            end = self.status_until[m] + self.work_left[m] / self.speed[m]
            self.op_end[op] = end
            self.job_ready[self.instance.op_job[op]] = end
            self.machine_free_at[m] = end
        else:
            self.machine_free_at[m] = self.status_until[m]
        self._record_power()

    def _restore(self, m: int) -> None:
        p = self.plant
        was = self.status[m]
        if was == DOWN:
            self.health[m] = max(self.health[m], p.repair_health[m])
            kind = "repaired"
        else:
            self.health[m] = max(self.health[m], p.maintenance_health[m])
            self.last_maintenance[m] = self.now
            kind = "maintained"
        # Both renew the machine: its age restarts from the health they leave it with.
        wear = p.wear_per_s[m]
        self.run_since_maintenance_s[m] = (1 - self.health[m]) / wear if wear > 0 else 0.0
        self.budget[m] = self.rng.exponential(1.0)
        self.status_until[m] = _INF
        self.events.append((self.now, kind, m, ""))
        op = int(self.machine_op[m])
        if was == DOWN and op >= 0 and self.work_left[m] > 1e-9:
            self.status[m] = RUNNING
            self._reschedule_running(m)
        else:
            self.status[m] = IDLE
            self.machine_free_at[m] = self.now
            self.decision_due[m] = True
        self._record_power()

    def _complete(self, m: int) -> None:
        p = self.plant
        op = int(self.machine_op[m])
        job = int(self.instance.op_job[op])
        now = self.now
        self.op_end[op] = now
        self.job_ready[job] = now
        self.machine_free_at[m] = now
        self.status[m] = IDLE
        self.work_left[m] = 0.0
        self.load[m] = 1.0
        self.decision_due[m] = True
        self.ideal_s[m] += self._durations[op, m] / p.speed_max[m]
        defective = self.dyn.quality and self.rng.random() < self.defect_probability(m)
        self.attempts.append(
            {
                "job": job,
                "index": int(self.instance.op_index[op]),
                "machine": m,
                "start": float(self.op_start[op]),
                "end": now,
                "speed": float(self._op_speed[op]),
                "defective": bool(defective),
            }
        )
        if defective:
            self.parts_defective[m] += 1
            self.events.append((now, "defect", m, f"job {job} op {self.instance.op_index[op]}"))
            if self.plant.config.on_defect == "rework":
                # The same part is machined again: no new material.
                self.ops_reworked += 1
                self._rewind(job, op)
            else:
                # The part is scrapped: the order restarts with fresh material.
                self.jobs_scrapped += 1
                first = int(self.instance.job_offsets[job])
                self._material_taken[first : op + 1] = False
                self._rewind(job, first)
        else:
            self.parts_good[m] += 1
            if op == self.last_op[job]:
                self.job_done_time[job] = now
                self.jobs_done += 1
        self._record_power()

    def _rewind(self, job: int, first: int) -> None:
        """Put ``job`` back to operation ``first`` (rework one operation, or scrap the part
        and restart its route with fresh material)."""
        inst = self.instance
        last = int(self.job_next[job])  # one past the operation just finished
        ops = np.arange(first, last)
        self.op_start[ops] = np.nan
        self.op_end[ops] = np.nan
        self.op_machine[ops] = -1
        self.n_started -= len(ops)
        self.job_next[job] = first
        self.job_ops_left[job] += len(ops)
        self.job_work_left[job] += float(inst.min_duration[ops].sum())
        self.job_machine[job] = self.fixed_machine[first]
        self._refresh()

    # ------------------------------------------------------------------ results

    def oee(self, machines: NDArray[np.int64] | None = None) -> dict[str, float]:
        """OEE from summed counters (never from averaged ratios).

        availability = run time / planned time (idle and down time are both losses);
        performance = ideal time (at maximum speed) / run time; quality = good / total.
        """
        sel = slice(None) if machines is None else machines
        planned = self.now * (self.plant.n_machines if machines is None else len(machines))
        run = float(self.run_s[sel].sum())
        ideal = float(self.ideal_s[sel].sum())
        good = int(self.parts_good[sel].sum())
        total = good + int(self.parts_defective[sel].sum())
        availability = run / planned if planned > 0 else 0.0
        performance = min(ideal / run, 1.0) if run > 0 else 0.0
        quality = good / total if total else 0.0
        return {
            "availability": availability,
            "performance": performance,
            "quality": quality,
            "oee": availability * performance * quality,
        }

    def tardiness(self) -> float:
        """Total tardiness in seconds: finished jobs past due, plus open jobs past due now."""
        due = self.instance.due
        done = ~np.isnan(self.job_done_time)
        late_done = np.maximum(self.job_done_time[done] - due[done], 0.0).sum()
        released = self.instance.release <= self.now
        late_open = np.maximum(self.now - due[~done & released], 0.0).sum()
        return float(late_done + late_open)

    def makespan(self) -> float:
        """Completion time of the last finished order (0 if none)."""
        done = self.job_done_time[~np.isnan(self.job_done_time)]
        return float(done.max()) if done.size else 0.0

    def kpis(self) -> dict[str, Any]:
        """The shift's key figures (SI units are converted to kWh, kg and kW here)."""
        return {
            "sim_time_s": self.now,
            "orders": self.instance.n_jobs,
            "orders_released": int((self.instance.release <= self.now).sum()),
            "parts_good": int(self.jobs_done),
            "parts_scrap": int(self.jobs_scrapped),
            "ops_reworked": int(self.ops_reworked),
            "makespan_s": self.makespan(),
            "tardiness_s": self.tardiness(),
            "oee": self.oee(),
            "energy_kwh": self.energy_j / 3.6e6,
            "energy_cost": self.cost,
            "co2_kg": self.co2_g / 1e3,
            "peak_kw": self.peak_w / 1e3,
            "cap_kw": self.cap_w / 1e3,
            "cap_violations": int(self.cap_violations),
            "over_cap_s": self.over_cap_s,
            "breakdowns": int(self.breakdowns.sum()),
            "maintenance": int(self.maintenances.sum()),
            "unplanned_downtime_s": float(self.down_s.sum()),
            "planned_downtime_s": float(self.maintenance_s.sum()),
            "late_deliveries": int(self.deliveries_late),
        }


def run_shift(model: FactoryModel, policy: MachinePolicy) -> dict[str, Any]:
    """Run ``model`` to the end of its shift with ``policy`` deciding for every idle
    machine that needs a decision; returns :meth:`FactoryModel.kpis` plus ``decisions``."""
    decisions = 0
    while True:
        model.advance_to_decision()
        if model.done:
            break
        for machine in model.needs_decision():
            m = int(machine)
            d = policy(model, m)
            model.decide(m, d.job, d.speed, d.maintain)
            decisions += 1
    kpis = model.kpis()
    kpis["decisions"] = decisions
    return kpis
