"""``autofab negotiate``: the plant's agents negotiate its orders over a real NATS bus.

One process runs the scheduler, the energy and supply agents and the machine agents
(grouped in :class:`~autofab.agents.machine.MachineHost` objects, ``--hosts`` of them), each
on its own :class:`~autofab.control.bus.AgentRunner`, over the embedded ``nats-server``
(:class:`~autofab.control.natsd.EmbeddedNats`) or a configured one (``--nats-url``). No
Ray and no OPC UA: the plant is :class:`~autofab.agents.scenario.PlantWorld`, the same world
the in-memory tests use, driven here by a :class:`~autofab.control.bus.SpeedupClock`.

The orders are the plant config's (``orders:``): the initial backlog and the Poisson
arrivals of :func:`~autofab.envs.factory_model.generate_orders`, seeded by ``--seed``. An
MES task submits each one when plant time reaches its arrival, through the real
``orders.submit`` request/reply path, and resubmits it under the same client order id
after a timeout (the scheduler answers a repeat with its first answer). The run ends when
every order is acknowledged and every job has finished its route.

What the runtime adds to the agents, and why
--------------------------------------------
* **Results are re-sent after a gap.** An :class:`InformDone` is published at most once,
  and one lost while the bus reconnects, or while the scheduler restarts, would make the
  scheduler time the operation out and have it made a second time. So the world keeps the
  results it produced, and after a reconnect or an agent restart they are published again
  from shortly before the gap; the scheduler ignores a result it already has.
* **The scheduler's grace is in wall time.** A result may be late by a reconnect, which
  takes wall seconds whatever the speedup. The grace before an award is withdrawn is
  therefore at least ``grace_wall_seconds`` of wall time (``grace_wall_seconds x speedup``
  plant seconds); at a high speedup the default 600 plant seconds would be a blink.
* **A host restart pauses the world.** The plant does not touch a machine agent while its
  host is being rebuilt from the key-value store, so no completion lands on an agent that
  is about to be replaced.

The runtime file
----------------
While it runs, the command writes ``<plant>.json`` (mode 0600, in a 0700 folder) with the
NATS URL, user and password under ``$XDG_RUNTIME_DIR/autofab/`` (or
``~/.autofab/run/`` where there is no ``XDG_RUNTIME_DIR``), never inside a repository, so
``autofab order`` finds the bus without being told. The file names the owning process;
it is removed on exit, and a file left by a process that is gone is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

import nats.js.errors
import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autofab.agents.base import Agent, Now, Outgoing
from autofab.agents.machine import MachineAgent, MachineHost, Task
from autofab.agents.protocol import (
    Accept,
    Bid,
    CallForProposals,
    Failure,
    InformDone,
    MessageBase,
    OrderAck,
    OrderItem,
    OrderRefused,
    OrderSubmit,
    ProtocolError,
    SetpointRequest,
    Subjects,
)
from autofab.agents.scenario import PlantWorld, plant_agent_factories
from autofab.agents.scheduler import SchedulerAgent
from autofab.control.bus import (
    AgentRunner,
    Bus,
    BusClosedError,
    BusDisconnectedError,
    BusSettings,
    RequestTimeoutError,
    SpeedupClock,
    state_bucket_name,
)
from autofab.control.console import EXIT_INTERNAL, console, err_console, fail, user_errors
from autofab.control.natsd import EmbeddedNats, NatsEndpoint, NatsServerError
from autofab.envs.plant import PlantConfig, compile_plant, load_plant

__all__ = [
    "DEFAULT_SPEEDUP",
    "AwardRecord",
    "Negotiation",
    "NegotiationProgress",
    "NegotiationSettings",
    "PlannedOrder",
    "RecordingScheduler",
    "RuntimeInfo",
    "config_orders",
    "connect_bus",
    "negotiate",
    "read_runtime_file",
    "remove_runtime_file",
    "runtime_file",
    "write_runtime_file",
]

log = logging.getLogger(__name__)

#: Plant seconds per wall second by default: the demo's 8-hour shift of orders in about
#: 15 wall seconds, while a message hop (about a millisecond) stays a few plant seconds.
DEFAULT_SPEEDUP: Final = 2000.0
#: The wire type of a call for proposals: one per Contract Net round.
CFP_TYPE: Final = CallForProposals.model_fields["type"].default
#: Exit code after Ctrl-C, as shells report a SIGINT.
EXIT_INTERRUPTED: Final = 130
#: Results kept for re-sending after a gap (far more than are in flight at once).
_RESULTS_KEPT: Final = 10_000
#: How often the progress line and the link watcher look (wall seconds).
_POLL_S: Final = 0.05


# --- the runtime file -------------------------------------------------------------------


def runtime_dir() -> Path:
    """The per-user folder of runtime files: ``$XDG_RUNTIME_DIR/autofab`` (a private
    tmpfs on systemd hosts, cleared at logout), else ``~/.autofab/run``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "autofab"
    return Path.home() / ".autofab" / "run"


def runtime_file(plant: str) -> Path:
    """Where a running ``autofab negotiate`` of ``plant`` keeps its connection details."""
    return runtime_dir() / f"{plant}.json"


@dataclass(frozen=True)
class RuntimeInfo:
    """What a client needs to join a running plant's bus; the password stays out of repr."""

    plant: str
    url: str
    user: str | None
    password: str | None = field(repr=False)
    pid: int
    started_at: float

    @property
    def endpoint(self) -> NatsEndpoint:
        return NatsEndpoint(self.url, self.user, self.password)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_runtime_file(plant: str) -> RuntimeInfo:
    """The runtime file of ``plant``'s running negotiate.

    Raises:
        ValueError: no file, an unreadable one, or one whose process is gone; the message
            says what to do instead.
    """
    path = runtime_file(plant)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = RuntimeInfo(**data)
    except FileNotFoundError:
        raise ValueError(
            f"no running plant {plant!r} found (no runtime file {str(path)!r}); start "
            f"`autofab negotiate` for it, or pass --nats-url (and --user/--password)"
        ) from None
    except (OSError, TypeError, ValueError) as error:
        raise ValueError(f"runtime file {str(path)!r} is unreadable: {error}") from None
    if not _alive(info.pid):
        raise ValueError(
            f"plant {plant!r} is not running (process {info.pid} of runtime file "
            f"{str(path)!r} is gone); start `autofab negotiate` again"
        )
    return info


def write_runtime_file(info: RuntimeInfo) -> Path:
    """Write ``info`` to its plant's runtime file, readable by this user alone.

    Written to a temporary name and renamed, so a reader never sees half a file.

    Raises:
        ValueError: another live process already runs this plant.
    """
    path = runtime_file(info.plant)
    with contextlib.suppress(ValueError):
        other = read_runtime_file(info.plant)
        if other.pid != info.pid:
            raise ValueError(
                f"plant {info.plant!r} is already running in process {other.pid} (runtime "
                f"file {str(path)!r}); stop it first"
            )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        os.chmod(temporary, 0o600)
        json.dump(asdict(info), stream)
    os.replace(temporary, path)
    return path


def remove_runtime_file(plant: str, pid: int | None = None) -> None:
    """Remove ``plant``'s runtime file if it is ours (written by process ``pid``, default
    this one), so a stopping run never deletes a newer run's file."""
    path = runtime_file(plant)
    try:
        owner = json.loads(path.read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        return
    if owner == (os.getpid() if pid is None else pid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_server_options(
    plant: str, nats_url: str | None, user: str | None, password: str | None
) -> None:
    """Refuse (exit 2) a login without ``--nats-url``, and a second run of a plant that is
    already running here (its runtime file names a live process)."""
    if nats_url is None and (user is not None or password is not None):
        fail("--user and --password go with --nats-url (the embedded server makes its own)")
    try:
        running: RuntimeInfo | None = read_runtime_file(plant)
    except ValueError:
        running = None
    if running is not None:
        fail(
            f"plant {plant!r} is already running in process {running.pid} (runtime "
            f"file {str(runtime_file(plant))!r}); stop it first"
        )


async def connect_bus(
    endpoint: NatsEndpoint, *, settings: BusSettings | None = None, timeout: float = 5.0
) -> Bus:
    """A connected :class:`Bus`, or ConnectionError after ``timeout`` wall seconds.

    The bus reconnects forever once connected; nats-py with that setting also retries the
    *first* connection forever, so the deadline here is what turns a wrong URL or password
    into an error.
    """
    bus = Bus(endpoint, settings=settings)
    try:
        await asyncio.wait_for(bus.connect(), timeout)
    except TimeoutError:
        raise ConnectionError(
            f"could not connect to NATS at {endpoint.url} within {timeout:g} s (is the "
            "server running, and are the user and password right?)"
        ) from None
    return bus


# --- the MES: the config's orders --------------------------------------------------------


@dataclass(frozen=True)
class PlannedOrder:
    """An order the MES submits once plant time reaches ``arrival_at``."""

    arrival_at: float
    submit: OrderSubmit


def config_orders(config: PlantConfig, seed: int, limit: int | None = None) -> list[PlannedOrder]:
    """The plant config's orders, as an MES would submit them: one order per job of
    :func:`~autofab.envs.factory_model.generate_orders` (same seed, same orders as
    ``autofab simulate``), due at its due date; the first ``limit`` only, if given.

    Raises:
        ValueError: the config makes no orders.
    """
    from autofab.envs.factory_model import generate_orders

    plant = compile_plant(config)
    book = generate_orders(plant, config.horizon_seconds, np.random.default_rng(seed))
    release, due = book.instance.release, book.instance.due
    orders = [
        PlannedOrder(
            float(release[j]),
            OrderSubmit(
                client_order_id=f"{config.name}-s{seed}-{j + 1:03d}",
                items=[OrderItem(product=config.products[int(k)].name, quantity=1)],
                due_at=float(due[j]),
            ),
        )
        for j, k in enumerate(book.job_product)
    ]
    orders.sort(key=lambda o: o.arrival_at)
    return orders if limit is None else orders[:limit]


# --- the award log ----------------------------------------------------------------------


@dataclass(frozen=True)
class AwardRecord:
    """One award as the scheduler decided it: the round, the operation, the winner, its
    score (lower won), its promised finish (plant time) and when it happened."""

    round_id: str
    job: str
    op: int
    machine: str
    score: float
    finish_at: float
    plant_time: float
    wall_time: float


class RecordingScheduler(SchedulerAgent):
    """The scheduler, telling ``on_award`` of every award it makes.

    The score is the one the scheduler ranked by (the winner's bid, pushed behind the
    machine's backlog), recomputed from the round it has just closed.
    """

    def __init__(
        self,
        *args: Any,
        on_award: Callable[[AwardRecord], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_award = on_award

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        return self._record(super().handle(subject, message, now, reply_to), now)

    def on_timer(self, now: Now) -> list[Outgoing]:
        return self._record(super().on_timer(now), now)

    def _record(self, out: list[Outgoing], now: Now) -> list[Outgoing]:
        if self.on_award is None:
            return out
        for item in out:
            accept = item.message
            if not isinstance(accept, Accept):
                continue
            rnd = self.rounds.get(accept.round_id)
            if rnd is None or rnd.winner is None or rnd.expected_finish is None:
                continue
            kept = rnd.bids[rnd.winner]
            bid = kept if isinstance(kept, Bid) else Bid.model_validate(kept)
            bid = bid.model_copy(update={"finish_at": rnd.expected_finish})
            self.on_award(
                AwardRecord(
                    round_id=accept.round_id,
                    job=accept.job,
                    op=accept.op,
                    machine=accept.machine,
                    score=self.weights.score(bid, rnd.ready_at),
                    finish_at=rnd.expected_finish,
                    plant_time=now.plant,
                    wall_time=now.wall,
                )
            )
        return out


# --- the plant world over NATS ----------------------------------------------------------


class _WorldContext:
    """The :class:`~autofab.agents.scenario.PlantWorldContext` of a negotiation: the
    machine agents of the hosts now running, and the speedup clock."""

    def __init__(self, negotiation: Negotiation) -> None:
        self._negotiation = negotiation

    def machine(self, name: str) -> MachineAgent:
        host = self._negotiation.host_of[name]
        agent = self._negotiation.agent(host)
        assert isinstance(agent, MachineHost)
        return agent.machines[name]

    def wall_at(self, plant: float) -> float:
        clock = self._negotiation.clock
        return clock.wall_start + (plant - clock.plant_start) / clock.speedup


class NatsPlantWorld(PlantWorld):
    """:class:`PlantWorld` on a runner: it keeps its results for re-sending, tells the
    hosts' runners when it changed their machines, and can be paused.

    ``on_machines_changed`` is called after the world calls into machine agents (a
    completion, a breakdown, a repair): their timers and snapshots must be looked at again.
    """

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        context: _WorldContext,
        *,
        on_machines_changed: Callable[[], None],
        failures: Callable[[str, Task], float | None] | None = None,
        repair_seconds: float = 1800.0,
    ) -> None:
        super().__init__(name, subjects, context, failures=failures, repair_seconds=repair_seconds)
        self.on_machines_changed = on_machines_changed
        self.paused = False
        #: ``(wall time, result)`` of every InformDone and Failure the world produced lately.
        self.results: deque[tuple[float, Outgoing]] = deque(maxlen=_RESULTS_KEPT)
        #: Setpoints acted on, and those of them that arrived after their expiry (the
        #: runner drops those first, so this must stay 0: "no stale command is acted on").
        self.setpoints_acted = 0
        self.stale_setpoints_acted = 0

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        if isinstance(message, SetpointRequest) and message.request_id not in self._seen:
            self.setpoints_acted += 1
            if now.wall > message.expires_at:
                self.stale_setpoints_acted += 1
        return super().handle(subject, message, now, reply_to)

    def next_timer(self) -> float | None:
        return None if self.paused else super().next_timer()

    def on_timer(self, now: Now) -> list[Outgoing]:
        if self.paused:
            return []
        out = super().on_timer(now)
        for item in out:
            if isinstance(item.message, InformDone | Failure):
                self.results.append((now.wall, item))
        self.on_machines_changed()
        return out

    def results_since(self, wall: float) -> list[Outgoing]:
        """The results produced at or after wall time ``wall``, oldest first."""
        return [item for at, item in self.results if at >= wall]


def _breakdowns(context: _WorldContext, rng: random.Random) -> Callable[[str, Task], float | None]:
    """Breakdowns drawn from the plant's failure law: an operation of ``d`` running seconds
    breaks with probability ``1 - exp(-hazard(health) * d)``, at a uniform point."""

    def failures(machine: str, task: Task) -> float | None:
        agent = context.machine(machine)
        hazard = agent.spec.hazard(agent.health)
        if rng.random() < 1.0 - math.exp(-hazard * task.duration(agent.speed)):
            return rng.uniform(0.05, 0.95)
        return None

    return failures


# --- the negotiation ----------------------------------------------------------------------


@dataclass(frozen=True)
class NegotiationSettings:
    """How a negotiation runs; see the module docstring for the grace."""

    #: Plant seconds per wall second.
    speedup: float = DEFAULT_SPEEDUP
    #: Machine hosts; the machines are split round robin over them.
    hosts: int = 2
    #: Seed of the orders and the breakdowns.
    seed: int = 0
    #: Break machines down by the plant's failure law.
    breakdowns: bool = True
    #: Least wall time an award waits for its result before it is withdrawn.
    grace_wall_seconds: float = 5.0
    #: Wall seconds a call for proposals stays open (it closes earlier once every host bid).
    bid_window_seconds: float = 0.2
    #: Wall seconds a setpoint stays valid.
    setpoint_ttl_seconds: float = 5.0
    #: Wall seconds the MES waits for an answer before it submits again.
    request_timeout_seconds: float = 2.0
    #: Start with empty agent state (delete the plant's state bucket) rather than resume.
    fresh_state: bool = True

    def __post_init__(self) -> None:
        for key in (
            "speedup",
            "grace_wall_seconds",
            "bid_window_seconds",
            "setpoint_ttl_seconds",
            "request_timeout_seconds",
        ):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {value}")
        if self.hosts < 1:
            raise ValueError(f"hosts must be at least 1, got {self.hosts}")


class StopFlag(Protocol):
    """What asks a run to stop: an :class:`asyncio.Event` or a :class:`threading.Event`."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class NegotiationProgress:
    """Where a run stands, for the progress line."""

    plant_time: float
    ops_done: int
    ops_total: int
    orders_acked: int
    orders_planned: int
    rounds: int
    reannounced: int
    messages: int
    rejected: int


class Negotiation:
    """The plant's agents on one bus, the world, and the MES; see the module docstring.

    ``await start()``, then ``await run(stop)`` until done (or ``stop`` is set), then
    ``await stop()``. :meth:`restart` rebuilds an agent from the key-value store mid-run.

    Args:
        config: the plant.
        endpoint: the NATS server (embedded or configured).
        settings: speedup, hosts, seed and the timing knobs.
        orders: what the MES submits; default the config's orders (:func:`config_orders`).
        bus_settings: the connection settings (tests shorten the pings).
    """

    def __init__(
        self,
        config: PlantConfig,
        endpoint: NatsEndpoint,
        settings: NegotiationSettings | None = None,
        *,
        orders: Sequence[PlannedOrder] | None = None,
        bus_settings: BusSettings | None = None,
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self.settings = s = settings or NegotiationSettings()
        self.bus_settings = bus_settings or BusSettings(name=f"autofab-negotiate-{config.name}")
        self.subjects = Subjects(config.name)
        self.planned = list(config_orders(config, s.seed) if orders is None else orders)
        self.routes = {p.name: len(p.route) for p in config.products}
        #: Every award, in the order made.
        self.awards: list[AwardRecord] = []
        #: The scheduler's answer to each planned order, by client order id.
        self.answers: dict[str, OrderAck | OrderRefused] = {}
        self.clock = SpeedupClock(s.speedup)
        self.factories: dict[str, Callable[[], Agent]] = plant_agent_factories(
            config,
            hosts=s.hosts,
            speedup=s.speedup,
            scheduler={
                "bid_window_seconds": s.bid_window_seconds,
                "grace_seconds": max(600.0, s.grace_wall_seconds * s.speedup),
                "on_award": self.awards.append,
            },
            machine={"setpoint_ttl_seconds": s.setpoint_ttl_seconds},
            scheduler_class=RecordingScheduler,
        )
        #: Which host speaks for each machine.
        self.host_of: dict[str, str] = {}
        self.runners: dict[str, AgentRunner] = {}
        self._context = _WorldContext(self)
        repair = float(np.mean(compile_plant(config).repair_mean_s))
        self.world = NatsPlantWorld(
            "plant",
            self.subjects,
            self._context,
            on_machines_changed=self._machines_changed,
            failures=_breakdowns(self._context, random.Random(s.seed)) if s.breakdowns else None,
            repair_seconds=repair,
        )
        self._bus: Bus | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._fed = asyncio.Event()
        self.started_wall: float | None = None
        self.finished_wall: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise BusClosedError("the negotiation has not been started")
        return self._bus

    def agent(self, name: str) -> Agent:
        """The live agent ``name`` (after a restart, the new one)."""
        return self.runners[name].agents[0]

    @property
    def scheduler(self) -> SchedulerAgent:
        agent = self.agent("scheduler")
        assert isinstance(agent, SchedulerAgent)
        return agent

    async def start(self, connect_timeout: float = 5.0) -> None:
        """Connect, start the world and the agents, and set the MES going.

        Plant time starts at 0 now. The world and the machines come first, so nothing the
        scheduler says goes unheard.

        Raises:
            ConnectionError: the NATS server cannot be reached.
        """
        self._bus = await connect_bus(
            self.endpoint, settings=self.bus_settings, timeout=connect_timeout
        )
        try:
            if self.settings.fresh_state:
                await self._clear_state()
            self.clock = SpeedupClock(self.settings.speedup, wall_clock=self.bus.wall)
            self.started_wall = self.clock.wall_start
            world = AgentRunner(
                self.bus,
                [self.world],
                plant=self.config.name,
                plant_clock=self.clock,
                persist=False,
            )
            self.runners["plant"] = await world.start()
            for name in [n for n in self.factories if n.startswith("host-")] + [
                "energy",
                "supply",
                "scheduler",
            ]:
                agent = self.factories[name]()
                if isinstance(agent, MachineHost):
                    self.host_of.update(dict.fromkeys(agent.machines, name))
                runner = AgentRunner(
                    self.bus, [agent], plant=self.config.name, plant_clock=self.clock
                )
                self.runners[name] = await runner.start()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._feed_orders(), name="autofab-mes"),
            asyncio.create_task(self._watch_link(), name="autofab-link-watch"),
        ]

    async def stop(self) -> None:
        """Stop the MES, the agents and the world, and close the bus. Safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in reversed(list(self.runners)):
            await _stop_runner(self.runners[name])
        if self._bus is not None:
            await self._bus.close()
        if self.finished_wall is None:
            self.finished_wall = time.time()

    async def _clear_state(self) -> None:
        """Delete the plant's state bucket, so a run on a shared server starts afresh."""
        with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            await self.bus.client.jetstream().delete_key_value(state_bucket_name(self.config.name))

    def _machines_changed(self) -> None:
        for name, runner in self.runners.items():
            if name.startswith("host-"):
                runner.rearm()

    async def restart(self, name: str, down_seconds: float = 0.0) -> Agent:
        """Stop agent ``name``, leave it down ``down_seconds`` (wall), and start a fresh one
        restored from the key-value store; then re-send the results it may have missed.

        While a host is down the world is paused (see the module docstring).
        """
        old = self.runners[name]
        host = name.startswith("host-")
        stopped_at = self.bus.wall()
        if host:
            self.world.paused = True
        try:
            await _stop_runner(old)
            await asyncio.sleep(down_seconds)
            runner = AgentRunner(
                self.bus, [self.factories[name]()], plant=self.config.name, plant_clock=self.clock
            )
            self.runners[name] = await runner.start()
        finally:
            if host:
                self.world.paused = False
                self.runners["plant"].rearm()
        await self._resend_results(stopped_at)
        return self.agent(name)

    async def _resend_results(self, since_wall: float) -> None:
        """Publish again the results produced since shortly before ``since_wall``: enough
        to cover what the link took with it before anyone noticed it was down."""
        s = self.bus_settings
        margin = s.ping_interval_s * (s.max_outstanding_pings + 1)
        results = self.world.results_since(since_wall - margin)
        if results:
            log.info("re-sending %d results after a gap", len(results))
            await self.bus.publish_outgoing(results, self.bus.wall())

    async def _watch_link(self) -> None:
        """After the link comes back, re-send the results of the gap."""
        down_since: float | None = None
        while True:
            if not self.bus.connected:
                down_since = down_since or self.bus.wall()
            elif down_since is not None:
                await self._resend_results(down_since)
                down_since = None
            await asyncio.sleep(_POLL_S)

    async def _feed_orders(self) -> None:
        """The MES: submit each planned order at its arrival, again after a timeout."""
        s = self.settings
        for planned in self.planned:
            while (ahead := planned.arrival_at - self.clock()) > 0:
                await asyncio.sleep(min(ahead / s.speedup, 0.5))
            while True:
                try:
                    answer = await self.bus.request(
                        self.subjects.orders_submit,
                        planned.submit,
                        timeout=s.request_timeout_seconds,
                    )
                except (RequestTimeoutError, BusDisconnectedError, ProtocolError) as error:
                    log.info(
                        "order %s: %s; submitting again", planned.submit.client_order_id, error
                    )
                    await asyncio.sleep(0.1)
                    continue
                if isinstance(answer, OrderAck | OrderRefused):
                    self.answers[planned.submit.client_order_id] = answer
                    break
                log.warning("order %s answered with %s", planned.submit.client_order_id, answer)
                await asyncio.sleep(0.1)
        self._fed.set()

    # -- running -------------------------------------------------------------------------

    def done(self) -> bool:
        """Every planned order answered, and every accepted job through its route."""
        return self._fed.is_set() and self.scheduler.all_done()

    def progress(self) -> NegotiationProgress:
        scheduler = self.scheduler
        submitted = {j.job for j in scheduler.jobs.values()}
        total = sum(self.routes.get(j.product, 0) for j in scheduler.jobs.values())
        answered = set(self.answers)
        total += sum(
            self.routes.get(item.product, 0) * item.quantity
            for p in self.planned
            if p.submit.client_order_id not in answered
            for item in p.submit.items
        )
        stats = self.bus.stats
        return NegotiationProgress(
            plant_time=self.clock(),
            ops_done=len(scheduler.completions),
            ops_total=max(total, len(scheduler.completions)) if submitted or total else 0,
            orders_acked=len(self.answers),
            orders_planned=len(self.planned),
            rounds=stats.published[CFP_TYPE],
            reannounced=sum(scheduler.reannounced.values()),
            messages=sum(stats.published.values()),
            rejected=stats.rejected_total(),
        )

    async def run(
        self,
        stop: StopFlag | None = None,
        *,
        serve: bool = False,
        on_progress: Callable[[NegotiationProgress], None] | None = None,
        time_limit: float | None = None,
    ) -> Literal["done", "stopped", "time_limit"]:
        """Wait until the run is done, ``stop`` is set, or ``time_limit`` wall seconds pass;
        with ``serve``, keep taking orders after the planned ones are done, until ``stop``.
        ``on_progress`` is called every few tens of milliseconds. The outcome is "done" when
        every order so far is done, whatever ended the wait."""
        started = time.monotonic()
        outcome: Literal["done", "stopped", "time_limit"] = "done"
        while True:
            finished = self.done()
            if finished and not serve:
                break
            if stop is not None and stop.is_set():
                outcome = "done" if finished else "stopped"
                break
            if time_limit is not None and time.monotonic() - started > time_limit:
                outcome = "done" if finished else "time_limit"
                break
            if on_progress is not None:
                on_progress(self.progress())
            await asyncio.sleep(_POLL_S)
        self.finished_wall = self.bus.wall()
        if on_progress is not None:
            on_progress(self.progress())
        return outcome

    # -- the report ----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Per job, per machine and in total: what the final table and summary.json show.

        Times are plant seconds from the start of the run.
        """
        scheduler = self.scheduler
        client_of = {o.order: c for c, o in scheduler.orders.items() if o.order is not None}
        jobs = [
            {
                "client_order_id": client_of.get(j.order),
                "job": j.job,
                "product": j.product,
                "due_at": j.due_at,
                "finished_at": j.finished_at,
                "lateness_seconds": None if j.finished_at is None else j.finished_at - j.due_at,
            }
            for j in scheduler.jobs.values()
        ]
        finished = self.world.finished
        makespan = max((end for *_, end in finished), default=0.0)
        machines = []
        for machine in sorted(self.host_of):
            mine = [(start, end) for _, _, m, start, end in finished if m == machine]
            busy = sum(end - start for start, end in mine)
            machines.append(
                {
                    "machine": machine,
                    "host": self.host_of[machine],
                    "ops": len(mine),
                    "busy_seconds": busy,
                    "utilisation": busy / makespan if makespan > 0 else 0.0,
                    "breakdowns": sum(1 for m, *_ in self.world.breakdowns if m == machine),
                }
            )
        stats = self.bus.stats
        tardy = [j for j in jobs if (j["lateness_seconds"] or 0.0) > 0]
        wall = (self.finished_wall or time.time()) - (self.started_wall or time.time())
        totals = {
            "orders": len(scheduler.orders),
            "jobs": len(jobs),
            "jobs_done": sum(1 for j in jobs if j["finished_at"] is not None),
            "ops_done": len(scheduler.completions),
            "makespan_seconds": makespan,
            "tardy_jobs": len(tardy),
            "tardiness_seconds": sum(j["lateness_seconds"] for j in tardy),
            "rounds": stats.published[CFP_TYPE],
            "reannounced": dict(scheduler.reannounced),
            "reannounced_total": sum(scheduler.reannounced.values()),
            "breakdowns": len(self.world.breakdowns),
            "messages": sum(stats.published.values()),
            "rejected": stats.rejected_total(),
            "rejected_by_reason": _by_reason(stats.rejected),
            "dropped": stats.dropped_total(),
            "handler_errors": sum(stats.handler_errors.values()),
            "reconnects": stats.reconnects,
            "wall_seconds": wall,
            "speedup": self.settings.speedup,
        }
        return {"plant": self.config.name, "seed": self.settings.seed, "jobs": jobs,
                "machines": machines, "totals": totals}  # fmt: skip


async def _stop_runner(runner: AgentRunner) -> None:
    """Stop a runner (it cancels its own tasks until they end)."""
    await runner.stop()


def _by_reason(counter: Mapping[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, reason), n in counter.items():
        out[reason] = out.get(reason, 0) + n
    return dict(sorted(out.items()))


# --- the command --------------------------------------------------------------------------


def _hm(seconds: float | None) -> str:
    """Plant time as ``h:mm`` from the start of the run."""
    if seconds is None:
        return "-"
    minutes = round(seconds / 60)
    sign = "-" if minutes < 0 else ""
    return f"{sign}{abs(minutes) // 60}:{abs(minutes) % 60:02d}"


def _print_report(summary: Mapping[str, Any], outcome: str) -> None:
    jobs = Table(title="Jobs (plant time h:mm)")
    for column, justify in (
        ("Order", "left"),
        ("Job", "left"),
        ("Product", "left"),
        ("Due", "right"),
        ("Done", "right"),
        ("Late by", "right"),
    ):
        jobs.add_column(column, justify=justify)  # type: ignore[arg-type]
    for j in summary["jobs"]:
        late = j["lateness_seconds"]
        jobs.add_row(
            escape(str(j["client_order_id"])),
            escape(j["job"]),
            escape(j["product"]),
            _hm(j["due_at"]),
            _hm(j["finished_at"]),
            "-" if late is None else ("on time" if late <= 0 else _hm(late)),
        )
    console.print(jobs)
    machines = Table(title="Machines")
    for column in ("Machine", "Host", "Ops", "Busy h:mm", "Utilisation", "Breakdowns"):
        machines.add_column(column, justify="left" if column in ("Machine", "Host") else "right")
    for m in summary["machines"]:
        machines.add_row(
            escape(m["machine"]),
            escape(m["host"]),
            str(m["ops"]),
            _hm(m["busy_seconds"]),
            f"{100 * m['utilisation']:.0f}%",
            str(m["breakdowns"]),
        )
    console.print(machines)
    t = summary["totals"]
    totals = Table(title=f"Totals ({outcome})")
    totals.add_column("")
    totals.add_column("Value", justify="right")
    reasons = ", ".join(f"{k} {v}" for k, v in t["reannounced"].items())
    rejected = ", ".join(f"{k} {v}" for k, v in t["rejected_by_reason"].items())
    for name, value in (
        ("jobs done", f"{t['jobs_done']} / {t['jobs']}"),
        ("operations done", str(t["ops_done"])),
        ("makespan (plant h:mm)", _hm(t["makespan_seconds"])),
        ("tardy jobs", f"{t['tardy_jobs']} (total {_hm(t['tardiness_seconds'])})"),
        ("rounds", str(t["rounds"])),
        ("re-announcements", f"{t['reannounced_total']}" + (f" ({reasons})" if reasons else "")),
        ("breakdowns", str(t["breakdowns"])),
        ("messages published", str(t["messages"])),
        ("messages rejected", f"{t['rejected']}" + (f" ({rejected})" if rejected else "")),
        ("messages dropped", str(t["dropped"])),
        ("wall time", f"{t['wall_seconds']:.1f} s at speedup {t['speedup']:g}"),
    ):
        totals.add_row(name, escape(value))
    console.print(totals)


def _progress_text(p: NegotiationProgress) -> str:
    return (
        f"plant {_hm(p.plant_time)} | orders {p.orders_acked}/{p.orders_planned} | rounds "
        f"{p.rounds} | msgs {p.messages} | rejected {p.rejected} | re-announced {p.reannounced}"
    )


@dataclass(frozen=True)
class _Either:
    """Set when either flag is."""

    first: StopFlag
    second: StopFlag | None

    def is_set(self) -> bool:
        return self.first.is_set() or (self.second is not None and self.second.is_set())


@contextlib.contextmanager
def _sigint_sets(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM set ``stop``, so the run winds down cleanly (agents,
    bus, embedded server, runtime file) instead of dying with a traceback or leaving the
    server, which runs in its own session, behind."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            continue
        installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def _negotiate(
    config: PlantConfig,
    settings: NegotiationSettings,
    orders: Sequence[PlannedOrder],
    endpoint: NatsEndpoint | None,
    time_limit: float | None,
    *,
    serve: bool = False,
    stop: StopFlag | None = None,
    connect_timeout: float = 5.0,
) -> tuple[str, Negotiation]:
    """Run the whole negotiation, with the runtime file and the progress line.

    Ctrl-C (in the main thread) or ``stop`` ends it early; either way the agents, the bus,
    the server and the runtime file are cleaned up before this returns.
    """
    async with contextlib.AsyncExitStack() as stack:
        if endpoint is None:
            server = await stack.enter_async_context(EmbeddedNats())
            endpoint = server.endpoint
        negotiation = Negotiation(config, endpoint, settings, orders=orders)
        await negotiation.start(connect_timeout)
        stack.push_async_callback(negotiation.stop)
        write_runtime_file(
            RuntimeInfo(
                config.name,
                endpoint.url,
                endpoint.user,
                endpoint.password,
                os.getpid(),
                time.time(),
            )
        )
        stack.callback(remove_runtime_file, config.name)
        interrupted = asyncio.Event()
        either = _Either(interrupted, stop)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("ops | {task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        with _sigint_sets(interrupted), progress:
            task = progress.add_task(config.name, total=None, detail="starting")

            def show(p: NegotiationProgress) -> None:
                progress.update(
                    task, completed=p.ops_done, total=p.ops_total or None, detail=_progress_text(p)
                )

            outcome = await negotiation.run(
                either, serve=serve, on_progress=show, time_limit=time_limit
            )
    return outcome, negotiation


#: ``--nats-url``, ``--user`` and ``--password`` of the commands that start agents: an
#: existing NATS server instead of the embedded one (``autofab negotiate``, ``autofab run``).
ServerUrlOption = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        envvar="AUTOFAB_NATS_URL",
        help="Use this NATS server (with JetStream) instead of starting one.",
        show_default=False,
    ),
]
ServerUserOption = Annotated[
    str | None,
    typer.Option("--user", envvar="AUTOFAB_NATS_USER", help="NATS user for --nats-url."),
]
ServerPasswordOption = Annotated[
    str | None,
    typer.Option(
        "--password",
        envvar="AUTOFAB_NATS_PASSWORD",
        help="NATS password for --nats-url (prefer the environment variable).",
    ),
]


def negotiate(
    config: Annotated[
        str,
        typer.Argument(
            help="A plant YAML file, or a shipped plant name such as 'demo'.", show_default=False
        ),
    ],
    speedup: Annotated[
        float,
        typer.Option(
            "--speedup", min=1e-3, help="Plant seconds per wall second (the plant clock)."
        ),
    ] = DEFAULT_SPEEDUP,
    hosts: Annotated[
        int, typer.Option("--hosts", min=1, help="Machine hosts; machines are split over them.")
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the orders and breakdowns.")] = 0,
    orders: Annotated[
        int | None,
        typer.Option(
            "--orders", min=0, help="Submit only the first N of the config's orders (0: none)."
        ),
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Keep running after the orders are done, taking orders from `autofab order`, "
            "until Ctrl-C.",
        ),
    ] = False,
    breakdowns: Annotated[
        bool,
        typer.Option(
            "--breakdowns/--no-breakdowns", help="Break machines down by the plant's failure law."
        ),
    ] = True,
    nats_url: ServerUrlOption = None,
    user: ServerUserOption = None,
    password: ServerPasswordOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Run folder for awards.json and summary.json "
            "[default: runs/{plant}__negotiate__{seed}__{time}].",
            show_default=False,
        ),
    ] = None,
    log_path: Annotated[
        Path | None,
        typer.Option(
            "--log", help="The award log [default: awards.json in --out].", show_default=False
        ),
    ] = None,
    connect_timeout: Annotated[
        float,
        typer.Option("--connect-timeout", min=0.1, help="Seconds to wait for --nats-url."),
    ] = 5.0,
    time_limit: Annotated[
        float | None,
        typer.Option(
            "--time-limit", min=0.1, help="Give up after this many wall seconds (exit 1)."
        ),
    ] = None,
) -> None:
    """Run the plant's agents over NATS on the config's orders: Contract Net, live.

    The scheduler, energy, supply and machine agents run in this process over the embedded
    nats-server (or --nats-url), against a simulated plant at --speedup. The config's
    orders are submitted as an MES would, by request/reply. Prints a progress line and a
    final table, and logs every award to JSON. While it runs, `autofab order submit` and
    `autofab order status` can reach it. Ctrl-C stops cleanly.
    """
    with user_errors():
        plant = load_plant(config)
        settings = NegotiationSettings(
            speedup=speedup, hosts=hosts, seed=seed, breakdowns=breakdowns
        )
        planned = [] if orders == 0 else config_orders(plant, seed, orders)
    check_server_options(plant.name, nats_url, user, password)
    folder = out or Path("runs") / f"{plant.name}__negotiate__{seed}__{int(time.time())}"
    awards_path = log_path or folder / "awards.json"
    endpoint = None if nats_url is None else NatsEndpoint(nats_url, user, password)
    _quiet_logging()
    try:
        outcome, negotiation = asyncio.run(
            _negotiate(
                plant,
                settings,
                planned,
                endpoint,
                time_limit,
                serve=serve,
                connect_timeout=connect_timeout,
            )
        )
    except (ConnectionError, NatsServerError) as error:
        fail(str(error))
    summary = negotiation.summary()
    _print_report(summary, outcome)
    log_data = {
        "plant": plant.name,
        "seed": seed,
        "speedup": speedup,
        "started_at": negotiation.started_wall,
        "awards": [asdict(a) for a in negotiation.awards],
    }
    with user_errors(f"cannot write the award log {str(awards_path)!r}"):
        awards_path.parent.mkdir(parents=True, exist_ok=True)
        awards_path.write_text(json.dumps(log_data, indent=1) + "\n", encoding="utf-8")
        if out is not None or log_path is None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "summary.json").write_text(
                json.dumps(summary, indent=1) + "\n", encoding="utf-8"
            )
    console.print(f"wrote {len(negotiation.awards)} awards to {escape(str(awards_path))}")
    if outcome == "stopped":
        err_console.print("stopped by Ctrl-C before every order was done")
        raise typer.Exit(EXIT_INTERRUPTED)
    if outcome == "time_limit":
        fail(f"not done within --time-limit {time_limit:g} s", code=EXIT_INTERNAL)


def _quiet_logging() -> None:
    """Show the runtime's warnings (a lost link, a refused message) on stderr, rate-limited
    by the bus, unless the application already configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        from rich.logging import RichHandler

        handler = RichHandler(console=err_console, show_path=False, show_time=False)
        logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
