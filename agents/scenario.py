"""An in-memory message bus, a simulated wall clock and a toy plant: agents without NATS.

:class:`Scenario` runs agents the way ``control/bus.py`` does over NATS, in one thread
and in simulated time, so a negotiation can be tested in milliseconds and replayed
exactly:

* every :class:`~autofab.agents.base.Outgoing` is encoded with :func:`protocol.encode`
  and decoded with :func:`protocol.decode` on delivery, so the wire format is exercised;
* subjects match NATS-style (``*`` one token, ``>`` the rest); an agent gets a message
  once even if several of its subscriptions match; subscribers sharing a queue group get
  it once between them (round robin);
* each message takes ``latency`` wall seconds; a :class:`FaultModel` may drop it,
  duplicate it or delay it; a command with a TTL arriving later than that is dropped, as
  the runtime does;
* timers fire in wall-time order; plant time is ``plant_start + (wall - wall_start) *
  speedup``, as the twin keeps it.

:class:`PlantWorld` stands in for the supervisor and the plant: it hears the machines'
``run`` setpoints, runs the operation for processing / speed plant seconds, and then calls
:meth:`MachineAgent.operation_finished`, or, when the failure plan says so, breaks the
machine down mid-operation (:meth:`MachineAgent.breakdown`) and repairs it later.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.energy import EnergyAgent
from autofab.agents.machine import MachineAgent, MachineHost, Task
from autofab.agents.protocol import MessageBase, SetpointRequest, Subjects, decode, encode
from autofab.agents.scheduler import SchedulerAgent
from autofab.agents.supply import SupplyAgent
from autofab.envs.plant import PlantConfig, compile_plant

__all__ = [
    "FaultModel",
    "PlantWorld",
    "PlantWorldContext",
    "RandomFaults",
    "Scenario",
    "plant_agent_factories",
    "subject_matches",
]


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS would deliver ``subject`` to a subscription on ``pattern``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class FaultModel(Protocol):
    """Decides what becomes of one message: the extra delays (wall seconds) of each copy
    delivered; ``[]`` drops it, ``[0.0]`` delivers it normally, two values duplicate it."""

    def deliveries(self, subject: str, message: MessageBase) -> list[float]: ...


@dataclass
class RandomFaults:
    """Seeded random faults, each limited to the message types it makes sense for.

    Defaults: bids and calls may be dropped or arrive late (after the round's deadline);
    any message but a setpoint may be delivered twice (setpoints are commands with a TTL
    and a request id, which the supervisor deduplicates).
    """

    rng: random.Random
    drop: float = 0.0
    duplicate: float = 0.0
    late: float = 0.0
    late_seconds: float = 1.0
    drop_types: frozenset[str] = frozenset({"cfp", "proposal", "proposal_batch"})
    late_types: frozenset[str] = frozenset({"proposal", "proposal_batch"})
    duplicate_skip: frozenset[str] = frozenset({"setpoint_request"})
    counts: dict[str, int] = field(default_factory=dict)

    def deliveries(self, subject: str, message: MessageBase) -> list[float]:
        kind = message.type
        if kind in self.drop_types and self.rng.random() < self.drop:
            self._count("dropped")
            return []
        delay = 0.0
        if kind in self.late_types and self.rng.random() < self.late:
            self._count("late")
            delay = self.late_seconds
        copies = [delay]
        if kind not in self.duplicate_skip and self.rng.random() < self.duplicate:
            self._count("duplicated")
            copies.append(delay + self.rng.random() * self.late_seconds)
        return copies

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass(order=True)
class _Delivery:
    at: float
    seq: int
    subject: str = field(compare=False)
    data: bytes = field(compare=False)
    reply_to: str | None = field(compare=False)
    expires: float = field(compare=False)


class Scenario:
    """Agents, a bus and a simulated clock; see the module docstring."""

    def __init__(
        self,
        *,
        wall_start: float = 1_700_000_000.0,
        plant_start: float = 0.0,
        speedup: float = 1.0,
        latency: float = 0.001,
        faults: FaultModel | None = None,
    ) -> None:
        self.wall_start = wall_start
        self.plant_start = plant_start
        self.speedup = speedup
        self.latency = latency
        self.faults = faults
        self.wall = wall_start
        self.agents: dict[str, Agent] = {}
        self._subs: dict[str, list[Subscription]] = {}
        self._queue: list[_Delivery] = []
        self._seq = 0
        self._round_robin: dict[str, int] = {}
        self._watches: list[tuple[str, list[tuple[str, MessageBase]]]] = []
        #: How to build a fresh agent of each name, for :meth:`restart`.
        self.factories: dict[str, Callable[[], Agent]] = {}
        #: Messages delivered per type, and dropped ones per cause ("ttl", "no_subscriber").
        self.delivered: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    # --- Set-up --------------------------------------------------------------------------

    @property
    def now(self) -> Now:
        return Now(self.wall, self.plant_at(self.wall))

    def plant_at(self, wall: float) -> float:
        return self.plant_start + (wall - self.wall_start) * self.speedup

    def wall_at(self, plant: float) -> float:
        return self.wall_start + (plant - self.plant_start) / self.speedup

    def add(self, agent: Agent) -> Agent:
        if agent.name in self.agents:
            raise ValueError(f"an agent named {agent.name!r} is already in the scenario")
        self.agents[agent.name] = agent
        self._subs[agent.name] = agent.subscriptions()
        return agent

    def restart(self, name: str, fresh: Agent | None = None) -> Agent:
        """Replace agent ``name`` by ``fresh`` (default: a new one from
        :attr:`factories`), restored from the old one's snapshot, as the runtime does from
        the key-value store; the snapshot goes through JSON on the way."""
        if fresh is None:
            fresh = self.factories[name]()
        old = self.agents[name]
        state = json.loads(json.dumps(old.snapshot()))
        fresh.restore(state)
        self.agents[name] = fresh
        self._subs[name] = fresh.subscriptions()
        return fresh

    def watch(self, pattern: str) -> list[tuple[str, MessageBase]]:
        """A list that collects every message delivered on subjects matching ``pattern``."""
        seen: list[tuple[str, MessageBase]] = []
        self._watches.append((pattern, seen))
        return seen

    def machine(self, name: str) -> MachineAgent:
        """The machine agent ``name``, alone or in a host (for the plant world)."""
        for agent in self.agents.values():
            if isinstance(agent, MachineAgent) and agent.name == name:
                return agent
            if isinstance(agent, MachineHost) and name in agent.machines:
                return agent.machines[name]
        raise KeyError(f"no machine agent {name!r}")

    # --- Sending and running ----------------------------------------------------------------

    def publish(
        self, subject: str, message: MessageBase, reply_to: str | None = None, delay: float = 0.0
    ) -> None:
        """Send ``message`` from outside the agents (an MES, a test)."""
        self._send([Outgoing(subject, message)], reply_to=reply_to, extra=delay)

    def _send(
        self, out: Iterable[Outgoing], reply_to: str | None = None, extra: float = 0.0
    ) -> None:
        for item in out:
            data = encode(item.message)
            delays = (
                [0.0] if self.faults is None else self.faults.deliveries(item.subject, item.message)
            )
            expires = math.inf if item.ttl_seconds is None else self.wall + item.ttl_seconds
            for delay in delays:
                self._seq += 1
                heapq.heappush(
                    self._queue,
                    _Delivery(
                        self.wall + self.latency + extra + delay,
                        self._seq,
                        item.subject,
                        data,
                        reply_to,
                        expires,
                    ),
                )

    def _deliver(self, d: _Delivery) -> None:
        if d.at > d.expires:
            self.dropped["ttl"] = self.dropped.get("ttl", 0) + 1
            return
        message = decode(d.subject, d.data)
        self.delivered[message.type] = self.delivered.get(message.type, 0) + 1
        for pattern, seen in self._watches:
            if subject_matches(pattern, d.subject):
                seen.append((d.subject, message))
        receivers: list[str] = []
        groups: dict[str, list[str]] = {}
        for name, subs in self._subs.items():
            for sub in subs:
                if subject_matches(sub.subject, d.subject):
                    if sub.queue is None:
                        receivers.append(name)
                    else:
                        groups.setdefault(sub.queue, []).append(name)
                    break
        for queue, members in sorted(groups.items()):
            turn = self._round_robin.get(queue, 0)
            self._round_robin[queue] = turn + 1
            receivers.append(members[turn % len(members)])
        if not receivers:
            self.dropped["no_subscriber"] = self.dropped.get("no_subscriber", 0) + 1
        for name in receivers:
            agent = self.agents[name]
            self._send(agent.handle(d.subject, message, self.now, d.reply_to))

    def step(self, max_wall: float = math.inf) -> bool:
        """Run the next timer or delivery, if it is due by ``max_wall``; False when none."""
        t_msg = self._queue[0].at if self._queue else math.inf
        t_timer, due = math.inf, None
        for agent in self.agents.values():
            t = agent.next_timer()
            if t is not None and t < t_timer:
                t_timer, due = t, agent
        t = min(t_msg, t_timer)
        if t == math.inf:
            return False
        if t > max_wall:
            self.wall = max(self.wall, max_wall) if max_wall < math.inf else self.wall
            return False
        self.wall = max(self.wall, t)
        if due is not None and t_timer <= t_msg:
            self._send(due.on_timer(self.now))
        else:
            self._deliver(heapq.heappop(self._queue))
        return True

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        for_seconds: float | None = None,
        max_steps: int = 1_000_000,
    ) -> bool:
        """Run until ``until()`` holds (True), nothing is left to do or ``for_seconds`` of
        wall time pass (False)."""
        max_wall = math.inf if for_seconds is None else self.wall + for_seconds
        for _ in range(max_steps):
            if until is not None and until():
                return True
            if not self.step(max_wall):
                return until is not None and until()
        raise RuntimeError(f"scenario still busy after {max_steps} steps (a timer loop?)")

    # --- A whole plant -----------------------------------------------------------------------

    @classmethod
    def from_plant(
        cls,
        config: PlantConfig,
        *,
        hosts: int = 1,
        speedup: float = 60.0,
        faults: FaultModel | None = None,
        failures: Callable[[str, Task], float | None] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        machine: Mapping[str, Any] | None = None,
        energy: Mapping[str, Any] | None = None,
    ) -> Scenario:
        """The four agents of ``config`` and a :class:`PlantWorld`, its machines split
        round robin over ``hosts`` hosts (named ``host-1``...). Keyword mappings go to the
        agents' constructors."""
        scenario = cls(speedup=speedup, faults=faults)
        factories = plant_agent_factories(
            config,
            hosts=hosts,
            speedup=speedup,
            scheduler=scheduler,
            machine=machine,
            energy=energy,
        )
        built = [factories[name]() for name in factories if name.startswith("host-")]
        for agent in built:
            scenario.add(agent)
        for name in ("scheduler", "energy", "supply"):
            scenario.add(factories[name]())
        scenario.factories.update(factories)
        scenario.add(PlantWorld("plant", Subjects(config.name), scenario, failures=failures))
        return scenario


def plant_agent_factories(
    config: PlantConfig,
    *,
    hosts: int = 1,
    speedup: float = 60.0,
    scheduler: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
    energy: Mapping[str, Any] | None = None,
    scheduler_class: type[SchedulerAgent] = SchedulerAgent,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Callable[[], Agent]]:
    """How to build each agent of ``config``, by name: ``host-1``... (the machines split
    round robin over ``hosts`` hosts, or ``groups``: host name to its machines, which must
    cover every machine once), ``scheduler``, ``energy`` and ``supply``.

    Factories, not agents, because a runtime rebuilds an agent to restart it from its
    snapshot. The in-memory :class:`Scenario` and ``autofab negotiate`` over NATS both
    build their plant here, so they run the same agents with the same settings. The
    scheduler is told how many hosts hear each capability (``expected_responders``), so a
    round closes as soon as every host has bid. Keyword mappings go to the agents'
    constructors; ``scheduler_class`` may be a subclass (one that records awards, say).
    """
    if hosts < 1:
        raise ValueError(f"hosts must be at least 1, got {hosts}")
    names = compile_plant(config).machine_names
    if groups is None:
        groups = {f"host-{i + 1}": list(names[i::hosts]) for i in range(hosts) if names[i::hosts]}
    placed = sorted(m for group in groups.values() for m in group)
    if placed != sorted(names):
        raise ValueError(
            f"groups must place every machine of {config.name} once; got {placed}, "
            f"machines: {sorted(names)}"
        )
    machine_kw = {"speedup": speedup, **dict(machine or {})}
    factories: dict[str, Callable[[], Agent]] = {
        host: partial(MachineHost.from_plant, host, config, list(group), **machine_kw)
        for host, group in groups.items()
    }
    expected: dict[str, int] = {}
    for factory in list(factories.values()):
        host = factory()
        assert isinstance(host, MachineHost)
        for capability in host.capabilities:
            expected[capability] = expected.get(capability, 0) + 1
    settings = {"expected_responders": expected, "speedup": speedup, **dict(scheduler or {})}
    factories["scheduler"] = partial(scheduler_class.from_plant, "scheduler", config, **settings)
    factories["energy"] = partial(
        EnergyAgent.from_plant, "energy", config, speedup=speedup, **dict(energy or {})
    )
    factories["supply"] = partial(SupplyAgent.from_plant, "supply", config, speedup=speedup)
    return factories


class PlantWorldContext(Protocol):
    """What :class:`PlantWorld` needs from whatever runs it: the machine agents it drives
    and the plant clock. :class:`Scenario` is one (simulated time); ``autofab negotiate``
    provides another over NATS (a :class:`~autofab.control.bus.SpeedupClock`), so the world's
    logic is written once."""

    def machine(self, name: str) -> MachineAgent:
        """The live agent of machine ``name`` (alone or in a host)."""
        ...

    def wall_at(self, plant: float) -> float:
        """The wall time at which plant time reaches ``plant``."""
        ...


@dataclass
class _Running:
    job: str
    op: int
    round_id: str
    started_at: float
    event_at: float
    breaks: bool


class PlantWorld(Agent):
    """The supervisor and the plant, reduced to what negotiation tests need.

    ``failures(machine, task)`` returns the fraction of the operation after which the
    machine breaks down, or None; a breakdown is repaired after ``repair_seconds`` (plant
    time). :attr:`finished` records every operation the plant completed, which is what
    "done exactly once" is checked against.
    """

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        scenario: PlantWorldContext,
        *,
        failures: Callable[[str, Task], float | None] | None = None,
        repair_seconds: float = 1800.0,
    ) -> None:
        super().__init__(name)
        self.subjects = subjects
        self.scenario = scenario
        self.failures = failures
        self.repair_seconds = repair_seconds
        self.running: dict[str, _Running] = {}
        self.repairs: dict[str, float] = {}
        self.finished: list[tuple[str, int, str, float, float]] = []
        self.breakdowns: list[tuple[str, str, int]] = []
        self._seen: set[str] = set()

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.subjects.setpoint_request)]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        if not isinstance(message, SetpointRequest) or message.request_id in self._seen:
            return []
        self._seen.add(message.request_id)
        if message.variable != "run":
            return []
        agent = self.scenario.machine(message.machine)
        if message.value == 0.0:
            running = self.running.get(message.machine)
            task = agent.active_operation()
            if running is not None and (task is None or task.round_id != running.round_id):
                del self.running[message.machine]
            return []
        task = agent.active_operation()
        if task is None or message.machine in self.repairs:
            return []
        current = self.running.get(message.machine)
        if current is not None and current.round_id == task.round_id:
            return []
        duration = task.duration(agent.speed)
        fraction = self.failures(message.machine, task) if self.failures else None
        breaks = fraction is not None
        at = now.plant + duration * (fraction if fraction is not None else 1.0)
        self.running[message.machine] = _Running(
            task.job, task.op, task.round_id, now.plant, at, breaks
        )
        return []

    def next_timer(self) -> float | None:
        times = [r.event_at for r in self.running.values()] + list(self.repairs.values())
        return self.scenario.wall_at(min(times)) if times else None

    def on_timer(self, now: Now) -> list[Outgoing]:
        out: list[Outgoing] = []
        for machine, running in list(self.running.items()):
            if self.scenario.wall_at(running.event_at) > now.wall:
                continue
            del self.running[machine]
            agent = self.scenario.machine(machine)
            if running.breaks:
                self.breakdowns.append((machine, running.job, running.op))
                self.repairs[machine] = now.plant + self.repair_seconds
                out += agent.breakdown(now)
            else:
                self.finished.append(
                    (running.job, running.op, machine, running.started_at, now.plant)
                )
                out += agent.operation_finished(running.job, running.op, now)
        for machine, at in list(self.repairs.items()):
            if self.scenario.wall_at(at) <= now.wall:
                del self.repairs[machine]
                out += self.scenario.machine(machine).repaired(now)
        return out
