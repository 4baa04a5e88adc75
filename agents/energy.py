"""The energy agent: power budgets under the plant peak cap, and the tariff they are paid at.

Machines ask for power before they start an operation (:class:`PowerRequest`); the agent
answers at once with a :class:`PowerGrant` or a :class:`PowerDeny`, so a machine never waits
on a batch window.

Priority rule
-------------
First come, first served, with a waitlist so small requests cannot starve a large one:

* The budget is ``peak_cap_kw - base_load_kw`` (the base load is always drawn). A request
  is granted when it fits beside the power already granted *and* the power of every
  operation that was denied earlier and is still waiting (keyed by machine, job and op,
  not by request id, since each retry carries a new id).
* A deny says when to come back: ``retry_at`` is the plant time at which enough current
  grants expire for the request to fit, or ``None`` when even an empty plant could not
  carry it (then it never waits on the list).
* Waitlist entries not retried within ``wait_ttl_seconds`` (plant time) are dropped, so a
  machine that went away does not hold headroom forever.

The tariff
----------
By default the tariff does not change a grant: the machines price it into their bids
(:class:`Tariff`), and the scheduler weighs that cost against finish time. A plant that
must shed load when power is dear (demand response) sets ``expensive_per_kwh`` and
``expensive_budget_fraction``: while the price is at or above ``expensive_per_kwh`` the
budget is that fraction of the full one. A request that fits the full budget but not the
reduced one is denied with ``retry_at`` at the end of the expensive hours (or when enough
grants expire, whichever lets it fit first); grants already made are kept.

Grants end with :class:`PowerRelease`, or on their own at ``until_at`` (the requested
duration times ``expiry_factor`` plus ``expiry_margin_seconds``), which keeps the budget
from leaking when a machine is lost mid-operation.

Requests are idempotent: a repeated request id gets the same grant again, and a request id
already released or expired is ignored (a late duplicate must not re-open a budget).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.protocol import (
    MessageBase,
    PowerDeny,
    PowerGrant,
    PowerRelease,
    PowerRequest,
    Subjects,
)
from autofab.envs.plant import EnergySpec, PlantConfig

__all__ = ["EnergyAgent", "Tariff", "bounded_add", "plant_to_wall"]

K = TypeVar("K")

_J_PER_KWH = 3.6e6
#: Shortest wait (wall seconds) for a timer set on a plant time still ahead.
_MIN_TIMER_STEP = 1e-3


def plant_to_wall(plant_at: float, now: Now, speedup: float) -> float:
    """The wall time at which plant time reaches ``plant_at``, seen from ``now``.

    Agents keep their timers in wall time (:meth:`Agent.next_timer`) but many of their
    deadlines are in plant time (deliveries, grant expiry); the twin runs ``speedup``
    plant seconds per wall second. A timer that fires early because the speedup drifted
    just re-checks ``now.plant`` and sets itself again, at least a millisecond later: at
    Unix-epoch magnitudes a smaller step can round to no step at all.
    """
    ahead = plant_at - now.plant
    return now.wall + max(ahead / speedup, _MIN_TIMER_STEP) if ahead > 0 else now.wall


def bounded_add(memory: OrderedDict[K, Any], key: K, limit: int, value: Any = None) -> None:
    """Remember ``key`` (with ``value``) in an insertion-ordered map that forgets its oldest
    keys past ``limit``: how agents recognise late duplicates without growing unbounded."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)


@dataclass(frozen=True)
class Tariff:
    """The time-of-use energy price: ``per_kwh[h]`` for hour of day ``h``; plant time 0 is
    ``shift_start_hour`` o'clock (as in the factory model)."""

    per_kwh: tuple[float, ...]
    shift_start_hour: float = 0.0

    def __post_init__(self) -> None:
        if len(self.per_kwh) != 24:
            raise ValueError(f"tariff needs 24 hourly prices, got {len(self.per_kwh)}")

    @classmethod
    def from_plant(cls, config: PlantConfig) -> Tariff:
        return cls(tuple(config.energy.tariff_per_kwh), config.shift_start_hour)

    def per_kwh_at(self, plant_at: float) -> float:
        """The price per kWh at plant time ``plant_at``."""
        clock = self.shift_start_hour * 3600.0 + plant_at
        return self.per_kwh[int(clock // 3600) % 24]

    def cost(self, power_w: float, start_at: float, duration_seconds: float) -> float:
        """What ``power_w`` drawn from ``start_at`` for ``duration_seconds`` costs, summed
        hour by hour, so an operation that runs into the evening peak pays for it."""
        clock0 = self.shift_start_hour * 3600.0
        x, end = clock0 + start_at, clock0 + start_at + duration_seconds
        joules_price = 0.0
        while x < end:
            y = min((math.floor(x / 3600.0) + 1) * 3600.0, end)
            joules_price += self.per_kwh[int(x // 3600) % 24] * (y - x)
            x = y
        return power_w * joules_price / _J_PER_KWH


@dataclass
class _Grant:
    machine: str
    job: str
    op: int
    power_w: float
    until_at: float


@dataclass
class _Waiting:
    power_w: float
    since: float
    last_seen: float


class EnergyAgent(Agent):
    """Grants power budgets under the plant peak cap and, optionally, a tariff-dependent
    budget (see the module docstring for the rule).

    ``budget_w`` is what machines may share: the peak cap less the base load. ``speedup``
    is the plant's plant-seconds per wall-second, used only to place expiry timers.
    """

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        budget_w: float,
        *,
        speedup: float = 1.0,
        expiry_factor: float = 1.5,
        expiry_margin_seconds: float = 60.0,
        wait_ttl_seconds: float = 600.0,
        memory: int = 10_000,
        tariff: Tariff | None = None,
        expensive_per_kwh: float | None = None,
        expensive_budget_fraction: float = 1.0,
    ) -> None:
        super().__init__(name)
        if budget_w <= 0:
            raise ValueError(f"budget_w must be > 0, got {budget_w}")
        if not 0 < expensive_budget_fraction <= 1:
            raise ValueError(
                f"expensive_budget_fraction must be in (0, 1], got {expensive_budget_fraction}"
            )
        if expensive_per_kwh is not None and tariff is None:
            raise ValueError("expensive_per_kwh needs the tariff")
        self.tariff = tariff
        self.expensive_per_kwh = expensive_per_kwh
        self.expensive_budget_fraction = expensive_budget_fraction
        self.subjects = subjects
        self.budget_w = budget_w
        self.speedup = speedup
        self.expiry_factor = expiry_factor
        self.expiry_margin_seconds = expiry_margin_seconds
        self.wait_ttl_seconds = wait_ttl_seconds
        self.memory = memory
        self.grants: dict[str, _Grant] = {}
        self.waiting: dict[str, _Waiting] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self._next_timer: float | None = None

    @classmethod
    def from_plant(
        cls, name: str, config: PlantConfig, *, speedup: float = 1.0, **kwargs: Any
    ) -> EnergyAgent:
        """The agent for ``config``'s energy section (budget = peak cap - base load)."""
        spec: EnergySpec = config.energy
        budget = (spec.peak_cap_kw - spec.base_load_kw) * 1e3
        kwargs.setdefault("tariff", Tariff.from_plant(config))
        return cls(name, Subjects(config.name), budget, speedup=speedup, **kwargs)

    def expensive(self, plant_at: float) -> bool:
        """Whether power is dear at ``plant_at`` (and the budget reduced)."""
        return (
            self.tariff is not None
            and self.expensive_per_kwh is not None
            and self.tariff.per_kwh_at(plant_at) >= self.expensive_per_kwh
        )

    def budget_at(self, plant_at: float) -> float:
        """What machines may share at ``plant_at`` (see "The tariff")."""
        if self.expensive(plant_at):
            return self.budget_w * self.expensive_budget_fraction
        return self.budget_w

    def _cheap_at(self, plant_at: float) -> float:
        """The first plant time from ``plant_at`` at which power is not dear (hour steps)."""
        at = plant_at
        for _ in range(25):
            if not self.expensive(at):
                return at
            assert self.tariff is not None
            clock = self.tariff.shift_start_hour * 3600.0 + at
            at += (math.floor(clock / 3600.0) + 1) * 3600.0 - clock
        return at  # dear all day: the next full budget is never; retry in a day

    @property
    def granted_w(self) -> float:
        """Power granted now and not yet released or expired."""
        return sum(g.power_w for g in self.grants.values())

    def subscriptions(self) -> list[Subscription]:
        return [
            Subscription(self.subjects.energy_request),
            Subscription(self.subjects.energy_release),
        ]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        if isinstance(message, PowerRequest):
            out = self._request(message, now, reply_to)
        elif isinstance(message, PowerRelease):
            out = self._release(message)
        else:
            self._count(f"unexpected_{message.type}")
            out = []
        self._expire(now)
        return out

    def next_timer(self) -> float | None:
        return self._next_timer

    def on_timer(self, now: Now) -> list[Outgoing]:
        self._expire(now)
        return []

    def _request(self, req: PowerRequest, now: Now, reply_to: str | None) -> list[Outgoing]:
        to = reply_to or self.subjects.energy_reply(req.machine)
        held = self.grants.get(req.request_id)
        if held is not None:
            self._count("duplicate_request")
            grant = PowerGrant(
                request_id=req.request_id,
                machine=held.machine,
                power_w=held.power_w,
                until_at=held.until_at,
            )
            return [Outgoing(to, grant)]
        if req.request_id in self.finished:
            self._count("finished_request")
            return []
        key = f"{req.machine}/{req.job}/{req.op}"
        ahead = sum(
            w.power_w
            for k, w in self.waiting.items()
            if k != key and (key not in self.waiting or w.since < self.waiting[key].since)
        )
        budget = self.budget_at(now.plant)
        free = budget - self.granted_w - ahead
        if req.power_w <= free + 1e-9:
            self.waiting.pop(key, None)
            until = (
                max(now.plant, req.start_at)
                + req.duration_seconds * self.expiry_factor
                + self.expiry_margin_seconds
            )
            self.grants[req.request_id] = _Grant(req.machine, req.job, req.op, req.power_w, until)
            grant = PowerGrant(
                request_id=req.request_id, machine=req.machine, power_w=req.power_w, until_at=until
            )
            return [Outgoing(to, grant)]
        if req.power_w > self.budget_w:
            reason = f"{req.power_w:.0f} W is more than the plant budget of {self.budget_w:.0f} W"
            retry_at: float | None = None
        else:
            wait = self.waiting.setdefault(key, _Waiting(req.power_w, now.plant, now.plant))
            wait.power_w, wait.last_seen = req.power_w, now.plant
            dear = " (reduced while power is dear)" if budget < self.budget_w else ""
            reason = f"peak cap{dear}: {free:.0f} W free, {req.power_w:.0f} W asked"
            need = req.power_w + ahead
            if budget < self.budget_w:  # dear now: the full budget comes back later
                retry_at = self._cheap_at(now.plant)
                if need <= budget + 1e-9:  # or it fits the reduced one once grants expire
                    retry_at = min(retry_at, self._headroom_at(need, now, budget))
            else:
                retry_at = self._headroom_at(need, now, budget)
        deny = PowerDeny(
            request_id=req.request_id, machine=req.machine, reason=reason, retry_at=retry_at
        )
        return [Outgoing(to, deny)]

    def _headroom_at(self, need_w: float, now: Now, budget: float | None = None) -> float:
        """The plant time at which enough grants expire for ``need_w`` to fit ``budget``."""
        budget = self.budget_w if budget is None else budget
        used = self.granted_w
        at = now.plant
        for grant in sorted(self.grants.values(), key=lambda g: g.until_at):
            if need_w <= budget - used + 1e-9:
                break
            used -= grant.power_w
            at = grant.until_at
        return max(at, now.plant)

    def _release(self, rel: PowerRelease) -> list[Outgoing]:
        grant = self.grants.pop(rel.request_id, None)
        if grant is None:
            self._count("unknown_release")
        bounded_add(self.finished, rel.request_id, self.memory)
        return []

    def _expire(self, now: Now) -> None:
        """Drop grants past ``until_at`` and stale waitlist entries; set the next timer."""
        for request_id in [r for r, g in self.grants.items() if g.until_at <= now.plant]:
            del self.grants[request_id]
            bounded_add(self.finished, request_id, self.memory)
            self._count("grant_expired")
        for key in [
            k for k, w in self.waiting.items() if w.last_seen + self.wait_ttl_seconds <= now.plant
        ]:
            del self.waiting[key]
        ends = [g.until_at for g in self.grants.values()]
        ends += [w.last_seen + self.wait_ttl_seconds for w in self.waiting.values()]
        self._next_timer = plant_to_wall(min(ends), now, self.speedup) if ends else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "grants": {r: asdict(g) for r, g in self.grants.items()},
            "waiting": {k: asdict(w) for k, w in self.waiting.items()},
            "finished": list(self.finished),
            "ignored": dict(self.ignored),
            "next_timer": self._next_timer,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.grants = {r: _Grant(**g) for r, g in state["grants"].items()}
        self.waiting = {k: _Waiting(**w) for k, w in state["waiting"].items()}
        self.finished = OrderedDict.fromkeys(_strings(state["finished"]))
        self.ignored = dict(state["ignored"])
        self._next_timer = state["next_timer"]


def _strings(values: Sequence[Any]) -> list[str]:
    return [str(v) for v in values]
