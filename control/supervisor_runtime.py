"""The safety supervisor at run time: NATS in, checks, batched OPC UA writes out, audit.

:mod:`autofab.control.supervisor` decides; this module does the I/O around it, and is the
only component that holds the plant's write credentials (:mod:`.opcua.writer`).

Intake and batching
-------------------
Setpoint requests arrive on ``Subjects(plant).setpoint_request``. A request whose
``Autofab-Expires`` header has passed, or that does not decode, is rejected and audited at
once and never queued. The rest go to a queue; the batch loop takes everything queued (up to
``batch_max``), waits at most ``batch_window_s`` for more (0 by default: a lone request is
written at once, and requests that arrive while a write is in flight form the next batch,
as in a database's group commit), and runs
:func:`~autofab.control.supervisor.decide_batch` on them in arrival order, so one OPC UA
Write carries a burst of requests and the power cap sees them together.

Deciding and writing are two tasks, a two-stage pipeline: while the write loop has one
batch on the wire, the batch loop decides the next one, and then waits until the write loop
has taken it before it decides another (so a burst is written batch by batch instead of
the newest value superseding everything queued behind one slow write). Only while the
plant is unreachable does the batch loop keep deciding, each newer value superseding the
pending one. Writes never overlap: one ``write_values`` call at a time, in decision order.
The intake pauses after every ``batch_max`` requests it queues (nats-py hands it all it
holds before yielding), so the first batch of a burst is written while the rest is decoded.

Latest value only, never stale
------------------------------
What passes the checks goes into ``pending``, keyed by (machine, variable), holding only the
newest value with its expiry: a newer decision for the same variable *supersedes* the
older (audited as such), so nothing queues up. A flush writes every pending value still
inside its TTL in one ``write_values`` call, then reads back, in one ``read_values`` call,
every variable written since the last read-back, and audits each value with its write
status and read-back (``mismatch`` when they differ, or when the write was not Good).

The read-back is coalesced: the write loop reads back once no new batch has come for
``readback_idle_s`` (5 ms), or once the oldest value not read back has waited
``readback_max_delay_s`` (0.25 s). So a burst of batches costs one read per 0.25 s instead
of one per write (on the twin a read costs the plant half as much as a write of the same
size, so reading after every write would cap a burst at two thirds of the plant's write
rate), and a request that follows another closely is not kept waiting behind the read-back
of the one before. A lone request is read back 5 ms after its write. A value
written again before its read-back is audited without one (``read_back`` null,
``mismatch`` only if its write was not Good): the plant no longer holds it, and the later
record carries the read-back. So is a value whose read-back failed because the link was
lost. While the OPC UA link is down the flush waits; when it comes back the supervisor
first reads the plant's speeds and run switches into its state (the plant may have gone to
its safe state, or been restarted), then writes only pending values that are still valid.
Values that expired meanwhile are audited as ``expired_unwritten`` and never written. An
emergency stop's writes have no expiry: they are written whenever the plant is reachable.

Heartbeat and link
------------------
Every ``heartbeat_interval_s`` (0.5 s; the twin's watchdog default is 5 s) the supervisor
writes an incrementing ``watchdog_heartbeat`` (starting from the wall clock in
milliseconds, so a restarted supervisor never repeats its predecessor's last value) and
reads every machine's ``state`` into its interlocks (:func:`observe_status`), 32 machines
a read, so a setpoint write waits behind one short read at most. If it finds
the plant's ``watchdog_alarm`` set before its beat (the heartbeat had stalled), it reads
the plant's latched safe setpoints back into its state, as after a reconnect. This also
probes the link: any exception from the writer marks it lost, and the link loop reconnects
with exponential backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``).

Audit
-----
Every decision becomes an :class:`AuditRecord` on the JetStream stream
:func:`audit_stream_name` (``AUTOFAB_<PLANT>_AUDIT``), subject
``autofab.<plant>.audit.setpoint`` for requests and ``...audit.operator`` for operator
commands. Records travel in :class:`AuditBatch` messages: everything audited since the
last publish, in decision order, at most 128 records (and 64 KiB) a message::

    {"schema": 1, "type": "supervisor_audit", "kind": "setpoint",
     "records": [{"kind": "setpoint", "request_id": "r1", "machine": "mill-1",
                  "variable": "speed_setpoint", "origin": "agent-1", "requested": 0.9,
                  "outcome": "applied", "value": 0.9, "reason": "ok",
                  "detail": "speed_setpoint = 0.9", "decided_at": 1764000000.0,
                  "write_status": "written", "read_back": 0.9, "mismatch": false}, ...]}

Read one with ``decode(subject, data, AuditBatch)``. Batches are published by their own
task, each awaiting its JetStream acknowledgement, so a slow or absent NATS never delays a
plant write; every record of a batch that cannot be stored is counted
(``stats.audit_failed``) and logged. The last records are also kept in memory
(:attr:`SupervisorRuntime.audit_log`), and :meth:`SupervisorRuntime.wait_audit_stored`
waits until everything audited so far has been acknowledged or counted as failed.

Operator commands and their authentication
-------------------------------------------
Operators send an :class:`OperatorCommand` by NATS request/reply on
:func:`operator_subject` (``autofab.<plant>.supervisor.command``): hold or release a
machine (manual override), engage or release the emergency stop. NATS credentials alone
are not enough, because every agent shares the bus: each command carries the supervisor's
operator token, compared in constant time. The token is configured, or generated once per
plant into a file readable only by this user (:func:`ensure_operator_token`), which
``autofab supervisor`` reads; whoever can read that file can stop the plant. A command
whose request deadline (``Autofab-Expires``) has passed is ignored, so a command buffered
during a NATS reconnect is not applied after its sender gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, Self

import nats.errors
import nats.js.errors
from asyncua import ua
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import Field, ValidationError

from autofab.agents.protocol import (
    MessageBase,
    ProtocolError,
    SetpointRequest,
    Subjects,
    Text,
    Token,
    decode,
    encode,
)
from autofab.control.bus import EXPIRES_HEADER, Bus, BusSettings
from autofab.control.natsd import NatsEndpoint
from autofab.control.opcua.nodemap import NodeMap
from autofab.control.opcua.writer import PlantCredentials, PlantWriter
from autofab.control.supervisor import (
    STATUS_CODES,
    Applied,
    Decision,
    SetpointValue,
    SupervisorLimits,
    SupervisorState,
    decide_batch,
    engage_estop,
    hold_override,
    initial_state,
    observe_status,
    release_estop,
    release_override,
)

__all__ = [
    "AuditBatch",
    "AuditRecord",
    "OperatorCommand",
    "OperatorReply",
    "SupervisorRuntime",
    "SupervisorSettings",
    "SupervisorStats",
    "audit_stream_name",
    "audit_subject",
    "ensure_operator_token",
    "operator_subject",
    "operator_token_file",
    "read_operator_token",
]

log = logging.getLogger(__name__)

OperatorAction = Literal["override_hold", "override_release", "estop_engage", "estop_release"]
#: What became of an applied or clamped value on its way to the plant.
WriteStatus = Literal["written", "superseded", "expired_unwritten"]
_QUEUE_MAX: Final = 10_000
#: Most audit records in one JetStream message (about 40 KiB of typical records; a batch
#: over the protocol's 64 KiB limit is split further).
_AUDIT_CHUNK: Final = 128
#: Machines whose ``state`` one heartbeat read asks for.
_STATUS_READ_CHUNK: Final = 32


# --- names ------------------------------------------------------------------------------


def operator_subject(plant: str) -> str:
    """Where operator commands go (request/reply): ``autofab.<plant>.supervisor.command``."""
    return f"{Subjects(plant).prefix}.supervisor.command"


def audit_subject(plant: str, kind: Literal["setpoint", "operator"]) -> str:
    """``autofab.<plant>.audit.setpoint`` or ``...audit.operator``."""
    return f"{Subjects(plant).prefix}.audit.{kind}"


def audit_stream_name(plant: str) -> str:
    """The JetStream stream of a plant's audit trail: ``AUTOFAB_<PLANT>_AUDIT`` (characters
    a stream name cannot hold become ``_``)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in plant.upper())
    return f"AUTOFAB_{safe}_AUDIT"


def operator_token_file(plant: str) -> Path:
    """Where the plant's generated operator token lives, beside the runtime files."""
    from autofab.control.negotiate_cmd import runtime_dir

    return runtime_dir() / f"{plant}.operator-token"


def ensure_operator_token(plant: str) -> str:
    """The plant's operator token, generated (mode 0600) on first use."""
    path = operator_token_file(plant)
    with contextlib.suppress(FileNotFoundError):
        return read_operator_token(plant)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(token + "\n")
    return token


def read_operator_token(plant: str) -> str:
    """The plant's operator token; FileNotFoundError if none was generated, ValueError if
    the file is readable by others (it may have leaked)."""
    path = operator_token_file(plant)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path} is readable by other users (mode {mode:o}); expected 0600")
    return path.read_text(encoding="utf-8").strip()


# --- messages -----------------------------------------------------------------------------


class OperatorCommand(MessageBase):
    """An operator's command to the supervisor. ``machine`` is needed for the override
    actions; ``token`` proves the sender may command the plant."""

    type: Literal["operator_command"] = "operator_command"
    request_id: Token
    action: OperatorAction
    machine: Token | None = None
    operator: Token = "operator"
    token: Text


class OperatorReply(MessageBase):
    """The supervisor's answer: whether the command was applied, and the state after it."""

    type: Literal["operator_reply"] = "operator_reply"
    request_id: str
    ok: bool
    detail: Text
    estop: bool
    overrides: dict[str, str]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One decision of the supervisor, as kept in memory and stored (in an
    :class:`AuditBatch`) on the audit stream.

    For a setpoint: the request, the outcome and reason of the checks, the value written
    (``None`` when rejected), the OPC UA write status (``written``, the plant's refusal such
    as ``BadOutOfRange``, ``superseded`` or ``expired_unwritten``) and the read-back
    (``None`` when the value was not read back; the module docstring says when). For an
    operator command: ``variable`` is the action and ``origin`` the operator.

    A dataclass, not a pydantic model: one is made per request on the hot path, and
    :class:`AuditBatch` validates and serialises them in pydantic-core.
    """

    kind: Literal["setpoint", "operator"]
    request_id: str
    machine: str | None
    variable: str | None
    origin: str
    requested: float | bool | str | None
    outcome: str
    value: float | bool | None
    reason: str
    detail: str
    decided_at: float
    write_status: str | None = None
    read_back: float | bool | str | None = None
    mismatch: bool = False


class AuditBatch(MessageBase):
    """Audit records of one kind, in decision order: one JetStream message on
    :func:`audit_subject` (the module docstring shows one)."""

    type: Literal["supervisor_audit"] = "supervisor_audit"
    kind: Literal["setpoint", "operator"]
    records: list[AuditRecord] = Field(min_length=1)


def _jsonable(value: object) -> float | bool | str | None:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else repr(float(value))
    return repr(value)[:200]


# --- settings and stats -------------------------------------------------------------------


@dataclass(frozen=True)
class SupervisorSettings:
    """Timing of the runtime; the module docstring says why each default is what it is."""

    #: Extra wait for more requests once the queue is empty; 0 flushes at once (requests
    #: that arrive while a write is in flight still form the next batch).
    batch_window_s: float = 0.0
    batch_max: int = 256
    heartbeat_interval_s: float = 0.5
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    #: Read-back of a float counts as equal within this (a Float node rounds a Double).
    readback_tolerance: float = 1e-5
    #: The write loop reads back what it wrote once no new batch has come for this long, or
    #: once the oldest value has waited ``readback_max_delay_s``; 0 and 0 read back after
    #: every write.
    readback_idle_s: float = 0.005
    readback_max_delay_s: float = 0.25
    audit_keep: int = 1000

    def __post_init__(self) -> None:
        may_be_zero = ("batch_window_s", "readback_idle_s", "readback_max_delay_s")
        for key in (*may_be_zero, "heartbeat_interval_s", "reconnect_min_s"):
            value = getattr(self, key)
            low_ok = value >= 0 if key in may_be_zero else value > 0
            if not (math.isfinite(value) and low_ok):
                least = ">= 0" if key in may_be_zero else "> 0"
                raise ValueError(
                    f"SupervisorSettings.{key}: expected seconds {least}, got {value!r}"
                )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"SupervisorSettings.reconnect_max_s ({self.reconnect_max_s}) must be >= "
                f"reconnect_min_s ({self.reconnect_min_s})"
            )
        if self.batch_max < 1:
            raise ValueError(f"SupervisorSettings.batch_max: expected >= 1, got {self.batch_max}")


@dataclass
class SupervisorStats:
    """Counters for logs, tests and metrics; every key is from a fixed set."""

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    write_batches: int = 0
    #: ``read_values`` calls that read written values back (coalesced over write batches).
    read_backs: int = 0
    mismatches: int = 0
    heartbeats: int = 0
    #: Heartbeat ticks that found the plant's watchdog alarm set (it had gone safe).
    watchdog_alarms: int = 0
    #: The plant's watchdog alarm as the last heartbeat read it.
    watchdog_alarm: bool = False
    #: Wall seconds of recent batched writes (the metrics drain it).
    write_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    connects: int = 0
    link_losses: int = 0
    #: Audit records stored (acknowledged by JetStream) and lost.
    audit_published: int = 0
    audit_failed: int = 0
    operator_commands: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class _Pending:
    """The newest value for one machine variable, waiting to be written."""

    value: SetpointValue
    expires_at: float
    decision: Decision
    decided_at: float
    #: The OPC UA write, built when decided, for connection ``generation`` of the writer.
    prepared: ua.WriteValue | None = None
    generation: int = 0


@dataclass(frozen=True, slots=True)
class _Written:
    """A value the plant answered a write for, waiting for its read-back."""

    item: _Pending
    #: The write's status name (``Good``, ``BadOutOfRange``, ...).
    status: str
    good: bool


# --- the runtime --------------------------------------------------------------------------


class SupervisorRuntime:
    """The supervisor process: use ``async with SupervisorRuntime(...) as sup:``.

    Args:
        limits: what the checks compare against (:meth:`SupervisorLimits.from_plant`).
        nodemap: where the plant's variables are; its endpoint is the plant's.
        credentials: the plant write login and client certificate.
        nats: the bus to take requests from and audit to.
        operator_token: the secret operator commands must carry.
        plant: the plant name in subjects (default: the node map's).
    """

    def __init__(
        self,
        *,
        limits: SupervisorLimits,
        nodemap: NodeMap,
        credentials: PlantCredentials,
        nats: NatsEndpoint,
        operator_token: str,
        plant: str | None = None,
        settings: SupervisorSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not operator_token:
            raise ValueError("operator_token: expected a non-empty secret")
        self.plant = plant or nodemap.plant
        self.subjects = Subjects(self.plant)
        self.limits = limits
        self.nodemap = nodemap
        self.settings = settings or SupervisorSettings()
        self.wall = wall_clock
        self.writer = PlantWriter(nodemap, credentials)
        self.bus = Bus(nats, settings=BusSettings(name=f"autofab-supervisor-{self.plant}"))
        self.state: SupervisorState = initial_state(limits, wall_clock())
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.stats = SupervisorStats()
        self.audit_log: deque[AuditRecord] = deque(maxlen=self.settings.audit_keep)
        #: Set False to stop sending heartbeats (tests of the plant's watchdog).
        self.heartbeat_enabled = True
        self._token = operator_token
        self._queue: asyncio.Queue[SetpointRequest] = asyncio.Queue(_QUEUE_MAX)
        self._taken_in = 0  # requests queued since intake last let the batch loop run
        #: Written values by variable, oldest write first, waiting for their read-back.
        self._unverified: dict[tuple[str, str], _Written] = {}
        self._unverified_since = 0.0
        #: Set when there is something for the write loop; when it has taken ``pending``.
        self._work = asyncio.Event()
        self._taken = asyncio.Event()
        self._audit_buffer: list[AuditRecord] = []
        self._audit_wake = asyncio.Event()
        self._audit_idle = asyncio.Event()
        self._audit_idle.set()
        self._io = asyncio.Lock()
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._beat = int(wall_clock() * 1000)
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        for machine in limits.machines:
            nodemap.node_id(machine, "speed_setpoint")  # every machine must be in the map

    # -- lifecycle -----------------------------------------------------------------------

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
        """Connect to NATS, make the audit stream, subscribe, and start connecting to the
        plant (in the background: use :meth:`wait_connected` to wait for it)."""
        await self.bus.connect()
        js = self.bus.client.jetstream()
        name = audit_stream_name(self.plant)
        subjects = [f"{self.subjects.prefix}.audit.>"]
        try:
            await js.add_stream(name=name, subjects=subjects, description="supervisor audit")
        except nats.js.errors.BadRequestError:
            await js.update_stream(name=name, subjects=subjects)
        nc = self.bus.client
        self._subs = [
            await nc.subscribe(self.subjects.setpoint_request, cb=self._on_setpoint),
            await nc.subscribe(operator_subject(self.plant), cb=self._on_operator),
        ]
        await self.bus.flush()
        for coro, name in (
            (self._link_loop(), "link"),
            (self._batch_loop(), "batch"),
            (self._heartbeat_loop(), "heartbeat"),
            (self._write_loop(), "write"),
            (self._audit_loop(), "audit"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=f"supervisor-{name}"))

    async def stop(self) -> None:
        """Stop the loops, read back what was written, publish the audit records still
        queued, and disconnect."""
        if self._tasks:
            await _cancel(self._tasks[:3])  # link, batch, heartbeat
            async with self._io:  # no write in flight: the write loop waits for work or the lock
                await _cancel(self._tasks[3:4])
                if self._unverified and self._up.is_set():
                    try:
                        await asyncio.wait_for(self._read_back(), self.writer.timeout_s)
                    except Exception as error:  # a timeout too: audited without a read-back
                        log.info("plant %s: no read-back at stop: %r", self.plant, error)
                self._finish_unread()
            await asyncio.sleep(0)  # records audited by callbacks already scheduled
            with contextlib.suppress(TimeoutError):
                await self.wait_audit_stored(2.0)
            await _cancel(self._tasks[4:])
            self._tasks.clear()
        await self.writer.disconnect()
        await self.bus.close()

    async def wait_audit_stored(self, timeout: float) -> None:
        """Wait until every record audited so far is stored on the audit stream or counted
        in ``stats.audit_failed`` (TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self._audit_idle.wait(), timeout)

    @property
    def connected(self) -> bool:
        """Whether the plant link is up now."""
        return self._up.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until the plant link is up (TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self._up.wait(), timeout)

    # -- plant link ----------------------------------------------------------------------

    def _link_lost(self, error: BaseException) -> None:
        if self._up.is_set():
            self.stats.link_losses += 1
            log.warning("plant %s: OPC UA link lost (%r); reconnecting", self.plant, error)
        self._up.clear()
        self._lost.set()
        self._taken.set()  # the batch loop decides on, superseding, while the plant is away

    async def _link_loop(self) -> None:
        delay = self.settings.reconnect_min_s
        while True:
            try:
                async with self._io:
                    await self.writer.connect()
                    await self._sync_from_plant()
                    await self._send_heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.info("plant %s: cannot connect (%r); retry in %.1f s", self.plant, error, delay)
                await self.writer.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
                continue
            delay = self.settings.reconnect_min_s
            self.stats.connects += 1
            self._lost.clear()
            self._up.set()
            log.info("plant %s: connected to %s", self.plant, self.writer.endpoint)
            await self._flush()
            await self._lost.wait()
            await self.writer.disconnect()

    async def _sync_from_plant(self) -> None:
        """Take the plant's speeds and run switches as the applied values (it may have
        gone to its safe state or restarted while we were away); pending values win, since
        they are about to be written."""
        machines = list(self.limits.machines)
        targets = [(m, v) for m in machines for v in ("speed_setpoint", "run")]
        values = await self.writer.read(targets)
        now = self.wall()
        applied = dict(self.state.applied)
        for key, value in zip(targets, values, strict=True):
            if key in self.pending or value is None:
                continue
            old = applied[key]
            plant_value = bool(value) if key[1] == "run" else float(value)
            applied[key] = Applied(plant_value, old.requested_at, now)
        self.state = replace(self.state, applied=MappingProxyType(applied))

    async def _send_heartbeat(self) -> None:
        self._beat += 1
        status = await self.writer.heartbeat(self._beat)
        if not status.is_good():
            log.warning("plant %s: heartbeat refused: %s", self.plant, status.name)
        self.stats.heartbeats += 1

    async def _heartbeat_loop(self) -> None:
        machines = list(self.limits.machines)
        state_targets = [(m, "state") for m in machines]
        chunk = _STATUS_READ_CHUNK
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            if not self._up.is_set() or not self.heartbeat_enabled:
                continue
            try:
                async with self._io:
                    (alarm,) = await self.writer.read_plant(["watchdog_alarm"])
                    self.stats.watchdog_alarm = bool(alarm)
                    await self._send_heartbeat()
                    if alarm:
                        # The plant went to its safe state (latched) while we were quiet:
                        # what it holds now, not what we last wrote, is the truth.
                        log.warning("plant %s: watchdog alarm seen; resynchronising", self.plant)
                        await self._sync_from_plant()
                        # Counted once handled: a reader of the counter sees the state
                        # the resync took from the plant.
                        self.stats.watchdog_alarms += 1
                codes: list[Any] = []
                for at in range(0, len(state_targets), chunk):
                    # A few machines a call, so a setpoint waits for one short read at most.
                    async with self._io:
                        codes += await self.writer.read(state_targets[at : at + chunk])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._link_lost(error)
                continue
            for machine, code in zip(machines, codes, strict=True):
                known = STATUS_CODES.get(code) if isinstance(code, int) else None
                if known is not None and known == self.state.status.get(machine):
                    continue  # unchanged: skip copying the status map
                try:
                    self.state = observe_status(self.state, machine, int(code))
                except (TypeError, ValueError) as error:
                    log.debug("plant %s: status of %s: %s", self.plant, machine, error)

    # -- setpoints -----------------------------------------------------------------------

    async def _on_setpoint(self, msg: Msg) -> None:
        now = self.wall()
        topic = self.subjects.setpoint_request
        try:
            header = (msg.headers or {}).get(EXPIRES_HEADER)
            expired = header is not None and not (float(header) > now)
            request = decode(topic, msg.data, SetpointRequest)
        except (ProtocolError, ValueError) as error:
            reason = error.reason if isinstance(error, ProtocolError) else "bad_header"
            self._audit_refused(msg.data, reason, str(error), now)
            return
        if expired:
            self._audit(
                _decision_record(_rejected(request, "stale", "Autofab-Expires passed"), now)
            )
            return
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self._audit(_decision_record(_rejected(request, "stale", "intake overloaded"), now))
            return
        self._taken_in += 1
        if self._taken_in >= self.settings.batch_max:
            # nats-py hands this callback every message it holds before it yields: pause
            # once a batch is queued, so a burst's first write is not held up by the rest.
            self._taken_in = 0
            await asyncio.sleep(0)

    async def _next_batch(self) -> list[SetpointRequest]:
        """Everything queued (up to ``batch_max``), waiting for the first request and then
        at most ``batch_window_s`` for more."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.settings.batch_window_s
        while len(batch) < self.settings.batch_max:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _batch_loop(self) -> None:
        while True:
            self._decide(await self._next_batch())
            self._work.set()
            # One batch decided ahead of the write in flight, no more (module docstring).
            while self.pending and self._up.is_set():
                self._taken.clear()
                await self._taken.wait()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        while True:
            if self._unverified and self._up.is_set() and not self._work.is_set():
                # Read back once no batch has come for a moment, or the oldest has waited.
                left = self._unverified_since + settings.readback_max_delay_s - loop.time()
                try:
                    await asyncio.wait_for(
                        self._work.wait(), max(0.0, min(settings.readback_idle_s, left))
                    )
                except TimeoutError:
                    await self._flush()
                    continue
            await self._work.wait()
            self._work.clear()
            await self._flush(defer_read_back=True)

    async def process(self, batch: list[SetpointRequest]) -> list[Decision]:
        """Decide ``batch``, queue what passed as the latest value per variable, and flush.

        Public so a caller with requests in hand (a test, a replay) can skip NATS.
        """
        decisions = self._decide(batch)
        await self._flush()
        return decisions

    def _decide(self, batch: list[SetpointRequest]) -> list[Decision]:
        now = self.wall()
        decisions, self.state = decide_batch(self.state, batch, now, self.limits)
        counts = self.stats.decisions
        for decision, request in zip(decisions, batch, strict=True):
            counts[(decision.outcome, decision.reason)] += 1
            if decision.outcome == "rejected" or decision.value is None:
                self._audit(_decision_record(decision, now))
            else:
                self._queue_write(decision, request.expires_at, now)
        return decisions

    def _queue_write(self, decision: Decision, expires_at: float, now: float) -> None:
        assert decision.value is not None
        key = (decision.machine, decision.variable)
        old = self.pending.get(key)
        if old is not None:
            self._audit(_decision_record(old.decision, old.decided_at, "superseded"))
        writer, prepared = self.writer, None
        if self._up.is_set():
            with contextlib.suppress(Exception):  # the flush prepares it again
                prepared = writer.prepare(key, decision.value)
        self.pending[key] = _Pending(
            decision.value, expires_at, decision, now, prepared, writer.generation
        )

    async def _flush(self, *, defer_read_back: bool = False) -> None:
        """Write every still-valid pending value in one call, read back every written value
        (with ``defer_read_back``, only if the oldest has waited ``readback_max_delay_s``),
        and audit."""
        if not self._up.is_set() or not (self.pending or self._unverified):
            return
        async with self._io:
            if not self._up.is_set():
                return
            taken, self.pending = self.pending, {}
            self._taken.set()
            now = self.wall()
            batch: list[tuple[tuple[str, str], _Pending]] = []
            for key, item in taken.items():
                if item.expires_at < now:
                    self._audit(
                        _decision_record(item.decision, item.decided_at, "expired_unwritten")
                    )
                else:
                    batch.append((key, item))
            if batch:
                started = time.perf_counter()
                try:
                    codes = await self.writer.write_prepared([self._prepared(b) for b in batch])
                except asyncio.CancelledError:
                    self._put_back(batch)
                    raise
                except Exception as error:
                    self._put_back(batch)  # unknown whether it landed: write again
                    self._link_lost(error)
                    return
                self.stats.write_batches += 1
                self.stats.write_seconds.append(time.perf_counter() - started)
                loop = asyncio.get_running_loop()
                if not self._unverified:
                    self._unverified_since = loop.time()
                overwritten: list[_Written] = []
                for (key, item), code in zip(batch, codes, strict=True):
                    good = code.is_good()
                    older = self._unverified.pop(key, None)
                    if older is not None:  # written again before its read-back
                        overwritten.append(older)
                    self._unverified[key] = _Written(item, "written" if good else code.name, good)
                if overwritten:
                    # Audited while the next write is on the wire, not before it is sent.
                    loop.call_soon(self._finish_unread, overwritten)
            waited = asyncio.get_running_loop().time() - self._unverified_since
            if self._unverified and (
                not defer_read_back or waited >= self.settings.readback_max_delay_s
            ):
                try:
                    await self._read_back()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    self._finish_unread()
                    self._link_lost(error)

    def _prepared(self, entry: tuple[tuple[str, str], _Pending]) -> ua.WriteValue:
        key, item = entry
        if item.prepared is not None and item.generation == self.writer.generation:
            return item.prepared
        return self.writer.prepare(key, item.value)

    def _put_back(self, batch: list[tuple[tuple[str, str], _Pending]]) -> None:
        """Return a batch whose write failed to ``pending``, unless decided again since."""
        for key, item in batch:
            if key in self.pending:
                self._audit(_decision_record(item.decision, item.decided_at, "superseded"))
            else:
                self.pending[key] = item

    async def _read_back(self) -> None:
        """Read every unverified variable in one call and audit each written value."""
        items = list(self._unverified.items())
        values = await self.writer.read([key for key, _ in items])
        self.stats.read_backs += 1
        self._unverified.clear()
        for (_, written), back in zip(items, values, strict=True):
            self._finish(written, back, read=True)

    def _finish_unread(self, items: list[_Written] | None = None) -> None:
        """Audit ``items`` (default: every written value still waiting for a read-back)
        without a read-back."""
        if items is None:
            items, self._unverified = list(self._unverified.values()), {}
        for written in items:
            self._finish(written, None, read=False)

    def _finish(self, written: _Written, back: object, *, read: bool) -> None:
        item = written.item
        self.stats.writes["Good" if written.good else written.status] += 1
        mismatch = not written.good or (
            read and not _same(item.value, back, self.settings.readback_tolerance)
        )
        if mismatch:
            self.stats.mismatches += 1
            log.warning(
                "plant %s: %s.%s wrote %r (%s), read back %r",
                self.plant,
                item.decision.machine,
                item.decision.variable,
                item.value,
                written.status,
                back if read else "nothing",
            )
        self._audit(
            _decision_record(
                item.decision,
                item.decided_at,
                written.status,
                read_back=_jsonable(back),
                mismatch=mismatch,
            )
        )

    # -- operator commands ---------------------------------------------------------------

    async def _on_operator(self, msg: Msg) -> None:
        now = self.wall()
        subject = operator_subject(self.plant)
        try:
            header = (msg.headers or {}).get(EXPIRES_HEADER)
            if header is not None and not float(header) > now:
                return  # its sender has given up; acting now would surprise them
            command = decode(subject, msg.data, OperatorCommand)
        except (ProtocolError, ValueError) as error:
            await self._reply(msg, OperatorReply(
                request_id="?", ok=False, detail=str(error)[:500], estop=self.state.estop,
                overrides=dict(self.state.overrides),
            ))  # fmt: skip
            return
        ok, detail = await self.command(command, now)
        await self._reply(
            msg,
            OperatorReply(
                request_id=command.request_id,
                ok=ok,
                detail=detail,
                estop=self.state.estop,
                overrides=dict(self.state.overrides),
            ),
        )

    async def command(self, command: OperatorCommand, now: float | None = None) -> tuple[bool, str]:
        """Authenticate and apply one operator command; return (ok, what happened)."""
        now = self.wall() if now is None else now
        if not secrets.compare_digest(command.token.encode(), self._token.encode()):
            ok, detail = False, "refused: wrong operator token"
        elif command.action in ("override_hold", "override_release") and (
            command.machine not in self.limits.machines
        ):
            ok, detail = (
                False,
                f"{command.action} needs a machine of this plant, got {command.machine!r}",
            )
        elif command.action == "override_hold":
            assert command.machine is not None
            self.state = hold_override(self.state, command.machine, command.operator)
            ok, detail = True, f"{command.operator} holds {command.machine}"
        elif command.action == "override_release":
            assert command.machine is not None
            self.state = release_override(self.state, command.machine)
            ok, detail = True, f"{command.machine} released to the agents"
        elif command.action == "estop_engage":
            self.state, writes = engage_estop(self.state, now)
            for w in writes:
                decision = Decision(
                    command.request_id, w.machine, w.variable, command.operator, w.value,
                    "applied", w.value, "estop", "emergency stop",
                )  # fmt: skip
                self._queue_write(decision, math.inf, now)
            await self._flush()
            written = "written" if not self.pending else "pending until the plant is reachable"
            ok, detail = True, f"emergency stop engaged: run=false on every machine ({written})"
        else:
            self.state = release_estop(self.state)
            ok, detail = True, "emergency stop released; machines stay stopped until asked to run"
        self.stats.operator_commands[(command.action, "ok" if ok else "refused")] += 1
        log.warning("plant %s: operator %s: %s", self.plant, command.operator, detail)
        self._audit(
            AuditRecord(
                kind="operator",
                request_id=command.request_id,
                machine=command.machine,
                variable=command.action,
                origin=command.operator,
                requested=None,
                outcome="applied" if ok else "rejected",
                value=None,
                reason="ok" if ok else "refused",
                detail=detail[:500],
                decided_at=now,
            )
        )
        return ok, detail

    async def _reply(self, msg: Msg, reply: OperatorReply) -> None:
        if not msg.reply:
            return
        with contextlib.suppress(nats.errors.Error, OSError):
            await msg.respond(encode(reply))

    # -- audit ---------------------------------------------------------------------------

    def _audit(self, record: AuditRecord) -> None:
        self.audit_log.append(record)
        if len(self._audit_buffer) >= _QUEUE_MAX:
            self.stats.audit_failed += 1
            return
        self._audit_buffer.append(record)
        self._audit_idle.clear()
        self._audit_wake.set()

    def _audit_refused(self, data: bytes, reason: str, detail: str, now: float) -> None:
        """Audit a message that never became a request (it did not decode)."""
        fields: Mapping[str, Any] = {}
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            raw = json.loads(data)
            fields = raw if isinstance(raw, dict) else {}
        self.stats.decisions[("rejected", reason)] += 1

        def text(key: str) -> str | None:
            value = fields.get(key)
            return value[:128] if isinstance(value, str) else None

        self._audit(
            AuditRecord(
                kind="setpoint",
                request_id=text("request_id") or "?",
                machine=text("machine"),
                variable=text("variable"),
                origin=text("origin") or "?",
                requested=_jsonable(fields.get("value")),
                outcome="rejected",
                value=None,
                reason=reason,
                detail=detail[:500],
                decided_at=now,
            )
        )

    async def _audit_loop(self) -> None:
        while True:
            await self._audit_wake.wait()
            self._audit_wake.clear()
            while self._audit_buffer:
                records, self._audit_buffer = self._audit_buffer, []
                for kind in ("setpoint", "operator"):
                    mine = [r for r in records if r.kind == kind]
                    for at in range(0, len(mine), _AUDIT_CHUNK):
                        await self._store(kind, mine[at : at + _AUDIT_CHUNK])
            self._audit_idle.set()

    async def _store(
        self, kind: Literal["setpoint", "operator"], records: list[AuditRecord]
    ) -> None:
        """Publish ``records`` as one :class:`AuditBatch` and await its acknowledgement (two,
        if it is too large for one message)."""
        try:
            data = encode(AuditBatch(kind=kind, records=records))
        except (ProtocolError, ValidationError) as error:
            if len(records) > 1:  # too large, or one bad record: store the others
                half = len(records) // 2
                await self._store(kind, records[:half])
                await self._store(kind, records[half:])
                return
            self.stats.audit_failed += 1
            log.error("plant %s: audit record not stored: %s: %r", self.plant, error, records[0])
            return
        try:
            js = self.bus.client.jetstream()
            await js.publish(
                audit_subject(self.plant, kind),
                data,
                stream=audit_stream_name(self.plant),
                timeout=2.0,
            )
            self.stats.audit_published += len(records)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.stats.audit_failed += len(records)
            log.warning(
                "plant %s: %d audit records not stored: %r", self.plant, len(records), error
            )


# --- helpers ------------------------------------------------------------------------------


def _rejected(request: SetpointRequest, reason: Any, detail: str) -> Decision:
    return Decision(
        request.request_id, request.machine, request.variable, request.origin, request.value,
        "rejected", None, reason, detail,
    )  # fmt: skip


def _decision_record(
    decision: Decision,
    decided_at: float,
    write_status: WriteStatus | str | None = None,
    *,
    read_back: float | bool | str | None = None,
    mismatch: bool = False,
) -> AuditRecord:
    value = decision.value
    return AuditRecord(
        "setpoint",
        decision.request_id,
        decision.machine,
        decision.variable,
        decision.origin,
        _jsonable(decision.requested),
        decision.outcome,
        value if isinstance(value, bool) or value is None else float(value),
        decision.reason,
        decision.detail[:500],
        decided_at,
        write_status,
        read_back,
        mismatch,
    )


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _same(written: SetpointValue, back: object, tolerance: float) -> bool:
    if isinstance(written, bool):
        return back is written or (isinstance(back, int | float) and bool(back) == written)
    if isinstance(back, bool) or not isinstance(back, int | float):
        return False
    return abs(float(back) - written) <= tolerance * max(1.0, abs(written))
