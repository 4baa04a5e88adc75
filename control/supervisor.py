"""The safety supervisor's checks, as pure functions: one setpoint request in, one decision out.

The supervisor is the only writer to the plant (ARCHITECTURE.md, "Safety supervisor"). This
module is its functional core: no asyncio, no NATS, no OPC UA, no clock. Time comes in as
``now_wall`` (Unix seconds), state comes in as an immutable :class:`SupervisorState` and a
new one goes out, so every rule can be tested, replayed and property-checked on its own. The
actor around it (intake, batched writes with read-back, heartbeat, audit stream) lives
elsewhere.

Rules, in the order they are checked (the first that refuses names the reason):

1. ``unknown_machine`` / ``unknown_variable``: not in the limits.
2. ``non_finite`` / ``wrong_type``: ``value`` must be a finite real; ``run`` and
   ``maintenance_request`` must be exactly 0 or 1 (or a bool); ``start_job`` (start the
   next operation of that production order) a whole number >= 0.
3. ``stale``: ``now_wall > expires_at`` (or a time that is not finite);
   ``clock_skew``: ``requested_at`` further in the future than ``max_clock_skew_seconds``.
4. ``out_of_order``: ``requested_at`` earlier than that of the last value applied to the
   same machine and variable.
5. ``manual_override``: an operator holds the machine and the origin is not that operator.
6. ``estop``, ``fault`` (status down), ``maintenance_lock`` (status maintenance): only a
   *stop* passes (``run`` false, ``maintenance_request`` false).
7. ``out_of_bounds``: speed outside the machine's limits (or tighter configured ones).
8. ``rate_limit``: speed moving faster than ``max_rate_per_second`` since the last write.
9. ``power_cap``: the plant's predicted power (:func:`predicted_power_kw`) would rise above
   ``peak_cap_kw``.

Rules 7 to 9 clamp or reject, per the configured ``mode``. A boolean cannot be clamped, so a
``run`` that would break the power cap is always rejected. A decision that lowers (or keeps)
the predicted power always passes the cap: the supervisor must be able to shed load when the
plant is already over the cap for reasons outside its control (a repaired machine restarting).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autofab.agents.protocol import MachineStatusName, SetpointRequest
from autofab.envs.plant import PlantConfig

__all__ = [
    "BOOLEAN_VARIABLES",
    "STATUS_CODES",
    "VARIABLES",
    "Applied",
    "Decision",
    "MachineLimits",
    "Mode",
    "Outcome",
    "PowerCapLimits",
    "Reason",
    "SetpointValue",
    "SpeedLimits",
    "SupervisorConfigError",
    "SupervisorLimits",
    "SupervisorState",
    "Variable",
    "Write",
    "decide",
    "decide_batch",
    "engage_estop",
    "hold_override",
    "initial_state",
    "observe_status",
    "predicted_power_kw",
    "release_estop",
    "release_override",
]

#: A variable the supervisor writes (the node map's ``MACHINE_SETPOINTS``).
Variable: TypeAlias = Literal["speed_setpoint", "run", "maintenance_request", "start_job"]
VARIABLES: Final[tuple[Variable, ...]] = get_args(Variable)
#: Variables that are booleans on the plant and 0.0 / 1.0 in a request's float ``value``.
BOOLEAN_VARIABLES: Final[frozenset[str]] = frozenset({"run", "maintenance_request"})
#: ``start_job`` names a production order; numbers above this cannot be exact in a float.
_MAX_ORDER_NUMBER: Final = 2**53
#: What a rule does with a value it does not accept.
Mode: TypeAlias = Literal["clamp", "reject"]
#: What became of a request.
Outcome: TypeAlias = Literal["applied", "clamped", "rejected"]
#: Why; a fixed set, so it can label a metric (``autofab_supervisor_decisions_total``).
Reason: TypeAlias = Literal[
    "ok",
    "unknown_machine",
    "unknown_variable",
    "non_finite",
    "wrong_type",
    "stale",
    "clock_skew",
    "out_of_order",
    "manual_override",
    "estop",
    "fault",
    "maintenance_lock",
    "out_of_bounds",
    "rate_limit",
    "power_cap",
]
#: The value written to the plant: a float for speed, a bool for the switches.
SetpointValue: TypeAlias = float | bool
#: The twin's ``state`` telemetry codes (control/opcua/twin.py).
STATUS_CODES: Final[Mapping[int, MachineStatusName]] = MappingProxyType(
    {0: "idle", 1: "running", 2: "down", 3: "maintenance"}
)


class SupervisorConfigError(ValueError):
    """Supervisor limits are invalid; the message names each bad key, its value and why."""


# --- Limits (config, at the edge) --------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class MachineLimits(_Strict):
    """What the supervisor must know of one machine: its speed range and its power model
    (``envs/plant.py``, :class:`~autofab.envs.plant.PowerSpec`), in the config's units."""

    speed_min: float = Field(gt=0)
    speed_nominal: float = Field(gt=0)
    speed_max: float = Field(gt=0)
    idle_kw: float = Field(ge=0)
    load_kw: float = Field(ge=0)
    exponent: float = Field(ge=1)
    down_kw: float = Field(ge=0)


class SpeedLimits(_Strict):
    """The ``speed_setpoint`` rules: optional bounds tighter than every machine's own, a
    rate of change, and whether a value outside them is clamped or rejected."""

    mode: Mode = "clamp"
    min: float | None = Field(None, gt=0)
    max: float | None = Field(None, gt=0)
    max_rate_per_second: float = Field(0.2, gt=0)


class PowerCapLimits(_Strict):
    """The plant power cap (``energy.peak_cap_kw``) and the base load always drawn."""

    mode: Mode = "clamp"
    peak_cap_kw: float = Field(gt=0)
    base_load_kw: float = Field(0.0, ge=0)


class SupervisorLimits(_Strict):
    """Everything the checks compare against. Build it with :meth:`from_plant`."""

    machines: dict[str, MachineLimits] = Field(min_length=1)
    speed_setpoint: SpeedLimits = SpeedLimits()
    power_cap: PowerCapLimits
    #: Origins that count as an operator (may act on an overridden machine they hold).
    operators: tuple[str, ...] = ("operator",)
    #: How far in the future ``requested_at`` may be (clocks of two hosts differ a little).
    max_clock_skew_seconds: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _bounds_overlap(self) -> SupervisorLimits:
        s = self.speed_setpoint
        if s.min is not None and s.max is not None and s.min > s.max:
            raise ValueError(
                f"speed_setpoint.min ({s.min}) must be <= speed_setpoint.max ({s.max})"
            )
        for name, m in self.machines.items():
            if not m.speed_min <= m.speed_nominal <= m.speed_max:
                raise ValueError(f"machines.{name}: need speed_min <= speed_nominal <= speed_max")
            if s.min is not None and s.min > m.speed_max:
                raise ValueError(
                    f"speed_setpoint.min ({s.min}) is above machine {name!r} speed max "
                    f"({m.speed_max}): no speed would be allowed"
                )
            if s.max is not None and s.max < m.speed_min:
                raise ValueError(
                    f"speed_setpoint.max ({s.max}) is below machine {name!r} speed min "
                    f"({m.speed_min}): no speed would be allowed"
                )
        return self

    @classmethod
    def from_plant(
        cls, plant: PlantConfig, overrides: Mapping[str, Any] | None = None
    ) -> SupervisorLimits:
        """Limits for ``plant``: each machine's speed range and power model from its type,
        the cap from ``energy``, then ``overrides`` (keys ``speed_setpoint``, ``power_cap``,
        ``operators``, ``max_clock_skew_seconds``), merged one level deep.

        Raises :class:`SupervisorConfigError` naming the key, e.g.
        ``speed_setpoint.mode: Input should be 'clamp' or 'reject' (got 'clip')``.
        """
        machines: dict[str, Any] = {}
        for line in plant.lines:
            for entry in line.machines:
                t = plant.machine_types[entry.type]
                for name in entry.names():
                    machines[name] = {
                        "speed_min": t.speed.min,
                        "speed_nominal": t.speed.nominal,
                        "speed_max": t.speed.max,
                        "idle_kw": t.power.idle_kw,
                        "load_kw": t.power.load_kw,
                        "exponent": t.power.exponent,
                        "down_kw": t.power.down_kw,
                    }
        data: dict[str, Any] = {
            "machines": machines,
            "power_cap": {
                "peak_cap_kw": plant.energy.peak_cap_kw,
                "base_load_kw": plant.energy.base_load_kw,
            },
        }
        for key, value in (overrides or {}).items():
            if isinstance(value, Mapping) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            elif key == "operators" and isinstance(value, list):
                data[key] = tuple(value)
            else:
                data[key] = value
        return cls.validate_config(data)

    @classmethod
    def validate_config(cls, data: Mapping[str, Any]) -> SupervisorLimits:
        """Validate a mapping, turning pydantic's errors into one readable
        :class:`SupervisorConfigError` line per bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"]) or "<top>"
                msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                msg = msg.removeprefix("Value error, ")
                value = e.get("input")
                shown = (
                    "" if e["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
                )
                lines.append(f"  {key}: {msg}{shown}")
            raise SupervisorConfigError("invalid supervisor limits:\n" + "\n".join(lines)) from None

    def speed_bounds(self, machine: str) -> tuple[float, float]:
        """The allowed ``[low, high]`` speed of ``machine``: its own range, narrowed by
        ``speed_setpoint.min``/``max`` where those are set."""
        m = self.machines[machine]
        s = self.speed_setpoint
        low = m.speed_min if s.min is None else max(m.speed_min, s.min)
        high = m.speed_max if s.max is None else min(m.speed_max, s.max)
        return low, high


# --- State -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """The last value written to one machine variable: what, as of which request, and when
    (wall time) it was written. ``requested_at`` orders requests; ``applied_at`` times the
    rate limit."""

    value: SetpointValue
    requested_at: float
    applied_at: float


def _frozen(d: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class SupervisorState:
    """Everything the checks remember between requests; never mutated, each change is a
    new state (so a batch can be tried and thrown away, and a replay is exact).

    ``applied`` is keyed by ``(machine, variable)``; ``status`` holds the last observed
    status of each machine (absent: not yet observed); ``overrides`` maps a machine to the
    operator holding it.
    """

    applied: Mapping[tuple[str, str], Applied]
    status: Mapping[str, MachineStatusName] = field(default_factory=lambda: _frozen({}))
    overrides: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    estop: bool = False

    def value(self, machine: str, variable: Variable) -> SetpointValue:
        """The last value applied to ``machine``'s ``variable``."""
        return self.applied[(machine, variable)].value


def initial_state(
    limits: SupervisorLimits,
    now_wall: float,
    *,
    speeds: Mapping[str, float] | None = None,
    runs: Mapping[str, bool] | None = None,
) -> SupervisorState:
    """The state at start-up, as of ``now_wall``.

    Without read-back values it assumes what the twin starts with: nominal speed, ``run``
    true, no maintenance request. Pass the plant's read-back ``speeds`` and ``runs`` when
    known: the rate limit and the power cap start from these values.
    """
    applied: dict[tuple[str, str], Applied] = {}
    for name, m in limits.machines.items():
        speed = (speeds or {}).get(name, m.speed_nominal)
        run = (runs or {}).get(name, True)
        applied[(name, "speed_setpoint")] = Applied(float(speed), -math.inf, now_wall)
        applied[(name, "run")] = Applied(bool(run), -math.inf, now_wall)
        applied[(name, "maintenance_request")] = Applied(False, -math.inf, now_wall)
        applied[(name, "start_job")] = Applied(-1.0, -math.inf, now_wall)
    return SupervisorState(applied=_frozen(applied))


# --- Operator actions and telemetry ------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """A write the supervisor makes on its own (an emergency stop), not for a request."""

    machine: str
    variable: Variable
    value: SetpointValue


def hold_override(state: SupervisorState, machine: str, operator: str) -> SupervisorState:
    """``operator`` takes ``machine`` by hand: from now on only ``operator``'s requests
    reach it. Taking over a held machine replaces the holder."""
    return replace(state, overrides=_frozen({**state.overrides, machine: operator}))


def release_override(state: SupervisorState, machine: str) -> SupervisorState:
    """Hand ``machine`` back to the agents (a no-op if it was not held)."""
    return replace(
        state, overrides=_frozen({k: v for k, v in state.overrides.items() if k != machine})
    )


def engage_estop(
    state: SupervisorState, now_wall: float
) -> tuple[SupervisorState, tuple[Write, ...]]:
    """Emergency stop: every machine's ``run`` goes false, and until :func:`release_estop`
    only stops pass. Returns the writes to make; they count as requested at ``now_wall``,
    so a request made before the stop is out of order afterwards and never replays it."""
    applied = dict(state.applied)
    writes = []
    for (machine, variable), _ in state.applied.items():
        if variable == "run":
            applied[(machine, "run")] = Applied(False, now_wall, now_wall)
            writes.append(Write(machine, "run", False))
    return replace(state, applied=_frozen(applied), estop=True), tuple(writes)


def release_estop(state: SupervisorState) -> SupervisorState:
    """End the emergency stop. Machines stay stopped until someone asks them to run."""
    return replace(state, estop=False)


def observe_status(
    state: SupervisorState, machine: str, status: MachineStatusName | int
) -> SupervisorState:
    """Record ``machine``'s status from telemetry (a name, or the twin's ``state`` code).

    Raises ValueError for a machine the limits do not know or a status that does not exist,
    since either means the telemetry and the configuration disagree.
    """
    if (machine, "run") not in state.applied:
        raise ValueError(f"telemetry for unknown machine {machine!r}")
    if isinstance(status, int) and not isinstance(status, bool):
        if status not in STATUS_CODES:
            raise ValueError(f"machine {machine!r}: unknown state code {status!r}")
        status = STATUS_CODES[status]
    if status not in STATUS_CODES.values():
        raise ValueError(f"machine {machine!r}: unknown status {status!r}")
    return replace(state, status=_frozen({**state.status, machine: status}))


# --- Power -------------------------------------------------------------------------------


def _machine_kw(
    m: MachineLimits, status: MachineStatusName | None, run: bool, speed: float
) -> float:
    if status in ("down", "maintenance"):
        return m.down_kw
    if run or status == "running":
        # run=false is a cycle stop: a running operation still draws load until it ends.
        return m.idle_kw + m.load_kw * speed**m.exponent
    return m.idle_kw


def _applied_machine_kw(
    applied: Mapping[tuple[str, str], Applied],
    status: Mapping[str, MachineStatusName],
    limits: SupervisorLimits,
    name: str,
) -> float:
    return _machine_kw(
        limits.machines[name],
        status.get(name),
        bool(applied[(name, "run")].value),
        float(applied[(name, "speed_setpoint")].value),
    )


def _plant_kw(
    applied: Mapping[tuple[str, str], Applied],
    status: Mapping[str, MachineStatusName],
    limits: SupervisorLimits,
) -> float:
    total = limits.power_cap.base_load_kw
    for name in limits.machines:
        total += _applied_machine_kw(applied, status, limits, name)
    return total


def predicted_power_kw(state: SupervisorState, limits: SupervisorLimits) -> float:
    """The plant's predicted power: base load plus each machine's power model at its
    applied speed and run state, at rated load and full health (the plant's power model,
    ``envs/plant.py`` :class:`~autofab.envs.plant.PowerSpec`)."""
    return _plant_kw(state.applied, state.status, limits)


# --- Decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What became of one request: the audit record.

    ``value`` is what to write (``None`` when rejected); ``reason`` is a :data:`Reason`
    (``"ok"`` when applied as asked, otherwise the rule that clamped or refused), and
    ``detail`` says it for people.
    """

    request_id: str
    machine: str
    variable: str
    origin: str
    requested: object
    outcome: Outcome
    value: SetpointValue | None
    reason: Reason
    detail: str


def _is_stop(variable: str, value: SetpointValue) -> bool:
    return variable in BOOLEAN_VARIABLES and value is False


_EPS: Final = sys.float_info.epsilon
_REAL: Final = (int, float)


class _Run:
    """The checks over a run of requests from one state, each seeing those before it.

    It keeps its own ``applied`` dict, changed in place, and a running estimate of the
    predicted power, so a request costs O(1) instead of two copies and two sums over every
    machine. The estimate only ever lets a request *pass* the cap when it is below the cap
    by more than its worst rounding error (:meth:`_error_bound`); anything closer is decided
    on the exact sums of :func:`predicted_power_kw`, so the outcome is the same as summing
    every time.
    """

    def __init__(self, state: SupervisorState, limits: SupervisorLimits) -> None:
        self.base = state
        self.limits = limits
        self.applied: dict[tuple[str, str], Applied] | None = None  # copied on first change
        self.cap = limits.power_cap.peak_cap_kw
        self.terms = len(limits.machines) + 1
        self.resync_every = max(64, self.terms)
        self._resync()

    def _current(self) -> Mapping[tuple[str, str], Applied]:
        return self.base.applied if self.applied is None else self.applied

    def _resync(self) -> None:
        self.kw = _plant_kw(self._current(), self.base.status, self.limits)
        self.peak_kw = self.kw
        self.updates = 0

    def _error_bound(self, kw: float) -> float:
        """How far :attr:`kw` plus one more update may be from the exact sum: each of the
        two sums errs by at most (terms) rounding units of the largest total, and each
        update since the last resync adds at most three."""
        largest = max(self.peak_kw, kw, self.cap)
        return 2.0 * _EPS * (2 * self.terms + 3 * (self.updates + 1) + 4) * largest

    def state(self) -> SupervisorState:
        """The state after every request decided so far."""
        if self.applied is None:
            return self.base
        return replace(self.base, applied=MappingProxyType(self.applied))

    def decide(self, request: SetpointRequest, now_wall: float) -> Decision:
        """One request, as :func:`decide` describes it; applied values change the run."""
        limits, state = self.limits, self.base
        machine, variable = request.machine, request.variable
        raw: object = request.value

        def reject(reason: Reason, detail: str) -> Decision:
            return Decision(
                request.request_id, machine, variable, request.origin, raw, "rejected", None,
                reason, detail,
            )  # fmt: skip

        if machine not in limits.machines:
            return reject("unknown_machine", f"no machine {machine!r} in this plant")
        if variable not in VARIABLES:
            return reject("unknown_variable", f"{variable!r} is not one of {', '.join(VARIABLES)}")
        value: SetpointValue
        if isinstance(raw, bool):
            if variable not in BOOLEAN_VARIABLES:
                return reject("wrong_type", f"{variable} takes a number, got {raw!r}")
            value = raw
        elif not isinstance(raw, _REAL):
            return reject("wrong_type", f"{variable} takes a number, got {type(raw).__name__}")
        elif not math.isfinite(raw):
            return reject("non_finite", f"{variable} value {raw!r} is not finite")
        elif variable in BOOLEAN_VARIABLES:
            if raw not in (0, 1):
                return reject("wrong_type", f"{variable} is a boolean: 0 or 1, got {raw!r}")
            value = raw == 1
        elif variable == "start_job":
            if raw < 0 or raw != int(raw) or raw > _MAX_ORDER_NUMBER:
                return reject("wrong_type", f"start_job is an order number >= 0, got {raw!r}")
            value = float(raw)
        else:
            value = float(raw)

        requested_at, ttl = request.requested_at, request.ttl_seconds
        times_ok = (
            isinstance(requested_at, _REAL)
            and isinstance(ttl, _REAL)
            and not isinstance(requested_at, bool)
            and not isinstance(ttl, bool)
        )
        if not times_ok or not (math.isfinite(requested_at) and math.isfinite(ttl) and ttl > 0):
            return reject("stale", f"unusable time: requested_at={requested_at!r} ttl={ttl!r}")
        if now_wall > requested_at + ttl:
            return reject("stale", f"expired {now_wall - requested_at - ttl:.3f} s ago")
        if requested_at > now_wall + limits.max_clock_skew_seconds:
            return reject("clock_skew", f"requested {requested_at - now_wall:.3f} s in the future")
        applied = self._current()
        key = (machine, variable)
        last = applied[key]
        if requested_at < last.requested_at:
            return reject(
                "out_of_order",
                f"requested at {requested_at}, before the applied {last.requested_at}",
            )
        holder = state.overrides.get(machine)
        if holder is not None and request.origin != holder:
            return reject("manual_override", f"manual override: {holder!r} holds {machine}")
        if not _is_stop(variable, value):
            status = state.status.get(machine)
            if state.estop:
                return reject("estop", "emergency stop: only stops are allowed")
            if status == "down":
                return reject("fault", f"{machine} is down: only stops are allowed")
            if status == "maintenance":
                return reject("maintenance_lock", f"{machine} is in maintenance: only stops")

        outcome: Outcome = "applied"
        reason: Reason = "ok"
        notes: list[str] = []

        def clamp(to: float, why: Reason, mode: Mode, note: str) -> str | None:
            """Record a clamp to ``to``; return a rejection text instead when ``mode``
            rejects."""
            nonlocal value, outcome, reason
            if mode == "reject":
                return note
            notes.append(f"{note}; clamped to {to!r}")
            value, outcome, reason = to, "clamped", why
            return None

        if variable == "speed_setpoint":
            assert isinstance(value, float)
            mode = limits.speed_setpoint.mode
            low, high = limits.speed_bounds(machine)
            if not low <= value <= high:
                to = min(max(value, low), high)
                if (
                    text := clamp(to, "out_of_bounds", mode, f"{value!r} outside [{low}, {high}]")
                ) is not None:
                    return reject("out_of_bounds", text)
            previous = float(last.value)
            step = limits.speed_setpoint.max_rate_per_second * max(0.0, now_wall - last.applied_at)
            if abs(value - previous) > step:
                to = previous + math.copysign(step, value - previous)
                to = min(max(to, low), high)
                text = clamp(
                    to, "rate_limit", mode, f"change {value - previous:+.4g} exceeds {step:.4g}"
                )
                if text is not None:
                    return reject("rate_limit", text)

        # From here on the run's applied values change (and are put back on a rejection).
        if self.applied is None:
            self.applied = dict(self.base.applied)
        work = self.applied
        work[key] = Applied(value, requested_at, now_wall)
        if variable in ("maintenance_request", "start_job"):  # not in the power model
            before_machine_kw = after_machine_kw = 0.0
        else:
            m, status = limits.machines[machine], state.status.get(machine)
            run, speed = work[(machine, "run")].value, work[(machine, "speed_setpoint")].value
            after_machine_kw = _machine_kw(m, status, bool(run), float(speed))
            if variable == "run":
                run = last.value
            else:
                speed = last.value
            before_machine_kw = _machine_kw(m, status, bool(run), float(speed))
        estimate = self.kw - before_machine_kw + after_machine_kw
        cap = self.cap
        # Summing in the same order, a smaller term never gives a larger total, so a
        # decision that does not raise its machine's power cannot raise the plant's.
        if after_machine_kw <= before_machine_kw or estimate + self._error_bound(estimate) < cap:
            self.kw = estimate
            if estimate > self.peak_kw:
                self.peak_kw = estimate
            self.updates += 1
            if self.updates >= self.resync_every:
                self._resync()  # keeps the error bound, and so exact sums near the cap, rare
        else:
            work[key] = last
            before_kw = _plant_kw(work, state.status, limits)
            work[key] = Applied(value, requested_at, now_wall)
            after_kw = _plant_kw(work, state.status, limits)
            if after_kw > cap and after_kw > before_kw:
                note = f"predicted {after_kw:.3f} kW > cap {cap} kW"
                work[key] = last
                fit = (
                    _highest_speed_within_cap(work, state.status, limits, machine, cap)
                    if variable == "speed_setpoint"
                    else None
                )
                previous = float(work[(machine, "speed_setpoint")].value)
                if fit is None or fit <= previous or limits.power_cap.mode == "reject":
                    return reject("power_cap", note)
                value = min(fit, float(value))
                while True:
                    work[key] = Applied(value, requested_at, now_wall)
                    after_kw = _plant_kw(work, state.status, limits)
                    # Summing in another order may land a hair over the cap; step down past it.
                    if after_kw <= cap or value <= previous:
                        break
                    value = math.nextafter(value, previous)
                notes.append(f"{note}; clamped to {value!r}")
                outcome, reason = "clamped", "power_cap"
            self._resync()

        detail = "; ".join(notes) if notes else f"{variable} = {value!r}"
        return Decision(
            request.request_id, machine, variable, request.origin, raw, outcome, value, reason,
            detail,
        )  # fmt: skip


def decide(
    state: SupervisorState, request: SetpointRequest, now_wall: float, limits: SupervisorLimits
) -> tuple[Decision, SupervisorState]:
    """Check one request against every rule; return the decision and the state after it.

    A rejected request leaves the state as it was. ``request`` may have been built without
    validation (``model_construct``), so nothing about its fields is trusted.
    """
    run = _Run(state, limits)
    decision = run.decide(request, now_wall)
    return decision, run.state()


def _highest_speed_within_cap(
    applied: Mapping[tuple[str, str], Applied],
    status: Mapping[str, MachineStatusName],
    limits: SupervisorLimits,
    machine: str,
    cap: float,
) -> float | None:
    """The highest speed of ``machine`` at which the predicted plant power stays within
    ``cap``, or ``None`` if none does (the others already use it up)."""
    m = limits.machines[machine]
    others = _plant_kw(applied, status, limits) - _applied_machine_kw(
        applied, status, limits, machine
    )
    room = cap - others - m.idle_kw
    if room < 0:
        return None
    if m.load_kw == 0:
        return math.inf
    speed = (room / m.load_kw) ** (1.0 / m.exponent)
    # Rounding in the power function must not put the clamped value a hair over the cap.
    while speed > 0 and others + m.idle_kw + m.load_kw * speed**m.exponent > cap:
        speed = math.nextafter(speed, 0.0)
    return speed


def decide_batch(
    state: SupervisorState,
    requests: Iterable[SetpointRequest],
    now_wall: float,
    limits: SupervisorLimits,
) -> tuple[list[Decision], SupervisorState]:
    """Decide ``requests`` in order, each seeing the effects of those before it (the power
    cap included): exactly one decision per request, in the same order. Costs O(1) per
    request plus O(machines) per batch, and decides exactly as :func:`decide` one by one."""
    run = _Run(state, limits)
    decisions = [run.decide(request, now_wall) for request in requests]
    return decisions, run.state()
