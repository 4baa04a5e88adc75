"""The OPC UA plant twin: the plant model served as an OPC UA server in accelerated time.

The supervisor should not know whether it drives a real plant or this one, so the twin
behaves like a PLC in front of machines: typed variables with engineering units, setpoints
that the controller checks itself, and a watchdog that makes the plant safe when its
supervisor goes quiet. It steps the same :class:`~autofab.envs.factory_model.FactoryModel`
as the Gymnasium environments, so a policy meets the physics it was trained on.

Address space (namespace ``urn:autofab:plant:<plant>``, string NodeIds ``<plant>.<var>`` and
``<plant>.<line>.<machine>.<var>``; :mod:`.nodemap` writes them to a file)::

    Objects/<plant>                      object
        power, tariff, plant_time        plant telemetry (W, EUR/kWh, s)
        watchdog_heartbeat               Int64, written by the supervisor
        watchdog_alarm                   Boolean, set while the watchdog has tripped
        <line>/                          folder per line
            <machine>                    object per machine
                state                    Int32: 0 idle, 1 running, 2 down, 3 maintenance
                speed, vibration, temperature, power        Double with EngineeringUnits
                ops_done, parts_good, parts_scrap, breakdowns   Int64 counters
                speed_setpoint           Double, writable, EURange = the machine's limits
                run                      Boolean, writable (cycle stop when false)
                maintenance_request      Boolean, writable
                start_job                Int64, writable (``dispatch="agents"`` only)
                load, run_seconds, renewals, job, op, last_job, last_op, last_defect
                                         the operation interface (nodemap.MACHINE_WORK_*)

Scan cycle. Every ``tick_s`` of wall time the twin advances plant time by ``speedup`` times
the elapsed wall time, dispatches idle running machines (oldest released job first, the
twin's local dispatcher until agents take over), starts requested maintenance on idle
machines, checks the watchdog and publishes telemetry.

Who decides what runs. With ``dispatch="local"`` (``autofab plant serve``) the twin
dispatches on its own, as above. With ``dispatch="agents"`` (``autofab run``) nothing starts
unless told: a ``start_job`` write of production order ``j`` (the ``j``-th job of the shift's
seeded order book, which the MES feed submits under the same number) makes the machine start
that job's next operation as soon as it is idle, ``run`` is true and the job can start there
(previous operation done, material in stock). ``run`` false clears a start not yet made. A
machine that breaks down hands its operation back (the job waits at that operation, ready for
any eligible machine), because the agents announce a broken machine's work again rather than
wait for the repair. ``last_job``/``last_op``/``last_defect`` tell what each machine finished
last; with the ``ops_done`` counter they are how the agents learn an operation is done.

Setpoint writes are checked before they are stored, like a PLC's range check: a speed
outside the machine's EURange is refused with ``BadOutOfRange`` (never clamped, so a writer
learns at once that it is wrong), a wrong type with ``BadTypeMismatch``, any write by anyone
but the supervisor with ``BadUserAccessDenied``, and a setpoint while the watchdog alarm is
active with ``BadInvalidState``. Accepted writes act on the model at once. ``run`` false is
a cycle stop: the running operation finishes and no new one starts. A
``maintenance_request`` waits until the machine is idle, starts maintenance, and is reset
to false by the twin.

Watchdog. It is armed by the first heartbeat write (so a twin with no supervisor runs on
its own), and a heartbeat counts only when its value changes (a stuck counter is a dead
supervisor). When no new heartbeat arrives for ``watchdog_timeout_s`` of wall time the
twin sets ``watchdog_alarm`` and drops to its safe state: ``stop`` (every ``run`` false) or
``safe_speed`` (every speed at its minimum). The safe state is latched: the next new
heartbeat clears the alarm, but setpoints stay where the safe state put them, and the
supervisor must send them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService

from autofab.control.opcua.nodemap import (
    MACHINE_VARIABLES,
    MACHINE_WORK_VARIABLES,
    PLANT_VARIABLES,
    MachineNodes,
    NodeMap,
)
from autofab.control.opcua.security import (
    SECURE_POLICIES,
    SUPERVISOR_USER,
    TwinPermissionRuleset,
    TwinUserManager,
    default_cert_dir,
    ensure_server_files,
)
from autofab.envs.factory_model import FactoryModel, MachineStatus
from autofab.envs.plant import PlantConfig

__all__ = ["LOOPBACK", "PlantTwin", "TwinSettings", "endpoint_path", "free_port"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_UNITS_NS = "http://www.opcfoundation.org/UA/units/un/cefact"
_PORT_TRIES = 5
#: Who asyncua's own writes run as (the server's internal session).
_SERVER_USER = User(role=UserRole.Admin)
#: Not any value a node holds.
_UNSET: Any = object()
_I64, _BOOL = ua.VariantType.Int64, ua.VariantType.Boolean
#: Machine variables that are not Double.
_MACHINE_TYPES: dict[str, ua.VariantType] = {
    "state": ua.VariantType.Int32,
    "run": _BOOL,
    "maintenance_request": _BOOL,
    "last_defect": _BOOL,
    **{
        v: _I64
        for v in (
            "ops_done",
            "parts_good",
            "parts_scrap",
            "breakdowns",
            "renewals",
            "job",
            "op",
            "last_job",
            "last_op",
            "start_job",
        )
    },
}
_WRITABLE = frozenset({"speed_setpoint", "run", "maintenance_request", "start_job"})


def _unece(code: str) -> int:
    """The UnitId of a UN/CEFACT common code (OPC 10000-8, 5.6.3)."""
    out = 0
    for ch in code.ljust(3)[:3]:
        out = (out << 8) | ord(ch)
    return out


#: (UN/CEFACT code or None, display name, description) per variable name.
_UNITS: dict[str, tuple[str | None, str, str]] = {
    "speed": ("C62", "x rated", "multiple of the machine's rated speed"),
    "speed_setpoint": ("C62", "x rated", "multiple of the machine's rated speed"),
    "vibration": ("C16", "mm/s", "vibration velocity RMS, millimetre per second"),
    "temperature": ("CEL", "°C", "degree Celsius"),
    "power": ("WTT", "W", "watt"),
    "plant_time": ("SEC", "s", "seconds of plant time since the shift started"),
    "tariff": (None, "currency/kWh", "energy price per kilowatt hour"),
}


def endpoint_path(plant: str) -> str:
    return f"/autofab/{plant}"


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago; :meth:`PlantTwin.start` retries if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class TwinSettings:
    """How the twin serves: where, how fast, how safe. Checked on creation; errors name
    the setting, the value and what was expected."""

    port: int = 0
    speedup: float = 60.0
    tick_s: float = 0.1
    seed: int | None = 0
    cert_dir: Path | None = None
    nodemap_path: Path | None = None
    insecure_dev: bool = False
    watchdog_timeout_s: float = 5.0
    safe_state: Literal["stop", "safe_speed"] = "stop"
    dispatch: Literal["local", "agents"] = "local"
    #: Wall seconds between updates of the noisy sensor readings (vibration, temperature,
    #: power); states, counters and operations are published on every scan they change.
    sensor_period_s: float = 0.5
    #: Hold plant time at 0 until :meth:`PlantTwin.resume` (``autofab run`` starts the
    #: clock once every agent is ready, so start-up does not eat the shift).
    start_paused: bool = False
    host: str = field(default=LOOPBACK)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0 (a free port) to 65535, got {self.port!r}")
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"speedup: expected a positive number, got {self.speedup!r}")
        if not (math.isfinite(self.tick_s) and 0 < self.tick_s <= 10):
            raise ValueError(f"tick_s: expected seconds in (0, 10], got {self.tick_s!r}")
        if not (math.isfinite(self.watchdog_timeout_s) and self.watchdog_timeout_s >= 0):
            raise ValueError(
                "watchdog_timeout_s: expected seconds >= 0 (0 turns the watchdog off), got "
                f"{self.watchdog_timeout_s!r}"
            )
        if self.safe_state not in ("stop", "safe_speed"):
            raise ValueError(
                f"safe_state: expected 'stop' or 'safe_speed', got {self.safe_state!r}"
            )
        if not (math.isfinite(self.sensor_period_s) and self.sensor_period_s >= 0):
            raise ValueError(
                f"sensor_period_s: expected seconds >= 0, got {self.sensor_period_s!r}"
            )
        if self.dispatch not in ("local", "agents"):
            raise ValueError(f"dispatch: expected 'local' or 'agents', got {self.dispatch!r}")
        if self.host not in (LOOPBACK, "localhost"):
            raise ValueError(f"host: the twin serves on loopback only, got {self.host!r}")


class _CheckedAttributeService(AttributeService):
    """asyncua's attribute service with the twin's PLC checks in front of client writes.

    Writes from the server's own session (admin) pass unchecked: that is the twin
    publishing telemetry. Every other write must come from the supervisor and pass
    :meth:`PlantTwin._check_write`; accepted writes are applied to the model afterwards.
    """

    def __init__(self, aspace: Any, twin: PlantTwin) -> None:
        super().__init__(aspace)
        self._twin = twin

    async def write(
        self, params: ua.WriteParameters, user: User = _SERVER_USER
    ) -> list[ua.StatusCode]:
        if user.role == UserRole.Admin:
            return await super().write(params, user=user)
        results: list[ua.StatusCode | None] = []
        passed: list[ua.WriteValue] = []
        for wv in params.NodesToWrite:
            code = self._twin._check_write(wv, user)
            results.append(None if code is None else ua.StatusCode(code))
            if code is None:
                passed.append(wv)
        done = await super().write(ua.WriteParameters(NodesToWrite=passed), user=user)
        it = iter(zip(passed, done, strict=True))
        out: list[ua.StatusCode] = []
        for res in results:
            if res is not None:
                out.append(res)
                continue
            wv, status = next(it)
            if status.is_good():
                self._twin._apply_write(wv)
            out.append(status)
        return out


class PlantTwin:
    """The plant model behind an OPC UA server; use as ``async with PlantTwin(...) as twin``.

    After :meth:`start`, :attr:`endpoint` is the URL to connect to and :attr:`nodemap` (also
    written to :attr:`nodemap_path`) says where each variable is. :attr:`model` is the live
    model; touch it only from the event loop that runs the twin.
    """

    def __init__(self, config: PlantConfig, settings: TwinSettings | None = None) -> None:
        self.config = config
        self.settings = settings or TwinSettings()
        self.plant = config.name
        self.namespace_uri = f"urn:autofab:plant:{self.plant}"
        self.cert_dir = Path(self.settings.cert_dir or default_cert_dir(self.plant)).expanduser()
        self.nodemap_path = Path(self.settings.nodemap_path or self.cert_dir / "nodemap.json")
        self.model = FactoryModel.from_config(config, seed=self.settings.seed)
        n = self.model.plant.n_machines
        self.run = np.ones(n, dtype=bool)
        self.maintenance_request = np.zeros(n, dtype=bool)
        #: ``dispatch="agents"``: the production order each machine was told to start next
        #: (-1: none), and what it finished last (job, operation index, defective).
        self.pending_job = np.full(n, -1, dtype=np.int64)
        self.last_job = np.full(n, -1, dtype=np.int64)
        self.last_op = np.full(n, -1, dtype=np.int64)
        self.last_defect = np.zeros(n, dtype=bool)
        self._attempts_seen = 0
        self.aborted = 0
        self.paused = self.settings.start_paused
        #: Setpoint writes the twin accepted from a client (heartbeats not counted).
        self.accepted_writes = 0
        #: What the address space holds, as last written, so a scan writes only changes.
        self._published: dict[str, Any] = {}
        self._mirror: dict[str, Any] = {}
        self._sensors_at = -math.inf
        self._sensors: dict[str, Any] = {}
        self.watchdog_alarm = False
        self.watchdog_trips = 0
        self._last_beat: int | None = None
        self._last_beat_wall: float | None = None
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._nodes: dict[str, Node] = {}
        self._writable: dict[str, tuple[int, str]] = {}
        self.endpoint = ""
        self.nodemap: NodeMap | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Generate or load credentials, build the address space, listen, write the node map
        and start the scan cycle. Returns when clients can connect."""
        files = ensure_server_files(self.cert_dir, self.namespace_uri)
        tries = 1 if self.settings.port else _PORT_TRIES
        for attempt in range(tries):
            port = self.settings.port or free_port(self.settings.host)
            server = await self._build_server(port, files.certificate, files.private_key)
            server.iserver.set_user_manager(TwinUserManager(files.username, files.password))
            try:
                await server.start()
            except OSError as exc:
                if attempt + 1 == tries:
                    raise OSError(
                        exc.errno, f"cannot listen on {self.settings.host}:{port}: {exc.strerror}"
                    ) from None
                continue
            break
        self._server = server
        self.endpoint = f"opc.tcp://{LOOPBACK}:{port}{endpoint_path(self.plant)}"
        await self._publish()
        self.nodemap = self._make_nodemap()
        self.nodemap.write(self.nodemap_path)
        self._task = asyncio.create_task(self._scan_loop(), name=f"twin-{self.plant}")

    async def stop(self) -> None:
        """Stop the scan cycle and the server (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    async def serve_forever(self) -> None:
        """Wait until the scan cycle ends (it ends only by cancellation or an error)."""
        if self._task is None:
            raise RuntimeError("PlantTwin.serve_forever() before start()")
        await self._task

    # ------------------------------------------------------------------ address space

    async def _build_server(self, port: int, cert: Path, key: Path) -> Server:
        server = Server()
        await server.init()
        server.iserver.attribute_service = _CheckedAttributeService(server.iserver.aspace, self)
        server.set_endpoint(f"opc.tcp://{LOOPBACK}:{port}{endpoint_path(self.plant)}")
        server.set_server_name(f"autofab plant twin ({self.plant})")
        await server.set_application_uri(self.namespace_uri)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        policies = list(SECURE_POLICIES)
        if self.settings.insecure_dev:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies, permission_ruleset=TwinPermissionRuleset())
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
        idx = await server.register_namespace(self.namespace_uri)
        self._nodes.clear()
        self._writable.clear()
        await self._build_address_space(server, idx)
        return server

    async def _build_address_space(self, server: Server, idx: int) -> None:
        p = self.model.plant
        root = await server.nodes.objects.add_object(
            ua.NodeId(self.plant, idx), ua.QualifiedName(self.plant, idx)
        )

        async def var(
            parent: Node,
            key: str,
            name: str,
            vtype: ua.VariantType,
            writable: bool = False,
            eurange: tuple[float, float] | None = None,
        ) -> None:
            default: Any = {
                ua.VariantType.Double: 0.0,
                ua.VariantType.Boolean: False,
            }.get(vtype, 0)
            node = await parent.add_variable(
                ua.NodeId(key, idx), ua.QualifiedName(name, idx), ua.Variant(default, vtype)
            )
            if name in _UNITS:
                code, display, desc = _UNITS[name]
                eu = ua.EUInformation(
                    NamespaceUri=_UNITS_NS,
                    UnitId=_unece(code) if code else -1,
                    DisplayName=ua.LocalizedText(display),
                    Description=ua.LocalizedText(desc),
                )
                await node.add_property(
                    ua.NodeId(f"{key}.EngineeringUnits", idx),
                    ua.QualifiedName("EngineeringUnits", 0),
                    ua.Variant(eu, ua.VariantType.ExtensionObject),
                    datatype=ua.NodeId(ua.ObjectIds.EUInformation),
                )
            if eurange is not None:
                await node.add_property(
                    ua.NodeId(f"{key}.EURange", idx),
                    ua.QualifiedName("EURange", 0),
                    ua.Variant(
                        ua.Range(Low=eurange[0], High=eurange[1]), ua.VariantType.ExtensionObject
                    ),
                    datatype=ua.NodeId(ua.ObjectIds.Range),
                )
            if writable:
                await node.set_writable()
            self._nodes[key] = node

        dbl, i64, boolean = ua.VariantType.Double, ua.VariantType.Int64, ua.VariantType.Boolean
        for name, vtype in zip(PLANT_VARIABLES, (dbl, dbl, dbl, i64, boolean), strict=True):
            writable = name == "watchdog_heartbeat"
            await var(root, f"{self.plant}.{name}", name, vtype, writable)
            if writable:
                self._writable[f"{self.plant}.{name}"] = (-1, name)
        for line in self.config.lines:
            folder = await root.add_folder(
                ua.NodeId(f"{self.plant}.{line.name}", idx), ua.QualifiedName(line.name, idx)
            )
            for entry in line.machines:
                for machine in entry.names():
                    m = p.machine_names.index(machine)
                    base = f"{self.plant}.{line.name}.{machine}"
                    obj = await folder.add_object(
                        ua.NodeId(base, idx), ua.QualifiedName(machine, idx)
                    )
                    for vname in MACHINE_VARIABLES + MACHINE_WORK_VARIABLES:
                        vtype = _MACHINE_TYPES.get(vname, dbl)
                        writable = vname in _WRITABLE
                        rng = (
                            (float(p.speed_min[m]), float(p.speed_max[m]))
                            if vname == "speed_setpoint"
                            else None
                        )
                        await var(obj, f"{base}.{vname}", vname, vtype, writable, rng)
                        if writable:
                            self._writable[f"{base}.{vname}"] = (m, vname)

    def _make_nodemap(self) -> NodeMap:
        assert self._server is not None
        idx = next(iter(self._nodes.values())).nodeid.NamespaceIndex
        plant_vars = {v: f"ns={idx};s={self.plant}.{v}" for v in PLANT_VARIABLES}
        machines: dict[str, MachineNodes] = {}
        for line in self.config.lines:
            for entry in line.machines:
                for machine in entry.names():
                    base = f"{self.plant}.{line.name}.{machine}"
                    nodes = {
                        v: f"ns={idx};s={base}.{v}"
                        for v in MACHINE_VARIABLES + MACHINE_WORK_VARIABLES
                    }
                    machines[machine] = MachineNodes(line.name, nodes)
        return NodeMap(self.plant, self.endpoint, self.namespace_uri, plant_vars, machines)

    # ------------------------------------------------------------------ writes

    def _check_write(self, wv: ua.WriteValue, user: User) -> int | None:
        """A Bad status code for a client write the twin refuses, or ``None`` to accept."""
        if user.role != UserRole.User or user.name != SUPERVISOR_USER:
            return ua.StatusCodes.BadUserAccessDenied
        key = wv.NodeId.Identifier
        target = self._writable.get(key) if isinstance(key, str) else None
        if target is None or wv.AttributeId != ua.AttributeIds.Value:
            return ua.StatusCodes.BadNotWritable
        m, name = target
        value = wv.Value.Value.Value if wv.Value and wv.Value.Value else None
        if name == "watchdog_heartbeat":
            ok = isinstance(value, int) and not isinstance(value, bool)
            return None if ok else ua.StatusCodes.BadTypeMismatch
        if self.watchdog_alarm:
            return ua.StatusCodes.BadInvalidState
        if name == "start_job":
            if isinstance(value, bool) or not isinstance(value, int):
                return ua.StatusCodes.BadTypeMismatch
            if self.settings.dispatch != "agents":
                return ua.StatusCodes.BadNotSupported
            if not 0 <= value < self.model.instance.n_jobs:
                return ua.StatusCodes.BadOutOfRange
            return None
        if name == "speed_setpoint":
            if isinstance(value, bool) or not isinstance(value, int | float):
                return ua.StatusCodes.BadTypeMismatch
            p = self.model.plant
            if not (math.isfinite(value) and p.speed_min[m] <= value <= p.speed_max[m]):
                return ua.StatusCodes.BadOutOfRange
            return None
        return None if isinstance(value, bool) else ua.StatusCodes.BadTypeMismatch

    def _apply_write(self, wv: ua.WriteValue) -> None:
        """Act on an accepted, stored write at once (the scan cycle publishes the result)."""
        m, name = self._writable[wv.NodeId.Identifier]
        value = wv.Value.Value.Value
        if name in ("speed_setpoint", "run", "maintenance_request"):
            # The node now holds what the client wrote: the mirror knows it.
            self._mirror[wv.NodeId.Identifier] = (
                float(value) if name == "speed_setpoint" else bool(value)
            )
        if name != "watchdog_heartbeat":
            self.accepted_writes += 1
        if name == "watchdog_heartbeat":
            self._heartbeat(int(value))
        elif name == "speed_setpoint":
            self.model.set_speed(m, float(value))
        elif name == "run":
            self.run[m] = bool(value)
            if not value:
                self.pending_job[m] = -1
        elif name == "start_job":
            self.pending_job[m] = int(value)
        else:
            self.maintenance_request[m] = bool(value)

    def _heartbeat(self, value: int) -> None:
        if value == self._last_beat:
            return
        self._last_beat = value
        self._last_beat_wall = time.monotonic()
        if self.watchdog_alarm:
            log.warning("plant %s: heartbeat resumed, watchdog alarm cleared", self.plant)
            self.watchdog_alarm = False

    # ------------------------------------------------------------------ scan cycle

    def _watchdog(self, now: float) -> bool:
        """Trip when armed and stale; returns whether the safe state was just applied."""
        timeout = self.settings.watchdog_timeout_s
        if timeout <= 0 or self._last_beat_wall is None or self.watchdog_alarm:
            return False
        if now - self._last_beat_wall <= timeout:
            return False
        self.watchdog_alarm = True
        self.watchdog_trips += 1
        log.warning(
            "plant %s: no heartbeat for %.1f s, safe state %s",
            self.plant,
            timeout,
            self.settings.safe_state,
        )
        if self.settings.safe_state == "stop":
            self.run[:] = False
        else:
            for m in range(self.model.plant.n_machines):
                self.model.set_speed(m, float(self.model.plant.speed_min[m]))
        return True

    def _dispatch(self) -> None:
        model = self.model
        for m in np.flatnonzero(self.maintenance_request & (model.status == MachineStatus.IDLE)):
            model.start_maintenance(int(m))
            self.maintenance_request[m] = False
        if self.settings.dispatch == "agents":
            self._start_requested()
            return
        for m in model.needs_decision():
            if not self.run[m] or self.maintenance_request[m]:
                continue
            jobs = model.candidates(int(m))
            model.decide(int(m), int(jobs[0]) if len(jobs) else None)

    def _start_requested(self) -> None:
        """Start each requested operation whose machine is idle and running, once the job
        can start there (its previous operation done, its material in stock)."""
        model = self.model
        idle = model.status == MachineStatus.IDLE
        for m in np.flatnonzero((self.pending_job >= 0) & idle & self.run):
            job = int(self.pending_job[m])
            if self.maintenance_request[m] or job not in model.candidates(int(m)):
                continue
            model.decide(int(m), job)
            self.pending_job[m] = -1

    def _after_step(self) -> None:
        """Record what each machine finished last, and (agents dispatching) hand the
        operation of a broken-down machine back, for the agents to place elsewhere."""
        model = self.model
        for attempt in model.attempts[self._attempts_seen :]:
            m = int(attempt["machine"])
            self.last_job[m] = int(attempt["job"])
            self.last_op[m] = int(attempt["index"])
            self.last_defect[m] = bool(attempt["defective"])
        self._attempts_seen = len(model.attempts)
        if self.settings.dispatch == "agents":
            for m in np.flatnonzero(model.status == MachineStatus.DOWN):
                if model.abort_operation(int(m)) is not None:
                    self.aborted += 1

    def step(self, wall_dt: float) -> None:
        """One scan: advance plant time by ``speedup * wall_dt`` and dispatch. Public so
        tests and tools can step the twin deterministically."""
        self._dispatch()
        self.model.run_until(self.model.now + self.settings.speedup * wall_dt)
        self._after_step()
        self._dispatch()

    async def _scan_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.tick_s)
            now = time.monotonic()
            self._watchdog(now)
            if not self.paused:
                self.step(now - last)
            last = now
            await self._publish()

    def resume(self) -> float:
        """Start plant time (a twin made with ``start_paused``); returns the plant time."""
        self.paused = False
        return self.model.now

    async def _publish(self) -> None:
        """Write the model's state into the address space (as the server, unchecked)."""
        model, p = self.model, self.model.plant
        wall = time.monotonic()
        # Noisy sensor readings change on every scan; they go out every sensor_period_s.
        fresh = wall - self._sensors_at >= self.settings.sensor_period_s
        if fresh:
            self._sensors_at = wall
            self._sensors = model.sensors()
        sensors = self._sensors
        running = model.status == MachineStatus.RUNNING
        op_job, op_index = self.model.instance.op_job, self.model.instance.op_index
        values: list[tuple[str, Any, ua.VariantType]] = [
            (f"{self.plant}.power", model.plant_power_w(), ua.VariantType.Double),
            (f"{self.plant}.tariff", model.tariff_now(), ua.VariantType.Double),
            (f"{self.plant}.plant_time", model.now, ua.VariantType.Double),
            (f"{self.plant}.watchdog_alarm", self.watchdog_alarm, ua.VariantType.Boolean),
        ]
        dbl, i64 = ua.VariantType.Double, ua.VariantType.Int64
        mirrors: list[tuple[str, int]] = []
        for line in self.config.lines:
            for entry in line.machines:
                for machine in entry.names():
                    m = p.machine_names.index(machine)
                    b = f"{self.plant}.{line.name}.{machine}"
                    good, bad = int(model.parts_good[m]), int(model.parts_defective[m])
                    op = max(int(model.machine_op[m]), 0)
                    values += [
                        (f"{b}.state", int(model.status[m]), ua.VariantType.Int32),
                        (f"{b}.speed", float(model.speed[m]) if running[m] else 0.0, dbl),
                        (f"{b}.vibration", float(sensors["vibration_mm_s"][m]), dbl),
                        (f"{b}.temperature", float(sensors["temperature_c"][m]), dbl),
                        (f"{b}.power", float(sensors["power_w"][m]), dbl),
                        (f"{b}.ops_done", good + bad, i64),
                        (f"{b}.parts_good", good, i64),
                        (f"{b}.parts_scrap", bad, i64),
                        (f"{b}.breakdowns", int(model.breakdowns[m]), i64),
                        (f"{b}.load", float(model.load[m]) if running[m] else 0.0, dbl),
                        (f"{b}.run_seconds", float(model.run_s[m]), dbl),
                        (
                            f"{b}.renewals",
                            int(model.breakdowns[m] + model.maintenances[m]),
                            i64,
                        ),
                        (f"{b}.job", int(op_job[op]) if running[m] else -1, i64),
                        (f"{b}.op", int(op_index[op]) if running[m] else -1, i64),
                        (f"{b}.last_job", int(self.last_job[m]), i64),
                        (f"{b}.last_op", int(self.last_op[m]), i64),
                        (f"{b}.last_defect", bool(self.last_defect[m]), ua.VariantType.Boolean),
                    ]
                    mirrors.append((b, m))
        stamp = datetime.now(UTC)
        # Setpoint mirrors first: a client's write sets the model and the node together, so
        # a node only needs writing when the twin itself changed the value (safe state,
        # finished maintenance). They go before the telemetry, so a reader that sees the
        # watchdog alarm also sees the safe state it caused. Each value is read from the
        # model right before its own write, so a write that arrived during this scan is not
        # undone.
        for b, m in mirrors:
            for name, current, vtype in (
                ("speed_setpoint", lambda m=m: float(model.speed[m]), dbl),
                ("run", lambda m=m: bool(self.run[m]), ua.VariantType.Boolean),
                (
                    "maintenance_request",
                    lambda m=m: bool(self.maintenance_request[m]),
                    ua.VariantType.Boolean,
                ),
            ):
                key = f"{b}.{name}"
                value = current()
                if self._mirror.get(key, _UNSET) != value:
                    self._mirror[key] = value
                    await self._set(key, ua.Variant(value, vtype), stamp)
        published = self._published
        for key, value, vtype in values:
            if published.get(key, _UNSET) == value:
                continue  # unchanged: no write, no data-change notification
            published[key] = value
            await self._set(key, ua.Variant(value, vtype), stamp)

    async def _set(self, key: str, variant: ua.Variant, stamp: datetime) -> None:
        """Store a value as the server (no client checks), with its timestamps."""
        assert self._server is not None
        value = ua.DataValue(variant, SourceTimestamp=stamp, ServerTimestamp=stamp)
        await self._server.write_attribute_value(self._nodes[key].nodeid, value)
