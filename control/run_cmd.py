"""``autofab run``: the whole loop, agents as Ray actors, from one command.

Start order (ARCHITECTURE.md, "Runtime"):

1. **NATS**: the embedded ``nats-server`` with generated credentials, or ``--nats-url``.
2. **The plant**: the OPC UA plant twin in this process, secured (Basic256Sha256,
   SignAndEncrypt, generated certificates), with ``dispatch="agents"``: nothing runs on the
   plant unless the supervisor writes it.
3. **Ray**: local by default, or ``--ray-address`` to join a cluster.
4. **The actors** (:mod:`autofab.control.cluster`): supervisor, telemetry gateway,
   scheduler, energy, supply and the machine hosts. ``agents_ready_s`` is the wall time
   from the command's start until every actor has started its part.
5. **The MES feed**: the config's orders (the same seeded order book the twin runs, one
   production order per job), each submitted over NATS request/reply when plant time
   reaches its release, with the plant's order number (``plant_job``), and resubmitted
   under the same client order id after a timeout.

The loop that results::

    MES --orders.submit--> scheduler --cfp/accept--> machine hosts --setpoint.request-->
    supervisor --OPC UA write (checked)--> plant twin --OPC UA read--> gateway
    --telemetry--> machine hosts --inform_done--> scheduler

The run ends when plant time reaches ``--duration``, when every order is done, or on
Ctrl-C; then every actor is stopped (agents write their last state), Ray, the twin and the
embedded server are shut down, and the report is printed and, with ``--report``, written
as JSON. Nothing is left running: the embedded server runs in its own session and is
stopped (or killed) on every path out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autofab.agents.protocol import OrderAck, OrderRefused, OrderSubmit, Subjects
from autofab.control import metrics
from autofab.control.bus import BusSettings
from autofab.control.cluster import (
    CLOCK_KEY,
    HOSTINGS,
    ActorSpec,
    Hosting,
    RunContext,
    actor_options,
    plan_actors,
    remote_class,
    run_bucket_name,
)
from autofab.control.console import console, err_console, fail, user_errors
from autofab.control.natsd import EmbeddedNats, NatsEndpoint, NatsServerError
from autofab.control.negotiate_cmd import (
    PlannedOrder,
    RuntimeInfo,
    ServerPasswordOption,
    ServerUrlOption,
    ServerUserOption,
    _hm,
    _quiet_logging,
    _sigint_sets,
    check_server_options,
    config_orders,
    connect_bus,
    remove_runtime_file,
    write_runtime_file,
)
from autofab.control.opcua.twin import PlantTwin, TwinSettings
from autofab.envs.plant import PlantConfig, load_plant, parse_duration

__all__ = ["PlantRun", "RunSettings", "run"]

log = logging.getLogger(__name__)

EXIT_STARTUP: Final = 3
EXIT_INTERRUPTED: Final = 130
#: Wall seconds the MES waits for an order's answer before sending it again.
ORDER_TIMEOUT_S: Final = 2.0
#: Wall seconds between the driver's polls of the actors (the live view).
POLL_S: Final = 0.5
#: Least wall time the scheduler waits for an operation's result before withdrawing it.
GRACE_WALL_S: Final = 5.0


@dataclass(frozen=True)
class RunSettings:
    """What ``autofab run`` was asked to do; checked on creation."""

    duration_s: float
    speedup: float = 120.0
    seed: int = 0
    hosting: Hosting = "per_line"
    num_cpus: float = 0.0
    max_restarts: int = 3
    ray_address: str | None = None
    nats: NatsEndpoint | None = None
    policy: str | None = None
    cert_dir: Path | None = None
    watchdog_timeout_s: float = 5.0
    kv_replicas: int = 1
    #: A real plant (or any OPC UA server) instead of the twin: its node map, and
    #: optionally an endpoint that overrides the map's. ``cert_dir`` must then hold the
    #: supervisor's login (``supervisor.json``).
    nodemap: Path | None = None
    endpoint: str | None = None
    agent_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration: expected plant seconds > 0, got {self.duration_s!r}")
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"speedup: expected a positive number, got {self.speedup!r}")
        if self.hosting not in HOSTINGS:
            raise ValueError(
                f"hosting: expected one of {', '.join(HOSTINGS)}, got {self.hosting!r}"
            )
        if not 1 <= self.kv_replicas <= 5:
            raise ValueError(f"kv_replicas: expected 1 to 5, got {self.kv_replicas!r}")
        if self.num_cpus < 0 or self.max_restarts < 0:
            raise ValueError("num_cpus and max_restarts must be >= 0")


class _RunFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsSection(_RunFileModel):
    """``nats:`` of a run file: an existing server or cluster (the password comes from
    ``AUTOFAB_NATS_PASSWORD``, never from the file)."""

    url: str = Field(min_length=1)
    user: str | None = None
    kv_replicas: int = Field(1, ge=1, le=5)


class PlantSection(_RunFileModel):
    """``plant:`` of a run file: a real plant (any OPC UA server) instead of the twin."""

    nodemap: Path
    cert_dir: Path
    endpoint: str | None = None


class RaySection(_RunFileModel):
    """``ray:`` of a run file: an existing cluster to join."""

    address: str = Field(min_length=1)


class RunFile(_RunFileModel):
    """A run file: where the servers of a deployment are, beside the plant config.

    ``autofab run FILE`` takes it where it takes a plant config; the file is a run file when
    it has ``plant_config``. Command-line flags win over the file.

    .. code-block:: yaml

        plant_config: configs/plant100.yaml     # a path (relative to this file) or a name
        nats: {url: "nats://nats-1:4222", user: autofab, kv_replicas: 3}
        plant: {endpoint: "opc.tcp://plc:4840", nodemap: acme-nodemap.json, cert_dir: certs}
        ray: {address: "head:6379"}
    """

    plant_config: str = Field(min_length=1)
    nats: NatsSection | None = None
    plant: PlantSection | None = None
    ray: RaySection | None = None


def load_run_source(source: str) -> tuple[PlantConfig, RunFile | None]:
    """A plant config, or a run file and the plant config it names.

    Raises:
        ValueError: a file that is neither, naming the file and the key at fault.
    """
    path = Path(source)
    data: Any = None
    if path.suffix in (".yaml", ".yml") and path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not valid YAML: {exc}") from None
    if not (isinstance(data, dict) and "plant_config" in data):
        return load_plant(source), None
    try:
        run_file = RunFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"run file {source}: {where}: {first['msg']}") from None
    base = path.parent
    named = base / run_file.plant_config
    plant = load_plant(str(named) if named.is_file() else run_file.plant_config)
    if run_file.plant is not None:
        section = run_file.plant
        run_file = run_file.model_copy(
            update={
                "plant": section.model_copy(
                    update={
                        "nodemap": base / section.nodemap.expanduser(),
                        "cert_dir": base / section.cert_dir.expanduser(),
                    }
                )
            }
        )
    return plant, run_file


@dataclass
class RunProgress:
    """What the live view shows, refreshed every :data:`POLL_S`."""

    plant_time: float = 0.0
    duration_s: float = 0.0
    orders_submitted: int = 0
    orders_total: int = 0
    jobs_done: int = 0
    ops_in_progress: int = 0
    machines: dict[str, str] = field(default_factory=dict)
    power_kw: float = 0.0
    cap_kw: float = 0.0
    safety: dict[str, int] = field(default_factory=dict)
    actors_up: int = 0
    actors: int = 0


class PlantReader:
    """A read-only view of a real plant for the driver: plant time, each machine's state
    and counters, read every ``period_s`` over its own secure, anonymous OPC UA session
    (the driver never writes: only the supervisor does)."""

    COUNTERS: Final = ("parts_good", "parts_scrap", "breakdowns")

    def __init__(
        self, nodemap: Any, cert_dir: Path, *, endpoint: str | None = None, period_s: float = 0.5
    ) -> None:
        self.nodemap = nodemap
        self.cert_dir = cert_dir
        self.endpoint = endpoint or nodemap.endpoint
        self.period_s = period_s
        self.machines = list(nodemap.machines)
        self.plant_time = 0.0
        self.plant_power_w = 0.0
        self.values: dict[tuple[str, str], Any] = {}
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and read once (a clear error if the plant cannot be reached)."""
        from autofab.control.opcua.security import secure_client

        client = await secure_client(self.endpoint, self.cert_dir, "run-client")
        try:
            await client.connect()
        except Exception as exc:
            raise ConnectionError(f"cannot reach the plant at {self.endpoint}: {exc!r}") from None
        self._client = client
        self._targets = [("", "plant_time"), ("", "power")] + [
            (m, v) for m in self.machines for v in ("state", *self.COUNTERS)
        ]
        self._nodes = [
            client.get_node(self.nodemap.plant_node_id(v) if not m else self.nodemap.node_id(m, v))
            for m, v in self._targets
        ]
        await self.read()
        self._task = asyncio.create_task(self._loop(), name="autofab-plant-reader")

    async def read(self) -> None:
        values = await self._client.read_values(self._nodes)
        self.values = dict(zip(self._targets, values, strict=True))
        self.plant_time = float(self.values[("", "plant_time")])
        self.plant_power_w = float(self.values[("", "power")])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.read()
            except Exception as exc:  # a lost link: keep the last values, say so
                log.warning("plant reader: %r", exc)

    def states(self) -> dict[str, str]:
        from autofab.control.gateway import STATES

        return {m: STATES.get(int(self.values[(m, "state")]), "idle") for m in self.machines}

    def total(self, counter: str) -> int:
        return sum(int(self.values[(m, counter)]) for m in self.machines)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            from autofab.control.opcua.security import close_client

            await close_client(self._client)


class PlantRun:
    """One ``autofab run``: use ``async with PlantRun(config, settings) as run:`` and
    ``await run.run_until_done(stop)``; :meth:`report` afterwards."""

    def __init__(self, config: PlantConfig, settings: RunSettings) -> None:
        self.config = config
        self.settings = settings
        self.subjects = Subjects(config.name)
        self.specs: list[ActorSpec] = plan_actors(
            config,
            settings.hosting,
            num_cpus=settings.num_cpus,
            max_restarts=settings.max_restarts,
        )
        self.orders: list[PlannedOrder] = [
            o for o in config_orders(config, settings.seed) if o.arrival_at < settings.duration_s
        ]
        self.t0 = time.monotonic()
        self.agents_ready_s: float | None = None
        self.twin: PlantTwin | None = None
        #: A real plant's reader (``nodemap`` given) and its plant time at the start.
        self.link: PlantReader | None = None
        self.link_start = 0.0
        self.cert_dir = Path()
        self.nodemap_path = Path()
        self.actors: dict[str, Any] = {}
        self.acks: dict[str, OrderAck | OrderRefused] = {}
        self.last_stats: dict[str, dict[str, Any]] = {}
        self.endpoint: NatsEndpoint | None = None
        self._stack = contextlib.AsyncExitStack()
        self._ray: Any = None
        self._ray_started = False
        self._bus: Any = None
        self.file_sd: Path | None = None
        #: The Ray nodes the actors run on.
        self.nodes: list[str] = []
        self.metrics_targets: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> PlantRun:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Everything up to all actors ready (steps 1 to 4 of the module docstring)."""
        s = self.settings
        if s.nats is None:
            server = await self._stack.enter_async_context(EmbeddedNats())
            self.endpoint = server.endpoint
        else:
            self.endpoint = s.nats
        self._bus = await connect_bus(
            self.endpoint,
            settings=BusSettings(name="autofab-run", kv_replicas=s.kv_replicas),
            timeout=10.0,
        )
        self._stack.push_async_callback(self._bus.close)
        # Where `autofab order` and `autofab policy deploy` find this plant's bus.
        info = RuntimeInfo(
            self.config.name,
            self.endpoint.url,
            self.endpoint.user,
            self.endpoint.password,
            os.getpid(),
            time.time(),
        )
        write_runtime_file(info)
        self._stack.callback(remove_runtime_file, self.config.name, os.getpid())
        await self._clear_state()
        if s.nodemap is not None:
            await self._start_plant_link(s.nodemap)
        else:
            await self._start_twin()
        self._start_ray()
        from autofab.control.supervisor_runtime import ensure_operator_token

        context = RunContext(
            config=self.config.model_dump(mode="json"),
            nats=self.endpoint,
            speedup=s.speedup,
            plant_start=self.plant_time,
            wall_start=time.time(),
            hosting=s.hosting,
            cert_dir=str(self.cert_dir),
            nodemap_path=str(self.nodemap_path),
            operator_token=ensure_operator_token(self.config.name),
            policy=s.policy,
            agent_settings=self._agent_settings(),
            kv_replicas=s.kv_replicas,
            endpoint=s.endpoint,
        )
        actor_class = remote_class(self._ray)
        for spec in self.specs:
            self.actors[spec.name] = actor_class.options(**actor_options(spec)).remote(
                context, spec
            )
        started = await asyncio.gather(*(a.start.remote() for a in self.actors.values()))
        self.agents_ready_s = time.monotonic() - self.t0
        self.nodes = sorted({str(info.get("node", "")) for info in started} - {""})
        await self._start_clock()
        self._start_metrics(started)

    async def _start_twin(self) -> None:
        s = self.settings
        twin_settings = TwinSettings(
            speedup=s.speedup,
            seed=s.seed,
            cert_dir=s.cert_dir,
            dispatch="agents",
            watchdog_timeout_s=s.watchdog_timeout_s,
            start_paused=True,
        )
        self.twin = PlantTwin(self.config, twin_settings)
        await self.twin.start()
        self._stack.push_async_callback(self.twin.stop)
        self.cert_dir, self.nodemap_path = self.twin.cert_dir, self.twin.nodemap_path

    async def _start_plant_link(self, nodemap_path: Path) -> None:
        """A real plant: check the node map and the login here, before any actor starts,
        and read the plant's time and counters for the live view and the report."""
        from autofab.control.opcua.nodemap import load_nodemap
        from autofab.control.opcua.writer import PlantCredentials

        s = self.settings
        if s.cert_dir is None:
            raise ValueError("--cert-dir is required with --nodemap (it holds supervisor.json)")
        nodemap = load_nodemap(nodemap_path)
        missing = nodemap.missing_work_variables()
        if missing:
            raise ValueError(
                f"node map {str(nodemap_path)!r} lacks the operation interface autofab run "
                f"needs ({len(missing)} variables, first: {', '.join(missing[:4])})"
            )
        PlantCredentials.from_cert_dir(s.cert_dir)  # a clear error now, not in an actor
        self.cert_dir, self.nodemap_path = Path(s.cert_dir), Path(nodemap_path)
        self.link = PlantReader(nodemap, self.cert_dir, endpoint=s.endpoint)
        await self.link.start()
        self._stack.push_async_callback(self.link.stop)
        self.link_start = self.link.plant_time

    async def _start_clock(self) -> None:
        """Start plant time now that every agent is ready, and tell every actor (and the
        key-value store, for actors restarted later) where the clock stands."""
        plant_start = self.twin.resume() if self.twin is not None else self.plant_time
        wall_start = time.time()
        kv = await self._bus.key_value(run_bucket_name(self.config.name))
        anchor = {"plant_start": plant_start, "wall_start": wall_start}
        await kv.put(CLOCK_KEY, json.dumps(anchor).encode())
        await asyncio.gather(
            *(a.set_clock.remote(plant_start, wall_start) for a in self.actors.values())
        )

    def _start_metrics(self, started: Sequence[Mapping[str, Any]]) -> None:
        """This process's exporter (the plant's metrics) and the file_sd file that lists it
        beside every actor's, for Prometheus (configs/prometheus/prometheus.yml)."""
        host, port = metrics.start_exporter()
        self._stack.callback(metrics.stop_exporter)
        self._bus.export_metrics(self.config.name, "mes")
        targets = [metrics.ScrapeTarget(host, port, {"kind": "plant"})]
        for spec, info in zip(self.specs, started, strict=True):
            address = str(info.get("metrics") or "")
            if address:
                h, _, p = address.rpartition(":")
                targets.append(metrics.ScrapeTarget(h, int(p), {"kind": spec.role}))
        self.metrics_targets = [t.address for t in targets]
        self.file_sd = metrics.write_file_sd(
            metrics.file_sd_path(self.config.name), targets, labels={"plant": self.config.name}
        )
        self._stack.callback(self._remove_file_sd)
        if self.twin is not None:
            metrics.PLANT.update(metrics.plant_snapshot(self.twin.model))
            self._stack.callback(metrics.PLANT.clear)

    def _remove_file_sd(self) -> None:
        if self.file_sd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.file_sd.unlink()

    def _agent_settings(self) -> dict[str, dict[str, Any]]:
        """The agents' settings: the config's, over defaults that hold at any speedup.

        A result may be late by wall seconds (a reconnect, an actor restart) whatever the
        speedup, so the scheduler waits at least ``GRACE_WALL_S`` of wall time before it
        withdraws an award; at 900x the default 600 plant seconds would be 0.7 s.
        """
        s = self.settings
        defaults: dict[str, dict[str, Any]] = {
            "scheduler": {"grace_seconds": max(600.0, GRACE_WALL_S * s.speedup)},
        }
        for kind, values in s.agent_settings.items():
            defaults.setdefault(kind, {}).update(values)
        return defaults

    async def _clear_state(self) -> None:
        """A run starts fresh: drop agent state a previous run left in the key-value store
        (a configured NATS server outlives runs; the embedded one starts empty)."""
        from autofab.control.bus import state_bucket_name

        for bucket in (state_bucket_name(self.config.name), run_bucket_name(self.config.name)):
            with contextlib.suppress(Exception):
                await self._bus.client.jetstream().delete_key_value(bucket)

    def _start_ray(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from autofab.control.ray_tasks import init_ray

        self._ray = ray
        if ray.is_initialized():
            return
        init_ray(ray, self.settings.ray_address, logging_level=logging.WARNING, log_to_driver=True)
        self._ray_started = True

    async def stop(self) -> None:
        """Stop the actors (their agents write their last state), Ray, the twin and NATS."""
        if self.actors:
            stops = [a.stop.remote() for a in self.actors.values()]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), 10.0)
            for actor in self.actors.values():
                with contextlib.suppress(Exception):
                    self._ray.kill(actor, no_restart=True)
            self.actors = {}
        if self._ray_started:
            self._ray.shutdown()
            self._ray_started = False
        await self._stack.aclose()

    # -- running -----------------------------------------------------------------------

    @property
    def endpoint_text(self) -> str:
        """The plant's OPC UA endpoint, for people."""
        if self.twin is not None:
            return self.twin.endpoint
        return self.link.endpoint if self.link is not None else "(not started)"

    @property
    def plant_time(self) -> float:
        if self.twin is not None:
            return self.twin.model.now
        assert self.link is not None
        return self.link.plant_time

    def finished(self) -> bool:
        """Plant time reached the duration, or every order submitted is done."""
        if self.twin is None:  # a real plant: orders come from its MES; run for the time
            return self.plant_time - self.link_start >= self.settings.duration_s - 1e-6
        model = self.twin.model
        if self.plant_time >= self.settings.duration_s - 1e-6 or model.done:
            return True
        return len(self.acks) == len(self.orders) and model.jobs_done >= len(self.orders)

    async def _feed_orders(self) -> None:
        """The MES: submit each order at its release (plant time), with the plant's number."""
        for planned in self.orders:
            while self.plant_time < planned.arrival_at:
                wait = (planned.arrival_at - self.plant_time) / self.settings.speedup
                await asyncio.sleep(min(max(wait, 0.01), 0.5))
            submit = planned.submit
            job = int(submit.client_order_id.rsplit("-", 1)[1]) - 1
            message = OrderSubmit.model_validate({**submit.model_dump(), "plant_job": job})
            while submit.client_order_id not in self.acks:
                try:
                    answer = await self._bus.request(
                        self.subjects.orders_submit, message, timeout=ORDER_TIMEOUT_S
                    )
                except (TimeoutError, ConnectionError) as exc:
                    log.warning("order %s: %s; sending again", submit.client_order_id, exc)
                    await asyncio.sleep(0.2)
                    continue
                if isinstance(answer, OrderAck | OrderRefused):
                    self.acks[submit.client_order_id] = answer
                    if isinstance(answer, OrderRefused):
                        log.warning("order %s refused: %s", submit.client_order_id, answer.reason)

    async def poll(self) -> RunProgress:
        """Ask every actor for its counters (an actor being restarted is skipped)."""
        names = list(self.actors)
        refs = [self.actors[n].stats.remote() for n in names]
        results = await asyncio.gather(
            *(asyncio.wait_for(r, 5.0) for r in refs), return_exceptions=True
        )
        if self.twin is not None:
            metrics.PLANT.update(metrics.plant_snapshot(self.twin.model))
        up = 0
        for name, result in zip(names, results, strict=True):
            if isinstance(result, dict):
                self.last_stats[name] = result
                up += 1
        return self.progress(up)

    def progress(self, actors_up: int | None = None) -> RunProgress:
        up = len(self.actors) if actors_up is None else actors_up
        if self.twin is None:
            assert self.link is not None
            states = self.link.states()
            return RunProgress(
                plant_time=self.plant_time - self.link_start,
                duration_s=self.settings.duration_s,
                jobs_done=self.link.total("parts_good"),
                ops_in_progress=sum(v == "running" for v in states.values()),
                machines=states,
                power_kw=self.link.plant_power_w / 1e3,
                safety=self.safety(),
                actors_up=up,
                actors=len(self.specs),
            )
        model = self.twin.model
        names = model.plant.machine_names
        states = ("idle", "running", "down", "maintenance")
        return RunProgress(
            plant_time=model.now,
            duration_s=self.settings.duration_s,
            orders_submitted=len(self.acks),
            orders_total=len(self.orders),
            jobs_done=int(model.jobs_done),
            ops_in_progress=int((model.status == 1).sum()),
            machines={names[m]: states[int(model.status[m])] for m in range(len(names))},
            power_kw=model.plant_power_w() / 1e3,
            cap_kw=model.cap_w / 1e3,
            safety=self.safety(),
            actors_up=len(self.actors) if actors_up is None else actors_up,
            actors=len(self.specs),
        )

    def safety(self) -> dict[str, int]:
        sup = self.last_stats.get("supervisor", {}).get("supervisor", {})
        outcomes: dict[str, int] = dict(sup.get("outcomes", {}))
        counts = {k: int(outcomes.get(k, 0)) for k in ("applied", "clamped", "rejected")}
        return {"requests": sum(outcomes.values()), **counts}

    async def run_until_done(
        self,
        stop: asyncio.Event | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
    ) -> str:
        """Run until :meth:`finished` (``"done"``) or ``stop`` is set (``"stopped"``)."""
        mes = self._feed_orders() if self.twin is not None else asyncio.sleep(0)
        feeder = asyncio.create_task(mes, name="autofab-mes")
        try:
            while True:
                p = await self.poll()
                if on_progress is not None:
                    on_progress(p)
                if self.finished():
                    outcome = "done"
                    break
                if stop is not None and stop.is_set():
                    outcome = "stopped"
                    break
                if feeder.done() and feeder.exception() is not None:
                    raise feeder.exception()  # type: ignore[misc]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        stop.wait() if stop is not None else asyncio.sleep(POLL_S), POLL_S
                    )
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
        await self.poll()
        return outcome

    def _plant_report(self) -> dict[str, Any]:
        """A real plant's report: what its counters and the agents say. Energy, OEE and
        tardiness need the plant's own meters and due dates, so they are null here."""
        assert self.link is not None
        scheduler = self.last_stats.get("scheduler", {}).get("agents", {}).get("scheduler", {})
        return {
            "plant": self.config.name,
            "endpoint": self.link.endpoint,
            "hosting": self.settings.hosting,
            "actors": len(self.specs),
            "ray_nodes": len(self.nodes),
            "agents_ready_s": self.agents_ready_s,
            "plant_time_s": self.plant_time - self.link_start,
            "wall_s": time.monotonic() - self.t0,
            "parts_good": self.link.total("parts_good"),
            "parts_scrap": self.link.total("parts_scrap"),
            "makespan_s": None,
            "tardiness_s": None,
            "oee": None,
            "energy_kwh": None,
            "energy_cost": None,
            "peak_kw": None,
            "cap_violations": None,
            "safety": self.safety(),
            "breakdowns": self.link.total("breakdowns"),
            "maintenance": None,
            "operations_done": scheduler.get("operations_done"),
            "negotiation": self.last_stats.get("scheduler", {}).get("rounds", {}),
            "metrics": {"file_sd": str(self.file_sd or ""), "targets": self.metrics_targets},
        }

    def report(self) -> dict[str, Any]:
        """The run's report: the issue's keys, plus where each number comes from."""
        if self.twin is None:
            return self._plant_report()
        k = self.twin.model.kpis()
        scheduler = self.last_stats.get("scheduler", {}).get("agents", {}).get("scheduler", {})
        return {
            "plant": self.config.name,
            "seed": self.settings.seed,
            "speedup": self.settings.speedup,
            "hosting": self.settings.hosting,
            "actors": len(self.specs),
            "ray_nodes": len(self.nodes),
            "agents_ready_s": self.agents_ready_s,
            "plant_time_s": k["sim_time_s"],
            "wall_s": time.monotonic() - self.t0,
            "orders_submitted": len(self.acks),
            "parts_good": k["parts_good"],
            "parts_scrap": k["parts_scrap"],
            "makespan_s": k["makespan_s"],
            "tardiness_s": k["tardiness_s"],
            "oee": k["oee"],
            "energy_kwh": k["energy_kwh"],
            "energy_cost": k["energy_cost"],
            "peak_kw": k["peak_kw"],
            "cap_kw": k["cap_kw"],
            "cap_violations": k["cap_violations"],
            "safety": self.safety(),
            "breakdowns": k["breakdowns"],
            "maintenance": k["maintenance"],
            "operations_done": scheduler.get("operations_done"),
            "negotiation": self.last_stats.get("scheduler", {}).get("rounds", {}),
            "reannounced": scheduler.get("reannounced", {}),
            "plant_writes_accepted": self.twin.accepted_writes,
            "metrics": {"file_sd": str(self.file_sd or ""), "targets": self.metrics_targets},
            "watchdog_trips": self.twin.watchdog_trips,
        }


# --- the command ----------------------------------------------------------------------


def _progress_text(p: RunProgress) -> str:
    counts: dict[str, int] = {}
    for state in p.machines.values():
        counts[state] = counts.get(state, 0) + 1
    states = " ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    s = p.safety
    return (
        f"actors {p.actors_up}/{p.actors} | orders {p.orders_submitted}/{p.orders_total} "
        f"| done {p.jobs_done} | running {p.ops_in_progress} | {states} | power "
        f"{p.power_kw:.0f}/{p.cap_kw:.0f} kW | safety applied {s.get('applied', 0)} clamped "
        f"{s.get('clamped', 0)} rejected {s.get('rejected', 0)}"
    )


def print_report(report: Mapping[str, Any]) -> None:
    table = Table(title=f"autofab run: {report['plant']}", show_header=False)
    table.add_column("key")
    table.add_column("value", justify="right")
    oee = report["oee"]
    rows: Sequence[tuple[str, str]] = (
        ("agents ready", f"{report['agents_ready_s']:.1f} s"),
        ("plant time", _hm(report["plant_time_s"])),
        ("parts good / scrap", f"{report['parts_good']} / {report['parts_scrap']}"),
        ("makespan", _hm(report["makespan_s"])),
        ("tardiness", _hm(report["tardiness_s"])),
        (
            "OEE (A x P x Q)",
            f"{oee['oee']:.1%} = {oee['availability']:.1%} x {oee['performance']:.1%} x "
            f"{oee['quality']:.1%}",
        ),
        ("energy", f"{report['energy_kwh']:.1f} kWh, cost {report['energy_cost']:.2f}"),
        ("peak power", f"{report['peak_kw']:.1f} kW (cap {report['cap_kw']:.0f})"),
        ("cap violations", str(report["cap_violations"])),
        (
            "safety",
            "requests {requests}, applied {applied}, clamped {clamped}, rejected {rejected}".format(
                **report["safety"]
            ),
        ),
        ("breakdowns / maintenance", f"{report['breakdowns']} / {report['maintenance']}"),
    )
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


async def _run(
    config: PlantConfig, settings: RunSettings, live: bool
) -> tuple[str, dict[str, Any]]:
    interrupted = asyncio.Event()
    with _sigint_sets(interrupted):
        async with PlantRun(config, settings) as plant_run:
            console.print(
                f"[bold]{config.name}[/]: {len(plant_run.specs)} actors ready in "
                f"{plant_run.agents_ready_s:.1f} s; plant at {plant_run.endpoint_text}"
            )
            console.print(
                f"metrics: {len(plant_run.metrics_targets)} exporters listed in "
                f"{plant_run.file_sd} (Prometheus: configs/prometheus/prometheus.yml)",
                soft_wrap=True,
            )
            progress = Progress(
                TextColumn("[bold]plant time"),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[clock]} | {task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
                disable=not live,
            )
            with progress:
                task = progress.add_task(
                    config.name, total=settings.duration_s, clock="0:00", detail="starting"
                )

                def show(p: RunProgress) -> None:
                    progress.update(
                        task,
                        completed=p.plant_time,
                        clock=_hm(p.plant_time),
                        detail=_progress_text(p),
                    )

                outcome = await plant_run.run_until_done(interrupted, show)
            report = plant_run.report()
    return outcome, report


#: The KPIs ``--compare`` puts side by side: (report key, label, format).
COMPARE_KPIS: Final[tuple[tuple[str, str, str], ...]] = (
    ("parts_good", "parts good", "{:.1f}"),
    ("parts_scrap", "parts scrap", "{:.1f}"),
    ("makespan_s", "makespan h", "{:.2f}"),
    ("tardiness_s", "tardiness h", "{:.2f}"),
    ("oee", "OEE", "{:.1%}"),
    ("energy_kwh", "energy kWh", "{:.1f}"),
    ("energy_cost", "energy cost", "{:.2f}"),
    ("peak_kw", "peak kW", "{:.1f}"),
    ("cap_violations", "cap violations", "{:.1f}"),
    ("breakdowns", "breakdowns", "{:.1f}"),
)


def kpi_value(report: Mapping[str, Any], key: str) -> float:
    """One KPI of a report as a number (hours for times, the OEE product for ``oee``)."""
    value = report[key]
    if key == "oee":
        return float(value["oee"])
    if key.endswith("_s"):
        return float(value) / 3600.0
    return float(value)


def compare_table(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> Table:
    """Means over seeds of each KPI, one column per policy."""
    names = list(results)
    n = len(next(iter(results.values()))) if results else 0
    table = Table(title=f"autofab run --compare ({n} seeds, mean)")
    table.add_column("KPI")
    for name in names:
        table.add_column(name, justify="right")
    for key, label, fmt in COMPARE_KPIS:
        row = [label]
        for name in names:
            values = [kpi_value(r, key) for r in results[name]]
            row.append(fmt.format(sum(values) / len(values)) if values else "-")
        table.add_row(*row)
    return table


async def _compare(
    config: PlantConfig, base: RunSettings, policies: Sequence[str], seeds: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every policy on the same seeds (0..seeds-1), one run after another, on one Ray."""
    import ray

    from autofab.control.ray_tasks import init_local_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        if base.ray_address is None:
            init_local_ray(ray, logging_level=logging.WARNING)
        else:
            ray.init(address=base.ray_address, logging_level=logging.WARNING)
        started = True
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    try:
        for seed in range(seeds):
            for name in policies:
                settings = dataclasses.replace(
                    base, seed=seed, policy=None if name == "rules" else name
                )
                async with PlantRun(config, settings) as plant_run:
                    outcome = await plant_run.run_until_done()
                    report = plant_run.report()
                if outcome != "done":
                    raise RuntimeError(f"run {name} seed {seed} did not finish ({outcome})")
                results[name].append(report)
                console.print(
                    f"seed {seed} {name}: {report['parts_good']} good, OEE "
                    f"{report['oee']['oee']:.1%}, tardiness {_hm(report['tardiness_s'])}"
                )
    finally:
        if started:
            ray.shutdown()
    return results


def run(
    config: Annotated[
        str,
        typer.Argument(
            help="A plant YAML file, a shipped plant name such as 'demo', or a run file "
            "(plant_config plus the nats, plant and ray servers to use)."
        ),
    ] = "demo",
    duration: Annotated[
        str | None,
        typer.Option(
            "--duration",
            help="Simulated time to run, like 8h, 30m or 90s [default: the config's horizon].",
            show_default=False,
        ),
    ] = None,
    speedup: Annotated[
        float, typer.Option("--speedup", min=1e-3, help="Plant seconds per wall second.")
    ] = 120.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the orders and the plant.")] = 0,
    hosting: Annotated[
        str,
        typer.Option("--hosting", help="Machine agents per actor: per_line or per_agent."),
    ] = "per_line",
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Join this Ray cluster instead of a local Ray."),
    ] = None,
    nats_url: ServerUrlOption = None,
    user: ServerUserOption = None,
    password: ServerPasswordOption = None,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Learned bidding policy for the machine agents: a file, or 'default' "
            "(the shipped one) [default: the rule].",
        ),
    ] = None,
    report_path: Annotated[
        Path | None, typer.Option("--report", help="Write the final report as JSON here.")
    ] = None,
    cert_dir: Annotated[
        Path | None,
        typer.Option("--cert-dir", help="Where the plant's certificates live (made on first run)."),
    ] = None,
    nodemap: Annotated[
        Path | None,
        typer.Option(
            "--nodemap",
            help="Drive a real plant (any OPC UA server) through this node map instead of "
            "the twin; --cert-dir must hold the supervisor's login.",
            show_default=False,
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", help="The plant's OPC UA endpoint (overrides the map's)."),
    ] = None,
    kv_replicas: Annotated[
        int | None,
        typer.Option(
            "--kv-replicas",
            min=1,
            max=5,
            help="Replicas of the agent-state bucket (3 on a three-node NATS cluster) "
            "[default: the run file's, else 1].",
            show_default=False,
        ),
    ] = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Show the live view.")] = True,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Run these policies on the same seeds and print their KPIs side by side: "
            "'rules' and 'policy' (the --policy one, else the shipped default) or files.",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds 0..N-1 for --compare.")] = 3,
) -> None:
    """Run the whole loop: agents as Ray actors over NATS, the supervisor, the plant twin.

    With no argument it runs the demo plant on the embedded default: local Ray, an
    embedded nats-server with generated credentials, and the OPC UA plant twin, all
    secured. Ctrl-C stops everything cleanly and prints the report.
    """
    with user_errors():
        plant, run_file = load_run_source(config)
        if run_file is not None:  # the file's servers, where the flags name none
            if run_file.nats is not None and nats_url is None:
                nats_url, user = run_file.nats.url, user or run_file.nats.user
                kv_replicas = kv_replicas or run_file.nats.kv_replicas
            if run_file.plant is not None and nodemap is None:
                nodemap, endpoint = run_file.plant.nodemap, endpoint or run_file.plant.endpoint
                cert_dir = cert_dir or run_file.plant.cert_dir
            if run_file.ray is not None and ray_address is None:
                ray_address = run_file.ray.address
        settings = RunSettings(
            duration_s=parse_duration(duration) if duration else plant.horizon_seconds,
            speedup=speedup,
            seed=seed,
            hosting=hosting,  # type: ignore[arg-type]
            ray_address=ray_address,
            nats=None if nats_url is None else NatsEndpoint(nats_url, user, password),
            policy=None if policy == "rules" else policy,
            cert_dir=cert_dir,
            kv_replicas=kv_replicas or 1,
            nodemap=nodemap,
            endpoint=endpoint,
        )
        if nodemap is not None:
            from autofab.control.opcua.nodemap import load_nodemap

            if cert_dir is None:
                raise ValueError("--nodemap needs --cert-dir, the folder with supervisor.json")
            load_nodemap(nodemap)  # a clear error about the file before anything starts
        if settings.policy is not None:
            from autofab.agents.policies.bidding_policy import load_bidding_policy

            load_bidding_policy(policy)  # refuse a bad policy before anything starts
    check_server_options(plant.name, nats_url, user, password)
    _quiet_logging()
    if compare is not None:
        names = [c.strip() for c in compare.split(",") if c.strip()]
        with user_errors():
            if len(names) < 2:
                raise ValueError(f"--compare needs two policies or more, got {compare!r}")
            names = [(policy or "default") if n == "policy" else n for n in names]
            for name in names:
                if name != "rules":
                    from autofab.agents.policies.bidding_policy import load_bidding_policy

                    load_bidding_policy(name)
        try:
            results = asyncio.run(_compare(plant, settings, names, seeds))
        except (ConnectionError, NatsServerError, OSError, TimeoutError) as error:
            fail(f"could not start: {error}", code=EXIT_STARTUP)
        console.print(compare_table(results))
        if report_path is not None:
            with user_errors(f"cannot write the report {str(report_path)!r}"):
                report_path.parent.mkdir(parents=True, exist_ok=True)
                report_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        return
    try:
        outcome, report = asyncio.run(_run(plant, settings, live))
    except (ConnectionError, NatsServerError, OSError, TimeoutError) as error:
        fail(f"could not start: {error}", code=EXIT_STARTUP)
    except ValueError as error:  # a node map or login found wanting while starting
        fail(str(error))
    except Exception as error:  # Ray's own startup errors, named
        if type(error).__name__ in ("RayAddressError", "RaySystemError", "RayActorError"):
            fail(f"could not start Ray: {error}", code=EXIT_STARTUP)
        raise
    print_report(report)
    if report_path is not None:
        with user_errors(f"cannot write the report {str(report_path)!r}"):
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        console.print(f"wrote the report to {report_path}")
    if outcome == "stopped":
        err_console.print("stopped by Ctrl-C")
        raise typer.Exit(EXIT_INTERRUPTED)
