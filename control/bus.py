"""The NATS bus: runs transport-free agents (:mod:`autofab.agents.base`) over a real connection.

Two pieces:

* :class:`Bus` owns one nats-py connection: it publishes protocol messages, attaches and
  checks command expiry, answers :meth:`Bus.request` with deadlines, opens JetStream
  key-value buckets, and counts everything it drops in :class:`BusStats`.
* :class:`AgentRunner` hosts one or more :class:`~autofab.agents.base.Agent` objects on a
  bus: it subscribes to their subjects (with queue groups), decodes each message, calls
  ``handle``, publishes what comes back, runs the agents' timers, and keeps their snapshots
  in the key-value store so a restarted agent continues where it stopped.

Connection settings (:class:`BusSettings`), and why
---------------------------------------------------
nats-py's defaults suit a chat client, not a plant. ARCHITECTURE.md names three pitfalls:

* The default ping interval (120 s) takes minutes to notice a dead link. Here a PING goes
  out every second and the link counts as dead after two unanswered ones, so a silent
  network failure is noticed in about three seconds. The cost is a few bytes a second per
  connection; a grouped plant has tens of connections, not thousands.
* nats-py buffers publishes made while it reconnects and sends them once it is back. A
  setpoint buffered for a minute would reach the plant a minute late. So the bus does not
  hand nats-py a publish while it is disconnected at all: it drops it and counts it
  (``dropped[(type, "disconnected")]``). That is the delivery contract of
  :class:`~autofab.agents.base.Outgoing` anyway (at most once, no retry; the protocols time
  out and ask again). ``pending_size`` is therefore small, two maximum-size messages
  (128 KiB): it only bounds what can slip into nats-py's buffer in the instant between
  the link dying and nats-py noticing (those bytes *are* replayed after the reconnect, which
  is why commands carry an expiry that the receiver checks), and, while connected, it is the
  backlog after which a publish waits for the socket, which gives back-pressure instead of
  unbounded memory.
* Reconnects go on forever, half a second apart: a plant outlives any server restart.

Commands and their expiry
-------------------------
An :class:`~autofab.agents.base.Outgoing` with ``ttl_seconds`` is a command. Its expiry is
the wall time the agent decided it (``now.wall`` of the ``handle`` or ``on_timer`` call)
plus the TTL, or the message's own ``expires_at`` (a :class:`SetpointRequest`) if that is
earlier. The bus

1. refuses to publish a command that has already expired (``dropped[(type, "expired")]``);
2. never publishes while disconnected, so nothing it sends is replayed late by nats-py;
3. sends the expiry in the ``Autofab-Expires`` header (Unix seconds), and every receiving
   runner drops a message whose expiry has passed on its own wall clock, or whose own
   ``expires_at`` has (``rejected[(topic, "expired")]``), *before* decoding it for the agent.

Point 3 is the guarantee; 1 and 2 save the traffic. Core NATS stores nothing, so a
restarted server replays nothing; the only late copies come from client-side buffers, and
those are caught at the receiver. This relies on hosts' wall clocks agreeing (NTP); a skew
shortens or lengthens every TTL by the skew. :meth:`Bus.request` sends its own deadline the
same way, so an agent does not answer a request whose asker has given up.

Bad messages
------------
A message that :func:`~autofab.agents.protocol.decode` refuses (too large, not UTF-8, not
JSON, wrong schema version, unknown type, bad field), or that carries an unreadable expiry
header, is counted in ``rejected[(topic, reason)]`` and logged, at WARNING at most once per
topic and reason every ten seconds and at DEBUG otherwise, so a flood cannot flood the log.
``topic`` is the subscription's subject pattern (``autofab.demo.cnp.bid.*``), never the
concrete subject, so the counter's keys stay bounded. An agent that raises is counted in
``handler_errors`` and logged; neither ever stops the runner or loses other messages.

Agent state in the key-value store
----------------------------------
Each runner keeps its agents' :meth:`~autofab.agents.base.Agent.snapshot` in the JetStream
bucket :func:`state_bucket_name` (``autofab_<plant>_state``) under the agent's name. On
start an agent with an entry is restored from it. After a handled message or timer the
runner's writer task wakes, serialises each snapshot (sorted compact JSON) and writes only
those whose bytes changed, so a burst of messages costs one write, and an agent whose state
did not change costs none (nor is an agent's untouched initial state ever written). Writes
use compare-and-set on the revision the runner last saw
(``kv.update(key, value, last=revision)``, or ``kv.create`` for a new key).

Conflict policy: a wrong-last-sequence error (counted in ``state_conflicts``) means the
stored entry is not the revision the runner last saw. The runner reads the entry and asks
whether the agent has already been in that state: it keeps, per key, the (revision, SHA-256
of the bytes) of the last :data:`_KNOWN_ENTRIES` entries it wrote, restored or adopted.

* A known entry means the store went back: a crashed server lost the tail of its stream (a
  ``SIGKILL`` before JetStream flushed), so the key holds an older write of this very
  agent. The agent's memory continues from that entry, so the runner keeps it and writes it
  over the entry (compare-and-set on the entry's revision), counts ``state_regressions``
  and logs a warning. Adopting it would send the agent back in time: a scheduler would
  forget completions and hand out work again.
* Any other entry was written by someone else (another replica of the agent, or an
  operator). The store wins: the runner restores the agent from it (its own changes since
  its last write are discarded; what it already published stays published) and logs a
  warning. Two replicas that share a key thus converge on one state rather than overwrite
  each other in turn.

Both halves of the pair matter. After a regression the stream hands out its lost sequence
numbers again, so a revision alone could name another writer's entry; and an operator who
restores a backup writes bytes the runner wrote before, but at a new revision, which must
be adopted. A regression further back than the last :data:`_KNOWN_ENTRIES` entries is taken
for another writer and adopted, as before.

The runner does not wait for the agent's next write to find a store that went back: an idle
agent (a scheduler with nothing to hand out, or one stopped right after the server's
restart) may not write again, and a restart of its process would then restore the older
state. After every reconnect the writer task checks the store, outside the message path and
under the same lock as the writes. It binds the bucket again, creating it (with a warning)
if the server lost its whole JetStream store, and reads the key of each agent it has
written. A known entry other than the revision it last saw is written over at once, through
the conflict path above (so it counts in both counters, with the same warning); a key that
is gone is written again. An entry at the very revision the runner last wrote, but with
bytes it never wrote, is another writer's that the stream's reused numbering put there: the
next write's compare-and-set would pass and overwrite it unseen, so it is adopted at once
(counted as a conflict). Any other entry, a delete marker included, is left to the conflict
policy of the agent's next write. A link error
during the check is logged and leaves the key to the next write, and a write that finds no
stream behind the bucket asks for the same check. A write that fails otherwise
(disconnected, timeout) is retried after ``BusSettings.reconnect_wait_s``; the agent keeps
running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, TypeVar, overload

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.kv import KeyValue

from autofab.agents.base import Agent, Now, Outgoing
from autofab.agents.protocol import (
    DEFAULT_MAX_BYTES,
    MessageBase,
    ProtocolError,
    SetpointRequest,
    decode,
    encode,
)
from autofab.control import metrics
from autofab.control.natsd import NatsEndpoint

__all__ = [
    "EXPIRES_HEADER",
    "AgentRunner",
    "Bus",
    "BusClosedError",
    "BusDisconnectedError",
    "BusSettings",
    "BusStats",
    "NoRespondersError",
    "PlantClock",
    "RequestTimeoutError",
    "SpeedupClock",
    "state_bucket_name",
]

log = logging.getLogger(__name__)

#: The header that carries a command's expiry: wall time, Unix seconds, as decimal text.
EXPIRES_HEADER: Final = "Autofab-Expires"

#: A source of plant time, in plant seconds. The default is :class:`SpeedupClock`; the OPC UA
#: plant twin's clock plugs in here later.
PlantClock: TypeAlias = Callable[[], float]

M = TypeVar("M", bound=MessageBase)

_LOG_EVERY_S: Final = 10.0
_KV_KEY_RE: Final = re.compile(r"^[-/_=a-zA-Z0-9]+$")
_BUCKET_UNSAFE_RE: Final = re.compile(r"[^A-Za-z0-9_-]")
#: Errors of a publish, request or key-value call that mean "the link, not the data".
_LINK_ERRORS: Final = (nats.errors.Error, OSError, TimeoutError)
#: Store entries remembered per agent to tell the store going back from another writer (see
#: the conflict policy above): a crash loses at most the writes of the last moments, and 256
#: (revision, digest) pairs cost about 40 KiB per agent.
_KNOWN_ENTRIES: Final = 256


# --- settings, clock, stats -------------------------------------------------------------


@dataclass(frozen=True)
class BusSettings:
    """How the bus talks to NATS; the module docstring says why each default is what it is."""

    #: Seconds between client PINGs; with ``max_outstanding_pings`` it bounds how long a dead
    #: link goes unnoticed (about ``ping_interval_s * (max_outstanding_pings + 1)``).
    ping_interval_s: int = 1
    max_outstanding_pings: int = 2
    #: Seconds between reconnect attempts (forever), and between retries of a failed
    #: state write.
    reconnect_wait_s: float = 0.5
    connect_timeout_s: float = 2.0
    #: Bytes nats-py may buffer outside a healthy connection; see the module docstring.
    pending_size: int = 2 * DEFAULT_MAX_BYTES
    #: Largest message accepted or sent (the protocol's limit).
    max_message_bytes: int = DEFAULT_MAX_BYTES
    #: Seconds :meth:`Bus.close` and :meth:`AgentRunner.stop` wait for in-flight work.
    drain_timeout_s: float = 5.0
    #: The connection's name, as the server's monitoring shows it.
    name: str = "autofab"
    #: Copies of the agent-state key-value bucket a JetStream cluster keeps (1 on a single
    #: server; 3 on the three-node cluster of configs/nats/, so a lost node loses nothing).
    kv_replicas: int = 1

    def __post_init__(self) -> None:
        for key in ("ping_interval_s", "max_outstanding_pings"):
            if getattr(self, key) < 1:
                raise ValueError(f"BusSettings.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("reconnect_wait_s", "connect_timeout_s", "drain_timeout_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"BusSettings.{key} must be a positive number, got {value}")
        if not 1 <= self.kv_replicas <= 5:
            raise ValueError(f"BusSettings.kv_replicas must be 1 to 5, got {self.kv_replicas}")
        if self.pending_size < 0 or self.max_message_bytes < 1:
            raise ValueError(
                "BusSettings.pending_size must be >= 0 and max_message_bytes >= 1, got "
                f"{self.pending_size} and {self.max_message_bytes}"
            )


class SpeedupClock:
    """Plant time that runs ``speedup`` times as fast as wall time from ``plant_start``.

    The stand-in for the plant twin's clock (ARCHITECTURE.md, "Time"): at construction (or
    at ``wall_start``) plant time is ``plant_start``, and it advances ``speedup`` plant
    seconds per wall second.
    """

    def __init__(
        self,
        speedup: float = 1.0,
        *,
        plant_start: float = 0.0,
        wall_start: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(speedup) and speedup > 0):
            raise ValueError(f"speedup must be a positive number, got {speedup}")
        if not (math.isfinite(plant_start) and plant_start >= 0):
            raise ValueError(f"plant_start must be a non-negative number, got {plant_start}")
        self.speedup = speedup
        self.plant_start = plant_start
        self._wall_clock = wall_clock
        self.wall_start = wall_clock() if wall_start is None else wall_start

    def __call__(self) -> float:
        return max(0.0, self.plant_start + (self._wall_clock() - self.wall_start) * self.speedup)

    def __repr__(self) -> str:
        return f"SpeedupClock(speedup={self.speedup}, plant_start={self.plant_start})"


@dataclass
class BusStats:
    """What the bus and its runners did and dropped: counters for logs, tests and metrics.

    Every key is bounded: message types, subscription patterns, agent names and fixed reason
    codes, never a concrete subject that carries an id.
    """

    #: Messages published, by message type.
    published: Counter[str] = field(default_factory=Counter)
    #: Messages not published, by (message type, reason): ``expired``, ``disconnected``,
    #: ``bad_ttl``, ``too_large``, ``publish_failed``.
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Messages received and refused, by (subscription pattern, reason): a
    #: :data:`~autofab.agents.protocol.ErrorReason`, ``expired`` or ``bad_header``.
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Messages handed to each agent.
    handled: Counter[str] = field(default_factory=Counter)
    #: Exceptions raised by each agent's ``handle`` or ``on_timer``.
    handler_errors: Counter[str] = field(default_factory=Counter)
    #: ``on_timer`` calls per agent.
    timers_fired: Counter[str] = field(default_factory=Counter)
    #: Snapshot writes, compare-and-set conflicts and failed writes, per agent.
    state_writes: Counter[str] = field(default_factory=Counter)
    state_conflicts: Counter[str] = field(default_factory=Counter)
    state_errors: Counter[str] = field(default_factory=Counter)
    #: The conflicts where the store had gone back to an older entry of the agent's own,
    #: which the runner wrote over (a subset of ``state_conflicts``), found by a write or by
    #: the check of the store after a reconnect.
    state_regressions: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    reconnects: int = 0

    def rejected_total(self, reason: str | None = None) -> int:
        """Messages refused, of one reason or of all."""
        return sum(n for (_, why), n in self.rejected.items() if reason in (None, why))

    def dropped_total(self, reason: str | None = None) -> int:
        """Messages not published, of one reason or of all."""
        return sum(n for (_, why), n in self.dropped.items() if reason in (None, why))


class _LogLimiter:
    """``loud`` for the first of a kind every :data:`_LOG_EVERY_S`, DEBUG for the rest.

    Keys are bounded (topics, reasons, agent names), so the table stays small.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], float] = {}

    def level(self, *key: str, loud: int = logging.WARNING) -> int:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) >= _LOG_EVERY_S:
            self._last[key] = now
            return loud
        return logging.DEBUG


# --- errors -----------------------------------------------------------------------------


class BusClosedError(RuntimeError):
    """The bus is not connected yet, or has been closed."""


class BusDisconnectedError(ConnectionError):
    """The bus is reconnecting; a request cannot be sent now (nothing is buffered)."""


class RequestTimeoutError(TimeoutError):
    """No answer on ``subject`` within ``timeout`` seconds."""

    def __init__(self, subject: str, timeout: float, detail: str = "no reply") -> None:
        super().__init__(f"request on {subject!r}: {detail} within {timeout:g} s")
        self.subject = subject
        self.timeout = timeout


class NoRespondersError(RequestTimeoutError):
    """Nobody subscribes to ``subject``: the request could never be answered.

    A :class:`RequestTimeoutError`, so a caller that retries on timeouts retries on this too
    (the agent may be restarting), but the text says what happened.
    """

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(subject, timeout, "no agent listens")


# --- helpers ----------------------------------------------------------------------------


def state_bucket_name(plant: str) -> str:
    """The key-value bucket of a plant's agent state: ``autofab_<plant>_state``.

    Bucket names allow only letters, digits, ``_`` and ``-``; other characters of the plant
    name become ``_``.
    """
    return f"autofab_{_BUCKET_UNSAFE_RE.sub('_', plant)}_state"


def _message_expiry(message: MessageBase) -> float | None:
    """The wall time a message itself says it expires, if it says one."""
    return message.expires_at if isinstance(message, SetpointRequest) else None


def _header_expiry(headers: Mapping[str, str] | None) -> float | None:
    """The expiry in a received message's headers; ValueError if it is there but unreadable."""
    if not headers:
        return None
    text = headers.get(EXPIRES_HEADER)
    if text is None:
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{EXPIRES_HEADER} {text!r} is not a finite time")
    return value


def _snapshot_bytes(agent: Agent) -> bytes:
    """The agent's snapshot as canonical JSON, so equal state gives equal bytes."""
    return json.dumps(
        agent.snapshot(), sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


# --- the bus ----------------------------------------------------------------------------


class Bus:
    """One NATS connection, set up for a plant: see the module docstring for the policies.

    Use ``async with Bus(endpoint) as bus:`` or :meth:`connect` and :meth:`close`.

    Args:
        endpoint: where the server is and how to log in (embedded or configured).
        settings: connection and size settings; the defaults are meant for production.
        wall_clock: the wall clock for expiries and ``Now.wall`` (``time.time``; tests may
            skew it).
    """

    def __init__(
        self,
        endpoint: NatsEndpoint,
        *,
        settings: BusSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings or BusSettings()
        self.stats = BusStats()
        self.wall = wall_clock
        #: (plant, kind) once :meth:`export_metrics` is called.
        self.metric_labels: tuple[str, str] | None = None
        self._nc: NatsClient | None = None
        self._log_limiter = _LogLimiter()
        self._reconnect_listeners: list[Callable[[], None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> Self:
        """Connect, with the reconnect and ping settings; raise if the server is unreachable.

        Only the first connection can fail: after it, the client reconnects forever.
        """
        if self._nc is not None and not self._nc.is_closed:
            raise BusClosedError(f"the bus is already connected to {self.endpoint.url}")
        s = self.settings
        options: dict[str, Any] = {
            **self.endpoint.connect_options(),
            "name": s.name,
            "connect_timeout": s.connect_timeout_s,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": s.reconnect_wait_s,
            "ping_interval": s.ping_interval_s,
            "max_outstanding_pings": s.max_outstanding_pings,
            "pending_size": s.pending_size,
            "drain_timeout": s.drain_timeout_s,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        # With reconnects forever, nats-py also retries the *first* connection forever;
        # the deadline turns a wrong URL or password into an error instead of a hang.
        deadline = s.connect_timeout_s * 3
        try:
            self._nc = await asyncio.wait_for(nats.connect(**options), deadline)
        except TimeoutError:
            raise ConnectionError(
                f"could not connect to NATS at {self.endpoint.url} within {deadline:g} s (is "
                "the server running, and are the user and password right?)"
            ) from None
        except (*_LINK_ERRORS, nats.errors.NoServersError) as error:
            raise ConnectionError(
                f"could not connect to NATS at {self.endpoint.url}: {error!r}"
            ) from error
        return self

    async def close(self) -> None:
        """Drain the subscriptions still open, flush what was published, and disconnect.

        Safe to call twice. While reconnecting nothing can be drained, so it just closes.
        """
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        if nc.is_connected:
            try:
                await nc.drain()
            except _LINK_ERRORS as error:
                log.debug("drain on close failed: %r", error)
        if not nc.is_closed:
            await nc.close()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def client(self) -> NatsClient:
        """The nats-py client, for what the bus does not wrap (raw subscriptions, JetStream)."""
        if self._nc is None or self._nc.is_closed:
            raise BusClosedError("the bus is not connected (call connect() or use async with)")
        return self._nc

    @property
    def connected(self) -> bool:
        """Whether the link is up now (False while reconnecting)."""
        return self._nc is not None and self._nc.is_connected

    async def flush(self, timeout: int = 2) -> None:
        """Wait until the server has everything sent so far (a PING round trip)."""
        await self.client.flush(timeout=timeout)

    # -- callbacks -------------------------------------------------------------------------

    async def _on_error(self, error: Exception) -> None:
        # While the server is away every reconnect attempt fails: rate-limit those lines.
        log.log(self._log_limiter.level("nats", type(error).__name__), "NATS: %r", error)

    async def _on_disconnected(self) -> None:
        if self._nc is None:  # close() let go of the client: a goodbye, not a lost link
            return
        self.stats.disconnects += 1
        self._export_link(False)
        log.warning("NATS link to %s lost; reconnecting", self.endpoint.url)

    async def _on_reconnected(self) -> None:
        self.stats.reconnects += 1
        self._export_link(True)
        if self.metric_labels is not None:
            metrics.NATS_RECONNECTS.labels(*self.metric_labels).inc()
        log.warning("NATS link to %s is back", self.endpoint.url)
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:  # nats-py's reconnect loop must never see it
                log.exception("a NATS reconnect listener raised")

    def add_reconnect_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every reconnect; return a function that removes it.

        It runs inside nats-py's reconnect callback, in the event loop, so it must return at
        once (set an event, start a task); what it raises is logged, never propagated.
        """
        self._reconnect_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._reconnect_listeners.remove(listener)

        return remove

    def export_metrics(self, plant: str, kind: str) -> None:
        """Report this connection's state as ``autofab_nats_connected{plant, kind}`` and
        its reconnects as ``autofab_nats_reconnects_total`` from now on."""
        self.metric_labels = (plant, kind)
        metrics.NATS_RECONNECTS.labels(plant, kind)
        self._export_link(self.connected)

    def _export_link(self, up: bool) -> None:
        if self.metric_labels is not None:
            metrics.NATS_CONNECTED.labels(*self.metric_labels).set(1.0 if up else 0.0)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        message: MessageBase,
        *,
        ttl_seconds: float | None = None,
        decided_at: float | None = None,
    ) -> bool:
        """Publish one message at most once; return whether it went out.

        With ``ttl_seconds`` (or for a message with its own ``expires_at``) it is a command:
        it expires ``ttl_seconds`` after ``decided_at`` (wall time; default now), is not
        sent once expired, and carries its expiry in :data:`EXPIRES_HEADER`. Nothing is sent
        while the link is down. Every message not sent is counted in ``stats.dropped``;
        nothing here raises for a bad message or a lost link, so an agent's output cannot
        crash its runner.
        """
        kind = message.type
        expires_at: float | None = None
        if ttl_seconds is not None:
            if not (math.isfinite(ttl_seconds) and ttl_seconds >= 0):
                return self._drop(kind, "bad_ttl", f"ttl_seconds={ttl_seconds!r}")
            expires_at = (self.wall() if decided_at is None else decided_at) + ttl_seconds
        own = _message_expiry(message)
        if own is not None:
            expires_at = own if expires_at is None else min(own, expires_at)
        if expires_at is not None and self.wall() >= expires_at:
            return self._drop(kind, "expired", f"to {subject}")
        try:
            data = encode(message, max_bytes=self.settings.max_message_bytes)
        except ProtocolError as error:
            return self._drop(kind, "too_large", str(error))
        if not self.connected:
            return self._drop(kind, "disconnected", f"to {subject}")
        headers = None if expires_at is None else {EXPIRES_HEADER: f"{expires_at:.6f}"}
        try:
            await self.client.publish(subject, data, headers=headers)
        except (*_LINK_ERRORS, BusClosedError) as error:
            return self._drop(kind, "publish_failed", f"to {subject}: {error!r}")
        self.stats.published[kind] += 1
        return True

    async def publish_outgoing(self, outgoing: Iterable[Outgoing], decided_at: float) -> int:
        """Publish what an agent returned, decided at wall time ``decided_at``; return how
        many went out."""
        sent = 0
        for out in outgoing:
            sent += await self.publish(
                out.subject, out.message, ttl_seconds=out.ttl_seconds, decided_at=decided_at
            )
        return sent

    def _drop(self, kind: str, reason: str, detail: str) -> bool:
        self.stats.dropped[(kind, reason)] += 1
        level = self._log_limiter.level("drop", kind, reason)
        log.log(level, "not sent: %s (%s) %s", kind, reason, detail)
        return False

    # -- request / reply -------------------------------------------------------------------

    @overload
    async def request(
        self, subject: str, message: MessageBase, *, timeout: float, expected: None = None
    ) -> MessageBase: ...
    @overload
    async def request(
        self, subject: str, message: MessageBase, *, timeout: float, expected: type[M]
    ) -> M: ...
    async def request(
        self,
        subject: str,
        message: MessageBase,
        *,
        timeout: float,
        expected: type[MessageBase] | None = None,
    ) -> MessageBase:
        """Send ``message`` and return the decoded reply (only ``expected``, if given).

        The request carries its deadline as :data:`EXPIRES_HEADER`, so a responder that gets
        it late does not act on it after the caller has given up.

        Raises:
            RequestTimeoutError: no reply within ``timeout`` (:class:`NoRespondersError` when
                no one subscribes); both are ``TimeoutError``.
            BusDisconnectedError: the link is down; nothing was sent.
            ProtocolError: the reply is not a valid message (of type ``expected``).
        """
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        data = encode(message, max_bytes=self.settings.max_message_bytes)
        if not self.connected:
            raise BusDisconnectedError(f"request on {subject!r}: the NATS link is down")
        headers = {EXPIRES_HEADER: f"{self.wall() + timeout:.6f}"}
        try:
            reply = await self.client.request(subject, data, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError as error:
            raise NoRespondersError(subject, timeout) from error
        except TimeoutError as error:  # nats.errors.TimeoutError is one
            raise RequestTimeoutError(subject, timeout) from error
        except nats.errors.OutboundBufferLimitError as error:
            raise BusDisconnectedError(f"request on {subject!r}: the NATS link is down") from error
        return decode(
            f"reply to {subject}", reply.data, expected, max_bytes=self.settings.max_message_bytes
        )

    # -- JetStream ---------------------------------------------------------------------------

    async def key_value(self, bucket: str, on_create: Callable[[], None] | None = None) -> KeyValue:
        """The key-value bucket ``bucket``, created (keeping one revision per key) if missing;
        ``on_create()`` is called first when it has to be created."""
        js = self.client.jetstream()
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            if on_create is not None:
                on_create()
            return await js.create_key_value(
                bucket=bucket,
                history=1,
                description="autofab agent state",
                replicas=self.settings.kv_replicas,
            )


# --- the runner -------------------------------------------------------------------------


def agent_kind(agent: Agent) -> str:
    """The bounded ``kind`` label of an agent: its class name without ``Agent`` or
    ``Host`` (``SchedulerAgent`` -> ``scheduler``, ``MachineHost`` -> ``machine``)."""
    name = type(agent).__name__
    for suffix in ("Agent", "Host"):
        name = name.removesuffix(suffix)
    return name.lower() or "agent"


@dataclass
class _Hosted:
    """One agent on a runner, and what the runner keeps for it."""

    agent: Agent
    #: The snapshot bytes last written to (or read from) the store.
    saved: bytes = b""
    #: Handled a message or timer since the last look at its snapshot.
    dirty: bool = False
    #: The store revision of ``saved``; None while the key does not exist.
    revision: int | None = None
    #: (revision, SHA-256 of the value) of the last store entries this agent's state
    #: continues from: written, restored or adopted by this runner.
    known: deque[tuple[int, bytes]] = field(default_factory=lambda: deque(maxlen=_KNOWN_ENTRIES))
    rearm: asyncio.Event = field(default_factory=asyncio.Event)
    timer_task: asyncio.Task[None] | None = None
    #: ``autofab_agent_decision_duration_seconds`` for this agent's kind and plant.
    decision_seconds: Any = None

    def remember(self, revision: int, value: bytes) -> None:
        """Record that the agent's state continues from this store entry."""
        self.known.append((revision, hashlib.sha256(value).digest()))

    def knows(self, revision: int, value: bytes) -> bool:
        """Whether this store entry is one the agent's state continues from."""
        return (revision, hashlib.sha256(value).digest()) in self.known


class AgentRunner:
    """Hosts agents on a :class:`Bus`: messages in, ``handle``, messages out, timers, state.

    Use ``async with AgentRunner(bus, agents, plant="demo"):`` or :meth:`start` and
    :meth:`stop`. The bus must be connected first and outlive the runner.

    Args:
        bus: the connection.
        agents: the agents to host; names must be unique on this runner.
        plant: the plant name, which names the state bucket (:func:`state_bucket_name`).
        plant_clock: plant seconds for ``Now.plant``; default a :class:`SpeedupClock` at
            speedup 1 starting at 0.
        persist: keep snapshots in the key-value store and restore from it on start.
        state_bucket: the bucket to use instead of the plant's default.
    """

    def __init__(
        self,
        bus: Bus,
        agents: Iterable[Agent],
        *,
        plant: str,
        plant_clock: PlantClock | None = None,
        persist: bool = True,
        state_bucket: str | None = None,
    ) -> None:
        self.bus = bus
        self.plant = plant
        self.plant_clock: PlantClock = plant_clock or SpeedupClock(wall_clock=bus.wall)
        self.persist = persist
        self.state_bucket = state_bucket or state_bucket_name(plant)
        self._hosted: list[_Hosted] = []
        names: set[str] = set()
        for agent in agents:
            if agent.name in names:
                raise ValueError(f"two agents named {agent.name!r} on one runner")
            if persist and not _KV_KEY_RE.match(agent.name):
                raise ValueError(
                    f"agent name {agent.name!r} cannot be a key-value key (letters, digits, "
                    "'-', '_', '/', '='); rename it or run with persist=False"
                )
            names.add(agent.name)
            hosted = _Hosted(agent)
            hosted.decision_seconds = metrics.AGENT_DECISION_DURATION.labels(
                plant, agent_kind(agent)
            )
            self._hosted.append(hosted)
        kinds = sorted({agent_kind(h.agent) for h in self._hosted})
        #: The agent kind in metric labels: ``scheduler``, ``machine``... (``mixed`` for a
        #: runner hosting several kinds).
        self.kind = kinds[0] if len(kinds) == 1 else "mixed"
        self._subs: list[NatsSubscription] = []
        self._kv: KeyValue | None = None
        self._dirty = asyncio.Event()
        self._state_lock = asyncio.Lock()
        self._writer_task: asyncio.Task[None] | None = None
        #: Store checks asked for (one per reconnect, or a write that found no bucket) and
        #: done; the writer runs one while ``_checks_done < _checks_wanted``.
        self._checks_wanted = 0
        self._checks_done = 0
        self._remove_listener: Callable[[], None] | None = None
        self._running = False
        self._log_limiter = _LogLimiter()

    @property
    def agents(self) -> list[Agent]:
        """The hosted agents, in the order given."""
        return [hosted.agent for hosted in self._hosted]

    @property
    def stats(self) -> BusStats:
        """The bus's counters (shared by every runner on it)."""
        return self.bus.stats

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Self:
        """Restore state, subscribe, start timers; return once the server has the
        subscriptions, so a message published after this reaches the agents.

        Raises:
            ValueError: a stored snapshot the agent cannot restore (names agent and bucket).
        """
        if self._running:
            raise RuntimeError("the runner is already running")
        if self.bus.metric_labels is None:
            self.bus.export_metrics(self.plant, self.kind)
        if self.persist:
            self._kv = await self.bus.key_value(self.state_bucket)
            for hosted in self._hosted:
                await self._restore(hosted)
            self._remove_listener = self.bus.add_reconnect_listener(self._want_check)
        for hosted in self._hosted:
            hosted.saved = hosted.saved or self._snapshot(hosted) or b""
        self._running = True
        try:
            for hosted in self._hosted:
                for wanted in hosted.agent.subscriptions():
                    self._subs.append(
                        await self.bus.client.subscribe(
                            wanted.subject,
                            queue=wanted.queue or "",
                            cb=self._callback(hosted, wanted.subject),
                        )
                    )
            await self.bus.flush()
        except BaseException:
            await self.stop()
            raise
        for hosted in self._hosted:
            hosted.timer_task = asyncio.create_task(
                self._run_timers(hosted), name=f"autofab-timer-{hosted.agent.name}"
            )
        if self.persist:
            self._writer_task = asyncio.create_task(self._write_state(), name="autofab-state")
        return self

    async def stop(self) -> None:
        """Stop taking messages (finishing those already received), cancel the timers, and
        write the last state. Safe to call twice."""
        self._running = False
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        subs, self._subs = self._subs, []
        if subs and self.bus.connected:
            # Drain: the server stops sending, and messages already here are handled.
            drains = asyncio.gather(*(sub.drain() for sub in subs), return_exceptions=True)
            try:
                await asyncio.wait_for(drains, self.bus.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("stopping: messages still in hand after the drain timeout")
        for sub in subs:  # whatever the drain did not end (a lost link, a timeout)
            with contextlib.suppress(*_LINK_ERRORS):
                await sub.unsubscribe()
        tasks = [h.timer_task for h in self._hosted if h.timer_task is not None]
        if self._writer_task is not None:
            tasks.append(self._writer_task)
        await _cancel_until_done(tasks)
        for hosted in self._hosted:
            hosted.timer_task = None
        self._writer_task = None
        if self.persist and self._kv is not None:
            if self._checks_done < self._checks_wanted:  # a reconnect just before the stop
                await self._check_store()
            await self.save_state()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- messages --------------------------------------------------------------------------

    def _callback(self, hosted: _Hosted, topic: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_message(msg: Msg) -> None:
            try:
                await self._on_message(hosted, topic, msg)
            except Exception:  # the last line of defence: one message never stops the rest
                self._handler_error(hosted, f"on a message on {topic}")

        return on_message

    async def _on_message(self, hosted: _Hosted, topic: str, msg: Msg) -> None:
        wall = self.bus.wall()
        try:
            expires_at = _header_expiry(msg.headers)
        except ValueError as error:
            self._reject(topic, "bad_header", f"on {msg.subject}: {error}")
            return
        if expires_at is not None and wall > expires_at:
            self._reject(topic, "expired", f"on {msg.subject}, {wall - expires_at:.3f} s late")
            return
        try:
            message = decode(msg.subject, msg.data, max_bytes=self.bus.settings.max_message_bytes)
        except ProtocolError as error:
            self._reject(topic, error.reason, str(error))
            return
        own = _message_expiry(message)
        if own is not None and wall > own:
            self._reject(topic, "expired", f"{message.type} on {msg.subject}")
            return
        now = Now(wall=wall, plant=self.plant_clock())
        agent = hosted.agent
        started = time.perf_counter()
        try:
            outgoing = agent.handle(msg.subject, message, now, msg.reply or None)
        except Exception:
            self._handler_error(hosted, f"handling {message.type} from {msg.subject}")
            outgoing = []
        hosted.decision_seconds.observe(time.perf_counter() - started)
        self.stats.handled[agent.name] += 1
        self._changed(hosted)
        await self.bus.publish_outgoing(outgoing, now.wall)

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.stats.rejected[(topic, reason)] += 1
        metrics.AGENT_MESSAGES_REJECTED.labels(self.plant, self.kind, reason).inc()
        log.log(self._log_limiter.level(topic, reason), "refused (%s): %s", reason, detail)

    def _handler_error(self, hosted: _Hosted, doing: str) -> None:
        """Count and log (with the traceback, rate-limited) an exception from agent code."""
        name = hosted.agent.name
        self.stats.handler_errors[name] += 1
        level = self._log_limiter.level("raised", name, loud=logging.ERROR)
        log.log(level, "%s raised %s", name, doing, exc_info=True)

    def _changed(self, hosted: _Hosted) -> None:
        """After a handle or timer call: the timer may have moved, the state may have."""
        hosted.rearm.set()
        hosted.dirty = True
        self._dirty.set()

    def rearm(self) -> None:
        """Re-read every agent's :meth:`~Agent.next_timer` and look at its state again.

        The runner does this after each ``handle`` and ``on_timer`` itself; call it after
        changing an agent from outside (a Ray actor method, a test).
        """
        for hosted in self._hosted:
            self._changed(hosted)

    # -- timers ----------------------------------------------------------------------------

    def _next_due(self, hosted: _Hosted) -> float | None:
        try:
            due = hosted.agent.next_timer()
        except Exception:
            self._handler_error(hosted, "in next_timer")
            return None
        if due is not None and not math.isfinite(due):
            self._handler_error(hosted, f"in next_timer: {due!r} is not a time")
            return None
        return due

    async def _run_timers(self, hosted: _Hosted) -> None:
        """Call ``on_timer`` whenever wall time reaches ``next_timer()``, until stopped.

        The wait is cut short by :meth:`_changed` (after every ``handle``), so a timer set
        by a message is honoured at once. A faulty ``next_timer`` parks the timer until the
        next message instead of ending the task.
        """
        agent = hosted.agent
        while True:
            hosted.rearm.clear()
            due = self._next_due(hosted)
            if due is None:
                await hosted.rearm.wait()
                continue
            delay = due - self.bus.wall()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hosted.rearm.wait(), delay)
                continue
            started = time.perf_counter()
            try:
                now = Now(wall=self.bus.wall(), plant=self.plant_clock())
                outgoing = agent.on_timer(now)
            except Exception:
                self._handler_error(hosted, "in on_timer")
                now, outgoing = Now(wall=self.bus.wall(), plant=0.0), []
            hosted.decision_seconds.observe(time.perf_counter() - started)
            self.stats.timers_fired[agent.name] += 1
            self._changed(hosted)
            await self.bus.publish_outgoing(outgoing, now.wall)
            following = self._next_due(hosted)
            if following is not None and following <= due:
                # A timer that does not move would spin; give the loop a breath and say so.
                level = self._log_limiter.level("timer", agent.name)
                log.log(level, "%s timer did not advance past %.3f", agent.name, due)
                await asyncio.sleep(0.01)

    # -- state -----------------------------------------------------------------------------

    def _snapshot(self, hosted: _Hosted) -> bytes | None:
        try:
            return _snapshot_bytes(hosted.agent)
        except (TypeError, ValueError) as error:
            self.stats.state_errors[hosted.agent.name] += 1
            log.error("%s snapshot is not JSON: %s", hosted.agent.name, error)
            return None

    async def _restore(self, hosted: _Hosted) -> None:
        """Restore one agent from its stored entry, if there is one."""
        assert self._kv is not None
        name = hosted.agent.name
        try:
            entry = await self._kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            return
        if entry.value is None:
            return
        try:
            hosted.agent.restore(json.loads(entry.value))
        except Exception as error:
            raise ValueError(
                f"cannot restore agent {name!r} from key-value bucket {self.state_bucket!r} "
                f"(revision {entry.revision}): {error}"
            ) from error
        hosted.revision = entry.revision
        hosted.remember(entry.revision, entry.value)
        hosted.saved = self._snapshot(hosted) or b""
        log.info("%s restored from %s revision %s", name, self.state_bucket, entry.revision)

    async def _write_state(self) -> None:
        """The writer task: write changed snapshots after each wake, retrying on failure,
        and check the store after a reconnect (:meth:`_check_store`)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._checks_done < self._checks_wanted:
                await self._check_store()
            if not await self.save_state():
                await asyncio.sleep(self.bus.settings.reconnect_wait_s)
                self._dirty.set()

    async def save_state(self) -> bool:
        """Write every snapshot that changed since the last write; return whether all are
        stored (False: disconnected or failed, to be retried). See the conflict policy in
        the module docstring."""
        if not self.persist or self._kv is None:
            return True
        all_saved = True
        async with self._state_lock:
            for hosted in self._hosted:
                if not hosted.dirty:
                    continue
                if not self.bus.connected:
                    all_saved = False
                    continue
                hosted.dirty = False
                data = self._snapshot(hosted)
                if data is None or data == hosted.saved:
                    continue
                try:
                    saved = await self._save(hosted, data)
                except asyncio.CancelledError:
                    hosted.dirty = True  # cancelled mid-write (stop()): its final save writes it
                    raise
                if not saved:
                    hosted.dirty = True
                    all_saved = False
        return all_saved

    async def _save(self, hosted: _Hosted, data: bytes) -> bool:
        """Write one agent's snapshot; return False if it is to be retried later.

        A conflict either adopts the store's entry (done: True) or finds the store gone
        back to an entry of the agent's own, which is written over at once.
        """
        assert self._kv is not None
        name = hosted.agent.name
        for _ in range(2):  # a second try only after the store went back
            try:
                if hosted.revision is None:
                    revision = await self._kv.create(name, data)
                else:
                    revision = await self._kv.update(name, data, last=hosted.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.stats.state_conflicts[name] += 1
                if not await self._reload(hosted):
                    return True
                continue
            except (*_LINK_ERRORS, BusClosedError) as error:
                self.stats.state_errors[name] += 1
                level = self._log_limiter.level("kv", name)
                log.log(level, "state of %s not written: %r", name, error)
                if isinstance(error, nats.js.errors.NoStreamResponseError):
                    self._want_check()  # no stream: the bucket is gone, make it again
                return False
            hosted.saved, hosted.revision = data, revision
            hosted.remember(revision, data)
            self.stats.state_writes[name] += 1
            return True
        return False

    async def _reload(self, hosted: _Hosted) -> bool:
        """After a conflict: adopt the store's entry, unless it is an older entry of this
        agent's own (the store went back), which is to be written over. Return True for
        "write again now" (the store went back), False when done or left to the writer."""
        assert self._kv is not None
        name = hosted.agent.name
        try:
            entry = await self._kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            log.warning("%s: state key vanished during a write; writing ours again", name)
            hosted.revision = None
            self._changed(hosted)
            return False
        except _LINK_ERRORS as error:
            log.warning("%s: state conflict, and the reload failed (%r); retrying", name, error)
            self._changed(hosted)
            return False
        value = entry.value or b""
        if hosted.knows(entry.revision, value):
            self.stats.state_regressions[name] += 1
            log.warning(
                "%s: the store %s went back from revision %s to %s, an entry this agent's "
                "state already continues from (the server lost later writes); writing this "
                "agent's state over it",
                name,
                self.state_bucket,
                hosted.revision,
                entry.revision,
            )
            hosted.saved, hosted.revision = value, entry.revision
            # Until the write over it lands, the agent's state is unsaved: if that write is
            # cancelled or fails, the next save (or stop()'s final one) must still make it.
            hosted.dirty = True
            return True
        hosted.revision = entry.revision
        try:
            hosted.agent.restore(json.loads(value or b"{}"))
        except Exception as error:
            self.stats.state_errors[name] += 1
            log.error(
                "%s: state conflict, and revision %s in %s cannot be restored (%s); keeping "
                "this agent's state and overwriting it",
                name,
                entry.revision,
                self.state_bucket,
                error,
            )
            self._changed(hosted)
            return False
        hosted.remember(entry.revision, value)
        hosted.saved = self._snapshot(hosted) or b""
        hosted.rearm.set()
        log.warning(
            "%s: another writer stored revision %s in %s; adopted it (local changes since "
            "the last write are discarded)",
            name,
            entry.revision,
            self.state_bucket,
        )
        return False

    # -- the store check after a reconnect ---------------------------------------------------

    def _want_check(self) -> None:
        """Ask the writer to check the store (after a reconnect, or a write that found no
        bucket): a listener on the bus, so it only sets flags."""
        self._checks_wanted += 1
        self._dirty.set()

    async def _check_store(self) -> None:
        """Look at every key this runner has written, as a server that comes back may have
        lost the tail of its stream, or its whole store; see the module docstring.

        Runs in the writer task (or in :meth:`stop`) under the state lock, never in the
        message path. Nothing here raises for a lost link: what cannot be checked now is
        logged and left to the agent's next write.
        """
        wanted = self._checks_wanted
        async with self._state_lock:
            if not self.persist or self._kv is None or not self.bus.connected:
                return  # a later reconnect asks again
            try:
                await self._bind_bucket()
            except (*_LINK_ERRORS, BusClosedError) as error:
                log.log(
                    self._log_limiter.level("check", self.state_bucket),
                    "state bucket %s not checked (%r); each agent's next write will notice a "
                    "store that went back",
                    self.state_bucket,
                    error,
                )
            else:
                for hosted in self._hosted:
                    if hosted.revision is not None and self.bus.connected:
                        await self._check_entry(hosted)
        self._checks_done = max(self._checks_done, wanted)

    async def _bind_bucket(self) -> None:
        """Bind the state bucket again, creating it if the server no longer has it."""

        def gone() -> None:
            log.warning(
                "state bucket %s is gone (the server lost its JetStream store, or someone "
                "deleted it); creating it again and writing the agents' state again",
                self.state_bucket,
            )

        self._kv = await self.bus.key_value(self.state_bucket, on_create=gone)

    async def _check_entry(self, hosted: _Hosted) -> None:
        """Check one agent's key: a key that holds an older entry of the agent's own is
        written over at once, through :meth:`_save` and the conflict path; a missing key is
        written again; another writer's entry at the revision this runner last wrote is
        adopted at once (the next write could not see it); any other entry is left to the
        conflict policy of the next write."""
        assert self._kv is not None
        name = hosted.agent.name
        try:
            entry = await self._kv.get(name)
        except nats.js.errors.KeyNotFoundError as error:
            if error.entry is not None:  # a delete or purge marker: someone else's act
                return
            log.warning(
                "%s: its entry in %s is gone (the server lost its store); writing this "
                "agent's state again",
                name,
                self.state_bucket,
            )
            hosted.revision = None
        except (*_LINK_ERRORS, BusClosedError) as error:
            log.log(
                self._log_limiter.level("check", name),
                "%s: state not checked (%r); its next write will notice a store that went back",
                name,
                error,
            )
            return
        else:
            known = hosted.knows(entry.revision, entry.value or b"")
            if entry.revision == hosted.revision:
                if known:
                    return  # where this runner left it
                # Another writer's entry at the very revision this runner last wrote: the
                # store went back and the stream handed that revision out again. The next
                # write's compare-and-set would pass and overwrite it unseen, so the
                # conflict policy runs now, and it adopts the entry.
                self.stats.state_conflicts[name] += 1
                await self._reload(hosted)
                return
            if not known:
                return  # another writer's: the conflict policy decides at the next write
            # The store went back. The update on hosted.revision conflicts, and _reload
            # counts the regression, logs it and writes over the entry.
        data = self._snapshot(hosted)
        if data is not None and not await self._save(hosted, data):
            # Not written (the link again): the writer retries it like a changed state.
            hosted.saved, hosted.dirty = b"", True


async def _cancel_until_done(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any is still running.

    On Python 3.11, ``asyncio.wait_for`` (in the timer loop, and inside nats-py's requests)
    can swallow a cancellation that lands just as its inner wait completes, and the task
    then waits on: one cancel is not always enough.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)
