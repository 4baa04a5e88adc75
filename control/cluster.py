"""Agents as Ray actors: what runs where under ``autofab run``, and the actor that hosts it.

Layout (:func:`plan_actors`)
----------------------------
* ``scheduler``, ``energy`` and ``supply``: one actor each.
* Machines: with ``hosting="per_line"`` (the default) one actor per production line, whose
  :class:`~autofab.agents.machine.MachineHost` speaks for every machine on the line and
  answers a call for proposals with one batch; with ``hosting="per_agent"`` one actor per
  machine. A 100-machine plant is a handful of processes per line, not a hundred.
* ``gateway``: the telemetry gateway (OPC UA telemetry to NATS).
* ``supervisor``: the safety supervisor, the only holder of the plant's write credentials.

Every actor is the same class, :class:`HostActor`, told its part by an :class:`ActorSpec`.
Actors are async (asyncio inside Ray), take ``num_cpus`` from the config (0 by default:
they wait on I/O) and ``max_restarts``. An actor starts its part lazily, on its first call,
so an actor that Ray restarts after a crash starts again on the next call the driver makes
(the driver polls every actor for the live view), and its agents restore their state from
the JetStream key-value store (:class:`~autofab.control.bus.AgentRunner`).

Nothing here imports torch: agents run rules or numpy policies. A learned bidding policy
(``policy``) is loaded inside the machine actors only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from autofab.agents.base import Agent
from autofab.agents.machine import MachineHost
from autofab.agents.protocol import (
    PolicyDeploy,
    PolicyDeployed,
    ProtocolError,
    Subjects,
    decode,
    encode,
)
from autofab.agents.scenario import plant_agent_factories
from autofab.agents.scheduler import SchedulerAgent
from autofab.control.natsd import NatsEndpoint
from autofab.envs.plant import PlantConfig

__all__ = [
    "HOSTINGS",
    "ActorSpec",
    "HostActor",
    "Hosting",
    "RunContext",
    "agent_factories",
    "machine_groups",
    "plan_actors",
]

log = logging.getLogger(__name__)

#: Where the driver keeps what a restarted actor must learn (the clock anchor).
CLOCK_KEY: Final = "clock"


def run_bucket_name(plant: str) -> str:
    """The key-value bucket of a run's shared facts (not agent state)."""
    return f"autofab-run-{plant}"


Hosting = Literal["per_line", "per_agent"]
#: Wall seconds the supervisor and the gateway get to reach the plant before start fails.
READY_TIMEOUT_S: Final = 30.0
HOSTINGS: Final[tuple[str, ...]] = ("per_line", "per_agent")
Role = Literal["agents", "gateway", "supervisor"]


@dataclass(frozen=True)
class RunContext:
    """What every actor needs to know about the run; plain data, sent to each actor."""

    config: dict[str, Any]
    nats: NatsEndpoint
    speedup: float
    #: Plant time ``plant_start`` was read off the plant at wall time ``wall_start``.
    plant_start: float
    wall_start: float
    hosting: Hosting
    cert_dir: str
    nodemap_path: str
    operator_token: str = field(repr=False)
    policy: str | None = None
    agent_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Replicas of the key-value buckets (3 on the NATS cluster of configs/nats/).
    kv_replicas: int = 1
    #: The plant's OPC UA endpoint, where it differs from the node map's.
    endpoint: str | None = None

    def nodemap(self) -> Any:
        """The node map, with :attr:`endpoint` in place of the file's when given."""
        import dataclasses

        from autofab.control.opcua.nodemap import load_nodemap

        nodemap = load_nodemap(self.nodemap_path)
        return dataclasses.replace(nodemap, endpoint=self.endpoint) if self.endpoint else nodemap

    def plant(self) -> PlantConfig:
        return PlantConfig.model_validate(self.config)


@dataclass(frozen=True)
class ActorSpec:
    """One actor: its Ray name, its role, and the agents it hosts (role ``agents``)."""

    name: str
    role: Role
    agents: tuple[str, ...] = ()
    num_cpus: float = 0.0
    max_restarts: int = 3


def machine_groups(config: PlantConfig, hosting: Hosting) -> dict[str, list[str]]:
    """Machine host name to its machines: one host per line or one per machine."""
    if hosting not in HOSTINGS:
        raise ValueError(f"hosting: expected one of {', '.join(HOSTINGS)}, got {hosting!r}")
    groups: dict[str, list[str]] = {}
    for line in config.lines:
        names = [n for entry in line.machines for n in entry.names()]
        if hosting == "per_line":
            groups[f"line-{line.name}"] = names
        else:
            groups.update({f"machine-{n}": [n] for n in names})
    return groups


def plan_actors(
    config: PlantConfig, hosting: Hosting, *, num_cpus: float = 0.0, max_restarts: int = 3
) -> list[ActorSpec]:
    """Every actor of a run, in start order (see the module docstring)."""
    specs = [
        ActorSpec("supervisor", "supervisor", num_cpus=num_cpus, max_restarts=max_restarts),
        ActorSpec("gateway", "gateway", num_cpus=num_cpus, max_restarts=max_restarts),
    ]
    for name in ("scheduler", "energy", "supply"):
        specs.append(ActorSpec(name, "agents", (name,), num_cpus, max_restarts))
    for host in machine_groups(config, hosting):
        specs.append(ActorSpec(host, "agents", (host,), num_cpus, max_restarts))
    return specs


def agent_factories(context: RunContext) -> dict[str, Callable[[], Agent]]:
    """How to build each agent of the run, by name (the same in every process)."""
    config = context.plant()
    machine_kw: dict[str, Any] = dict(context.agent_settings.get("machine", {}))
    if context.policy is not None:
        from autofab.agents.policies.bidding_policy import load_bidding_policy

        machine_kw["policy"] = load_bidding_policy(context.policy)
    return plant_agent_factories(
        config,
        speedup=context.speedup,
        groups=machine_groups(config, context.hosting),
        scheduler=context.agent_settings.get("scheduler"),
        machine=machine_kw,
        energy=context.agent_settings.get("energy"),
    )


def _agent_stats(agent: Agent) -> dict[str, Any]:
    """The few numbers the driver shows and reports, per agent."""
    stats: dict[str, Any] = {"ignored": sum(agent.ignored.values())}
    if isinstance(agent, SchedulerAgent):
        jobs = agent.jobs.values()
        stats.update(
            jobs=len(agent.jobs),
            jobs_done=sum(j.finished_at is not None for j in jobs),
            operations_done=len(agent.completions),
            rounds_open=len(agent.rounds),
            reannounced=dict(agent.reannounced),
        )
    elif isinstance(agent, MachineHost):
        stats.update(
            machines={
                name: {
                    "status": m.status,
                    "queue": len(m.queue),
                    "completed": m.completed,
                    "running": m.active_operation() is not None,
                }
                for name, m in agent.machines.items()
            }
        )
    return stats


class HostActor:
    """A Ray actor that hosts one part of the run (agents, the gateway or the supervisor).

    Plain class: :func:`remote_class` wraps it with ``ray.remote``, so this module imports
    without Ray and the class can be tested in process.
    """

    def __init__(self, context: RunContext, spec: ActorSpec) -> None:
        self.context = context
        self.spec = spec
        self.started_at: float | None = None
        self.policy = context.policy or "rules"
        self.metrics_address = ""
        #: Recent contract-net round latencies (wall seconds, call to award).
        self.round_sample: deque[float] = deque(maxlen=20_000)
        self._exported: dict[Any, float] = {}
        self._lock = asyncio.Lock()
        self._bus: Any = None
        self._runner: Any = None
        self._gateway: Any = None
        self._supervisor: Any = None
        self._task: asyncio.Task[None] | None = None
        self._clock: Any = None

    async def _ensure_started(self) -> None:
        async with self._lock:
            if self.started_at is None:
                await self._start()
                self.started_at = time.time()

    async def start(self) -> dict[str, Any]:
        """Start the part (idempotent); returns the process id, when it became ready and
        where its metrics are (``host:port``)."""
        await self._ensure_started()
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "node": _node_id(),
            "ready_at": self.started_at,
            "metrics": self.metrics_address,
        }

    async def _start(self) -> None:
        # asyncua logs routine session details at INFO and WARNING; the run's log is for
        # what needs attention.
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        from autofab.control.bus import AgentRunner, BusSettings, SpeedupClock
        from autofab.control.negotiate_cmd import connect_bus

        ctx, spec = self.context, self.spec
        from autofab.control import metrics

        host, port = metrics.start_exporter()
        self.metrics_address = f"{host}:{port}"
        if _reconstructed():
            metrics.AGENT_RESTARTS.labels(ctx.plant().name, spec.name.split("-")[0]).inc()
        if spec.role == "supervisor":
            self._supervisor = self._make_supervisor()
            await self._supervisor.start()
            self._supervisor.bus.export_metrics(ctx.plant().name, "supervisor")
            # Ready means in control: connected to the plant and sending the heartbeat.
            await self._supervisor.wait_connected(timeout=READY_TIMEOUT_S)
            return
        self._bus = await connect_bus(
            ctx.nats,
            settings=BusSettings(name=f"autofab-{spec.name}", kv_replicas=ctx.kv_replicas),
            timeout=10.0,
        )
        if spec.role == "gateway":
            from autofab.control.gateway import TelemetryGateway

            self._bus.export_metrics(ctx.plant().name, "gateway")

            self._gateway = TelemetryGateway(ctx.nodemap(), self._bus, Path(ctx.cert_dir))
            self._task = asyncio.create_task(self._gateway.run(), name="autofab-gateway")
            # Ready means reading the plant.
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not self._gateway.stats.connected:
                if self._task.done() or time.monotonic() > deadline:
                    raise ConnectionError(
                        f"the telemetry gateway could not read the plant at "
                        f"{self._gateway.nodemap.endpoint} within {READY_TIMEOUT_S:g} s"
                    )
                await asyncio.sleep(0.05)
            return
        factories = agent_factories(ctx)
        clock = self._clock = SpeedupClock(
            ctx.speedup, plant_start=ctx.plant_start, wall_start=ctx.wall_start
        )
        anchor = await self._read_clock()
        if anchor is not None:  # a restart: the plant's clock was started long ago
            clock.plant_start, clock.wall_start = anchor
        agents = [factories[name]() for name in spec.agents]
        self._runner = AgentRunner(self._bus, agents, plant=ctx.plant().name, plant_clock=clock)
        await self._runner.start()
        if any(isinstance(a, MachineHost) for a in agents):
            subjects = Subjects(ctx.plant().name)
            await self._bus.client.subscribe(subjects.policy_deploy, cb=self._on_deploy)

    async def _on_deploy(self, msg: Any) -> None:
        """Swap the machines' bidding policy (``autofab policy deploy``). Agents handle one
        message at a time, so a decision in progress finishes with the old policy and the
        next one uses the new. A policy that fails to load leaves the old one in place."""
        host = self.spec.name
        try:
            request = decode(msg.subject, msg.data)
        except ProtocolError as exc:
            log.warning("%s: refused a policy deploy: %s", host, exc)
            return
        if not isinstance(request, PolicyDeploy):
            log.warning("%s: expected policy_deploy, got %s", host, request.type)
            return
        try:
            from autofab.agents.policies.bidding_policy import load_bidding_policy

            policy = load_bidding_policy(request.policy)
        except (OSError, ValueError) as exc:
            answer = PolicyDeployed(
                host=host, ok=False, policy=request.policy, detail=str(exc)[:500]
            )
        else:
            assert self._runner is not None
            for agent in self._runner.agents:
                if isinstance(agent, MachineHost):
                    for machine in agent.machines.values():
                        machine.policy = policy
            self.policy = request.policy
            answer = PolicyDeployed(host=host, ok=True, policy=request.policy)
            log.warning(
                "%s: bidding policy now %s (by %s)", host, request.policy, request.requested_by
            )
        if msg.reply:
            await self._bus.client.publish(msg.reply, encode(answer))

    async def _read_clock(self) -> tuple[float, float] | None:
        """The run's clock anchor (plant time, wall time), once the driver has set it."""
        try:
            kv = await self._bus.key_value(run_bucket_name(self.context.plant().name))
            entry = await kv.get(CLOCK_KEY)
        except Exception:  # no bucket or no key yet: the run has not started its clock
            return None
        if entry.value is None:
            return None
        data = json.loads(entry.value)
        return float(data["plant_start"]), float(data["wall_start"])

    async def set_clock(self, plant_start: float, wall_start: float) -> None:
        """Anchor the agents' plant clock: plant time ``plant_start`` at ``wall_start``."""
        await self._ensure_started()
        if self._clock is not None:
            self._clock.plant_start, self._clock.wall_start = plant_start, wall_start
            if self._runner is not None:
                self._runner.rearm()

    def _make_supervisor(self) -> Any:
        from autofab.control.opcua.writer import PlantCredentials
        from autofab.control.supervisor import SupervisorLimits
        from autofab.control.supervisor_runtime import SupervisorRuntime

        ctx = self.context
        plant = ctx.plant()
        return SupervisorRuntime(
            limits=SupervisorLimits.from_plant(plant),
            nodemap=ctx.nodemap(),
            credentials=PlantCredentials.from_cert_dir(Path(ctx.cert_dir)),
            nats=ctx.nats,
            operator_token=ctx.operator_token,
            plant=plant.name,
        )

    def _delta(self, key: Any, total: float) -> float:
        """How much a running total grew since the last export (never negative)."""
        last = self._exported.get(key, 0.0)
        self._exported[key] = total
        return max(total - last, 0.0)

    def _export(self) -> None:
        """Move the scheduler's and the supervisor's running totals into the metrics."""
        from autofab.control import metrics

        plant = self.context.plant().name
        if self._runner is not None:
            for agent in self._runner.agents:
                if not isinstance(agent, SchedulerAgent):
                    continue
                for name, family in (
                    ("rounds", metrics.CNP_ROUNDS),
                    ("bids", metrics.CNP_BIDS),
                    ("awards", metrics.CNP_AWARDS),
                ):
                    family.labels(plant).inc(self._delta(name, agent.counts[name]))
                for reason, n in agent.reannounced.items():
                    delta = self._delta(("re", reason), n)
                    metrics.CNP_REANNOUNCEMENTS.labels(plant, reason).inc(delta)
                histogram = metrics.CNP_ROUND_DURATION.labels(plant)
                while agent.round_seconds:
                    seconds = agent.round_seconds.popleft()
                    histogram.observe(seconds)
                    self.round_sample.append(seconds)
        if self._supervisor is not None:
            s = self._supervisor.stats
            total = 0
            for (outcome, reason), n in s.decisions.items():
                total += n
                delta = self._delta(("decision", outcome, reason), n)
                metrics.SUPERVISOR_DECISIONS.labels(plant, outcome, reason).inc(delta)
            metrics.SUPERVISOR_REQUESTS.labels(plant).inc(self._delta("requests", total))
            connected = 1.0 if self._supervisor.connected else 0.0
            metrics.SUPERVISOR_OPCUA_CONNECTED.labels(plant).set(connected)
            alarm = 1.0 if s.watchdog_alarm else 0.0
            metrics.SUPERVISOR_WATCHDOG_ALARM.labels(plant).set(alarm)
            histogram = metrics.SUPERVISOR_WRITE_DURATION.labels(plant)
            while s.write_seconds:
                histogram.observe(s.write_seconds.popleft())

    async def stats(self) -> dict[str, Any]:
        """The part's counters for the live view and the report (starts it if needed)."""
        await self._ensure_started()
        self._export()
        out: dict[str, Any] = {"name": self.spec.name, "pid": os.getpid()}
        if self._runner is not None:
            out["agents"] = {a.name: _agent_stats(a) for a in self._runner.agents}
            out["policy"] = self.policy
            if self.round_sample:
                sample = np.asarray(self.round_sample)
                out["rounds"] = {
                    "count": int(sample.size),
                    "p50_s": float(np.percentile(sample, 50)),
                    "p99_s": float(np.percentile(sample, 99)),
                }
            out["rejected"] = self._runner.stats.rejected_total()
        if self._gateway is not None:
            g = self._gateway.stats
            out["gateway"] = {
                "connected": g.connected,
                "published": g.published,
                "reconnects": g.reconnects,
                "plant_time": g.plant_time,
            }
        if self._supervisor is not None:
            s = self._supervisor.stats
            outcomes: dict[str, int] = {}
            reasons: dict[str, int] = {}
            for (outcome, reason), n in s.decisions.items():
                outcomes[outcome] = outcomes.get(outcome, 0) + n
                if outcome != "applied":
                    reasons[reason] = reasons.get(reason, 0) + n
            out["supervisor"] = {
                "outcomes": outcomes,
                "reasons": reasons,
                "connected": self._supervisor.connected,
                "heartbeats": s.heartbeats,
                "writes": sum(s.writes.values()),
                "mismatches": s.mismatches,
            }
        return out

    async def stop(self) -> None:
        """Stop the part: the agents' last state is written, links are closed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.stop()
        if self._supervisor is not None:
            with contextlib.suppress(Exception):
                await self._supervisor.stop()
        if self._bus is not None:
            with contextlib.suppress(Exception):
                await self._bus.close()

    def pid(self) -> int:
        return os.getpid()


def _node_id() -> str:
    """The Ray node this actor runs on ("" outside Ray)."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


def _reconstructed() -> bool:
    """Whether Ray restarted this actor after a crash (False outside Ray)."""
    import warnings

    try:
        import ray

        with warnings.catch_warnings():  # Ray warns about its own use of a deprecated API
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


def remote_class(ray: Any) -> Any:
    """:class:`HostActor` as a Ray actor class."""
    return ray.remote(HostActor)


def actor_options(spec: ActorSpec) -> Mapping[str, Any]:
    """Ray options for ``spec``'s actor: name, CPUs, restarts."""
    return {
        "name": f"autofab-{spec.name}",
        "num_cpus": spec.num_cpus,
        "max_restarts": spec.max_restarts,
        "max_task_retries": -1 if spec.max_restarts else 0,
        # Over a cluster, spread the actors across the nodes rather than pack one.
        "scheduling_strategy": "SPREAD",
    }
