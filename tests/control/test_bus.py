"""The NATS bus and agent runner, against a real ``nats-server`` (no mocks).

Each test runs its coroutine under ``asyncio.run`` (the project does not depend on
pytest-asyncio) and waits for conditions with :func:`eventually`, never a fixed sleep. Each
test gets its own plant name, so subjects and key-value buckets never mix between tests on
the shared server; the test that kills the server starts its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.protocol import (
    HealthReport,
    MessageBase,
    OrderAck,
    OrderStatus,
    OrderStatusQuery,
    ProtocolError,
    SetpointRequest,
    Subjects,
    encode,
)
from autofab.control.bus import (
    EXPIRES_HEADER,
    AgentRunner,
    Bus,
    BusSettings,
    NoRespondersError,
    RequestTimeoutError,
    SpeedupClock,
    state_bucket_name,
)
from autofab.control.natsd import EmbeddedNats, NatsEndpoint

nats = pytest.importorskip("nats")


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedNats]:
    """One server for the tests that do not stop it."""
    with EmbeddedNats() as running:
        yield running


@pytest.fixture
def subjects() -> Subjects:
    """A fresh plant name per test: its own subjects and its own state bucket."""
    return Subjects(f"t{secrets.token_hex(4)}")


async def eventually(
    condition: Callable[[], bool], what: str, timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def _quiet(_error: Exception) -> None:
    """nats-py logs connection errors unless given a callback."""


async def raw_client(server: EmbeddedNats) -> Any:
    """A plain nats-py client, for publishing bytes the bus would never send."""
    return await nats.connect(**server.connect_options(), error_cb=_quiet)


async def kv_value(server: EmbeddedNats, plant: str, key: str) -> dict[str, Any] | None:
    """The stored snapshot of ``key`` in the plant's state bucket, or None (no key, or no
    bucket)."""
    nc = await raw_client(server)
    try:
        try:
            kv = await nc.jetstream().key_value(state_bucket_name(plant))
            entry = await kv.get(key)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            return None
        return json.loads(entry.value)
    finally:
        await nc.close()


async def stored(server: EmbeddedNats, plant: str, key: str, expected: dict[str, Any]) -> None:
    """Wait until the state bucket holds ``expected`` under ``key``."""
    deadline = time.monotonic() + 5.0
    while (value := await kv_value(server, plant, key)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{key} stored {value}, expected {expected}")
        await asyncio.sleep(0.02)


def health(machine: str) -> HealthReport:
    return HealthReport(
        machine=machine,
        plant_time=10.0,
        rul_seconds=None,
        failure_probability=0.1,
        horizon_seconds=3600.0,
    )


def setpoint(request_id: str, requested_at: float, ttl: float) -> SetpointRequest:
    return SetpointRequest(
        request_id=request_id,
        machine="m1",
        variable="speed_setpoint",
        value=0.8,
        requested_at=requested_at,
        ttl_seconds=ttl,
        origin="test",
    )


# --- test agents ------------------------------------------------------------------------


class Counter(Agent):
    """Counts health reports and answers each with a setpoint command (a TTL'd Outgoing).

    A report from machine ``boom`` makes it raise, as a buggy agent would.
    """

    def __init__(
        self, name: str, subjects: Subjects, *, queue: str | None = None, ttl: float = 5.0
    ) -> None:
        super().__init__(name)
        self.subjects = subjects
        self.queue = queue
        self.ttl = ttl
        self.count = 0
        self.seen: list[str] = []
        self.nows: list[Now] = []

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.subjects.health_all, self.queue)]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        assert isinstance(message, HealthReport)
        if message.machine == "boom":
            raise RuntimeError("boom")
        self.count += 1
        self.seen.append(message.machine)
        self.nows.append(now)
        command = SetpointRequest(
            request_id=f"{self.name}-{self.count}",
            machine=message.machine,
            variable="speed_setpoint",
            value=1.0,
            requested_at=now.wall,
            ttl_seconds=max(self.ttl, 0.001),
            origin=self.name,
        )
        return [Outgoing(self.subjects.setpoint_request, command, ttl_seconds=self.ttl)]

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.count}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])


class Recorder(Agent):
    """Keeps every message it gets on ``subject``, with the wall time it got it."""

    def __init__(self, name: str, subject: str) -> None:
        super().__init__(name)
        self.subject = subject
        self.received: list[tuple[MessageBase, float]] = []

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.subject)]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        self.received.append((message, now.wall))
        return []

    def ids(self) -> list[str]:
        return [m.request_id for m, _ in self.received if isinstance(m, SetpointRequest)]


class OrderDesk(Agent):
    """Answers order status queries on the reply subject."""

    def __init__(self, subjects: Subjects) -> None:
        super().__init__("orders")
        self.subjects = subjects

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.subjects.orders_query, queue="orders")]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        assert isinstance(message, OrderStatusQuery)
        if reply_to is None:
            return []
        status = OrderStatus(
            client_order_id=message.client_order_id,
            order=None,
            status="unknown",
            jobs_done=0,
            jobs_total=0,
        )
        return [Outgoing(reply_to, status)]


class Ticker(Agent):
    """Every ``period`` seconds from its first due time, sends a setpoint command with a TTL.

    A health report on its own subject arms it ``period`` from then; ``limit`` ends it.
    """

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        *,
        period: float,
        ttl: float = 5.0,
        limit: int | None = None,
        first_due: float | None = None,
    ) -> None:
        super().__init__(name)
        self.subjects = subjects
        self.period = period
        self.ttl = ttl
        self.limit = limit
        self.due = first_due
        self.fired: list[tuple[str, float]] = []

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.subjects.health(self.name))]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        self.due = now.wall + self.period
        return []

    def next_timer(self) -> float | None:
        return self.due

    def on_timer(self, now: Now) -> list[Outgoing]:
        request_id = f"{self.name}-{len(self.fired) + 1}"
        self.fired.append((request_id, now.wall))
        done = self.limit is not None and len(self.fired) >= self.limit
        self.due = None if done else now.wall + self.period
        command = setpoint(request_id, now.wall, self.ttl)
        return [Outgoing(self.subjects.setpoint_request, command, ttl_seconds=self.ttl)]


# --- pure parts -------------------------------------------------------------------------


def test_speedup_clock_runs_plant_time_faster_than_wall_time() -> None:
    wall = [1000.0]
    clock = SpeedupClock(60.0, plant_start=5.0, wall_clock=lambda: wall[0])
    assert clock() == 5.0
    wall[0] += 2.0
    assert clock() == 5.0 + 120.0
    with pytest.raises(ValueError, match="speedup"):
        SpeedupClock(0.0)


def test_settings_and_runner_arguments_are_checked(subjects: Subjects) -> None:
    with pytest.raises(ValueError, match="ping_interval_s"):
        BusSettings(ping_interval_s=0)
    with pytest.raises(ValueError, match="reconnect_wait_s"):
        BusSettings(reconnect_wait_s=float("nan"))
    bus = Bus(NatsEndpoint("nats://127.0.0.1:1"))  # never connected
    with pytest.raises(ValueError, match="two agents named 'c'"):
        AgentRunner(bus, [Counter("c", subjects), Counter("c", subjects)], plant=subjects.plant)
    with pytest.raises(ValueError, match="key-value key"):
        AgentRunner(bus, [Counter("a+b", subjects)], plant=subjects.plant)
    AgentRunner(bus, [Counter("a+b", subjects)], plant=subjects.plant, persist=False)
    assert state_bucket_name("demo") == "autofab_demo_state"
    assert state_bucket_name("a+b") == "autofab_a_b_state"


# --- messages in and out ----------------------------------------------------------------


def test_messages_are_handled_and_outgoing_published_with_expiry(
    server: EmbeddedNats, subjects: Subjects
) -> None:
    counter = Counter("counter", subjects, ttl=5.0)
    recorder = Recorder("recorder", subjects.setpoint_request)

    async def main() -> None:
        watcher = await raw_client(server)
        headers: list[dict[str, str] | None] = []

        async def watch(msg: Any) -> None:
            headers.append(msg.headers)

        await watcher.subscribe(subjects.setpoint_request, cb=watch)
        await watcher.flush()
        async with (
            Bus(server.endpoint) as bus,
            AgentRunner(bus, [counter, recorder], plant=subjects.plant, plant_clock=lambda: 1234.5),
        ):
            before = time.time()
            assert await bus.publish(subjects.health("m1"), health("m1"))
            await eventually(lambda: len(recorder.received) == 1, "the command")
            await eventually(lambda: len(headers) == 1, "the raw watcher")
            stats = bus.stats
        await watcher.close()

        command, _ = recorder.received[0]
        assert isinstance(command, SetpointRequest)
        assert (command.machine, command.origin) == ("m1", "counter")
        now = counter.nows[0]
        assert now.plant == 1234.5
        assert before - 1 < now.wall < time.time() + 1
        assert headers[0] is not None
        expires = float(headers[0][EXPIRES_HEADER])
        assert expires == pytest.approx(now.wall + 5.0, abs=1e-3)
        assert stats.handled == {"counter": 1, "recorder": 1}
        assert stats.published == {"health_report": 1, "setpoint_request": 1}
        assert stats.rejected_total() == 0
        assert stats.dropped_total() == 0

    asyncio.run(main())


def test_replicas_in_a_queue_group_share_the_work(server: EmbeddedNats, subjects: Subjects) -> None:
    left = Counter("left", subjects, queue="counters")
    right = Counter("right", subjects, queue="counters")
    machines = [f"m{i}" for i in range(40)]

    async def main() -> None:
        async with (
            Bus(server.endpoint) as bus_a,
            Bus(server.endpoint) as bus_b,
            Bus(server.endpoint) as sender,
            AgentRunner(bus_a, [left], plant=subjects.plant, persist=False),
            AgentRunner(bus_b, [right], plant=subjects.plant, persist=False),
        ):
            for machine in machines:
                await sender.publish(subjects.health(machine), health(machine))
            await eventually(lambda: left.count + right.count == len(machines), "all handled")
            await sender.flush()
            await bus_a.flush()
            await bus_b.flush()

    asyncio.run(main())
    assert sorted(left.seen + right.seen) == sorted(machines)  # each exactly once
    assert left.count > 0
    assert right.count > 0


def test_bad_messages_are_counted_and_the_agent_keeps_working(
    server: EmbeddedNats, subjects: Subjects
) -> None:
    counter = Counter("counter", subjects)
    topic = subjects.health_all
    valid = encode(health("m1"))
    bad: list[tuple[bytes, dict[str, str] | None, str]] = [
        (b"{not json", None, "malformed_json"),
        (valid[:-7], None, "malformed_json"),  # truncated
        (b"\xff\xfe\xfd", None, "not_utf8"),
        (b'{"pad":"' + b"x" * 70_000 + b'"}', None, "too_large"),
        (valid.replace(b'"schema":1', b'"schema":2'), None, "schema_version"),
        (b'{"schema":1,"type":"teleport"}', None, "unknown_type"),
        (valid.replace(b'probability":0.1', b'probability":2.0'), None, "invalid_field"),
        (b"[1,2,3]", None, "not_an_object"),
        (valid, {EXPIRES_HEADER: "soon"}, "bad_header"),
    ]

    async def main() -> None:
        async with (
            Bus(server.endpoint) as bus,
            AgentRunner(bus, [counter], plant=subjects.plant, persist=False),
        ):
            nc = await raw_client(server)
            for data, headers, _ in bad:
                await nc.publish(subjects.health("m1"), data, headers=headers)
            await bus.publish(subjects.health("boom"), health("boom"))  # the agent raises
            await nc.publish(subjects.health("m2"), encode(health("m2")))
            await nc.flush()
            await eventually(lambda: counter.seen == ["m2"], "the valid message after the bad")
            await nc.close()
            stats = bus.stats

        expected: dict[tuple[str, str], int] = {}
        for _, _, reason in bad:
            expected[(topic, reason)] = expected.get((topic, reason), 0) + 1
        assert dict(stats.rejected) == expected
        assert stats.handler_errors == {"counter": 1}
        assert stats.handled["counter"] == 2  # the one that raised, and m2

    asyncio.run(main())


# --- request / reply --------------------------------------------------------------------


def test_request_reply_with_deadline(server: EmbeddedNats, subjects: Subjects) -> None:
    async def main() -> None:
        async with (
            Bus(server.endpoint) as bus,
            AgentRunner(bus, [OrderDesk(subjects)], plant=subjects.plant, persist=False),
        ):
            query = OrderStatusQuery(client_order_id="o-1")
            reply = await bus.request(
                subjects.orders_query, query, timeout=2.0, expected=OrderStatus
            )
            assert (reply.client_order_id, reply.status) == ("o-1", "unknown")

            with pytest.raises(ProtocolError) as wrong:
                await bus.request(subjects.orders_query, query, timeout=2.0, expected=OrderAck)
            assert wrong.value.reason == "unexpected_type"

            with pytest.raises(NoRespondersError, match=r"orders\.submit") as nobody:
                await bus.request(subjects.orders_submit, query, timeout=1.0)
            assert isinstance(nobody.value, TimeoutError)

            # Someone listens but never answers: the deadline ends the wait, and the request
            # carried that deadline in its header.
            silent = await raw_client(server)
            seen: list[float] = []

            async def ignore(msg: Any) -> None:
                seen.append(float(msg.headers[EXPIRES_HEADER]))

            await silent.subscribe(subjects.orders_submit, cb=ignore)
            await silent.flush()
            started = time.monotonic()
            sent_at = time.time()
            with pytest.raises(RequestTimeoutError, match=r"orders\.submit.*0\.3 s") as late:
                await bus.request(subjects.orders_submit, query, timeout=0.3)
            assert 0.25 < time.monotonic() - started < 2.0
            assert isinstance(late.value, TimeoutError)
            assert late.value.subject == subjects.orders_submit
            assert seen == [pytest.approx(sent_at + 0.3, abs=0.1)]
            await silent.close()

    asyncio.run(main())


# --- timers -----------------------------------------------------------------------------


def test_timers_fire_when_due_and_rearm_after_handle(
    server: EmbeddedNats, subjects: Subjects
) -> None:
    period = 0.05
    armed_at_start = Ticker("early", subjects, period=period, limit=2, first_due=time.time())
    armed_by_message = Ticker("late", subjects, period=period, limit=3)
    recorder = Recorder("recorder", subjects.setpoint_request)

    async def main() -> None:
        async with (
            Bus(server.endpoint) as bus,
            AgentRunner(
                bus,
                [armed_at_start, armed_by_message, recorder],
                plant=subjects.plant,
                persist=False,
            ),
        ):
            await eventually(lambda: len(armed_at_start.fired) == 2, "the early ticker")
            assert armed_by_message.fired == []  # nothing armed it yet
            await bus.publish(subjects.health("late"), health("late"))
            await eventually(lambda: len(armed_by_message.fired) == 3, "the armed ticker")
            await eventually(lambda: len(recorder.received) == 5, "the ticks' commands")
            assert bus.stats.timers_fired == {"early": 2, "late": 3}

    asyncio.run(main())
    times = [wall for _, wall in armed_by_message.fired]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= period * 0.9 for gap in gaps), gaps
    assert sorted(recorder.ids()) == sorted(
        [rid for rid, _ in armed_at_start.fired + armed_by_message.fired]
    )


# --- commands that must not arrive late -------------------------------------------------


def test_expired_commands_are_neither_sent_nor_acted_on(
    server: EmbeddedNats, subjects: Subjects
) -> None:
    instant = Counter("instant", subjects, ttl=0.0)  # every command expires on the spot
    recorder = Recorder("recorder", subjects.setpoint_request)
    skewed = Recorder("skewed", subjects.setpoint_request)

    async def main() -> None:
        async with (
            Bus(server.endpoint) as bus,
            # A receiver whose wall clock runs a minute ahead sees a 5 s command as stale.
            Bus(server.endpoint, wall_clock=lambda: time.time() + 60) as ahead,
            AgentRunner(bus, [instant, recorder], plant=subjects.plant, persist=False),
            AgentRunner(ahead, [skewed], plant=subjects.plant, persist=False),
        ):
            await bus.publish(subjects.health("m1"), health("m1"))
            await eventually(lambda: instant.count == 1, "the counter")

            nc = await raw_client(server)
            past = time.time() - 1
            # Header already past; the message's own requested_at + ttl already past.
            await nc.publish(
                subjects.setpoint_request,
                encode(setpoint("late-header", time.time(), 30)),
                headers={EXPIRES_HEADER: f"{past:.6f}"},
            )
            await nc.publish(subjects.setpoint_request, encode(setpoint("late-body", past, 0.5)))
            await nc.flush()
            await nc.close()
            # A fresh command, published after all of the above: it alone arrives.
            assert await bus.publish(
                subjects.setpoint_request, setpoint("fresh", time.time(), 5.0), ttl_seconds=5.0
            )
            # Already expired when published: refused at the sender.
            assert not await bus.publish(
                subjects.setpoint_request, setpoint("old", time.time() - 10, 5.0)
            )
            await eventually(lambda: recorder.ids() == ["fresh"], "the fresh command")
            await eventually(
                lambda: ahead.stats.rejected[(subjects.setpoint_request, "expired")] == 3,
                "the skewed receiver's refusals",
            )
            stats = bus.stats

        assert skewed.received == []
        assert stats.dropped[("setpoint_request", "expired")] == 2  # the counter's and "old"
        assert stats.rejected[(subjects.setpoint_request, "expired")] == 2

    asyncio.run(main())


def test_no_stale_command_is_acted_on_across_a_server_restart(subjects: Subjects) -> None:
    """Kill the server mid-run: commands made while it is down are dropped at the sender,
    commands stuck in nats-py's buffer are replayed but refused by the receiver as expired,
    and after the restart fresh commands, state writes and everything else flow again."""
    ttl = 0.3
    commander = Ticker("commander", subjects, period=0.05, ttl=ttl, first_due=time.time())
    counter = Counter("counter", subjects)
    recorder = Recorder("recorder", subjects.setpoint_request)
    settings = BusSettings(reconnect_wait_s=0.1)

    async def main() -> None:
        server = EmbeddedNats()
        await asyncio.to_thread(server.start)
        try:
            async with (
                Bus(server.endpoint, settings=settings) as bus_a,
                Bus(server.endpoint, settings=settings) as bus_b,
                AgentRunner(bus_a, [commander, counter], plant=subjects.plant),
                AgentRunner(bus_b, [recorder], plant=subjects.plant, persist=False),
            ):
                await bus_b.publish(subjects.health("m1"), health("m1"))
                await eventually(lambda: len(recorder.ids()) >= 3, "commands before the crash")
                await stored(server, subjects.plant, "counter", {"count": 1})

                server.kill()
                await eventually(
                    lambda: not bus_a.connected and not bus_b.connected, "both links down"
                )
                down_at = time.time()
                # What slipped into nats-py's buffer as the link died: replayed on reconnect.
                await bus_b.client.publish(
                    subjects.setpoint_request,
                    encode(setpoint("stale", down_at, 30)),
                    headers={EXPIRES_HEADER: f"{down_at + ttl:.6f}"},
                )
                await bus_b.client.publish(
                    subjects.setpoint_request, encode(setpoint("control", down_at, 30))
                )
                await eventually(
                    lambda: bus_a.stats.dropped[("setpoint_request", "disconnected")] >= 3,
                    "commands dropped while down",
                )
                await eventually(lambda: time.time() > down_at + ttl + 0.05, "the stale expiry")
                up_at = time.time()
                await asyncio.to_thread(server.start)
                await eventually(
                    lambda: bus_a.connected and bus_b.connected, "both links back", timeout=10
                )
                # The control, buffered with the stale one, proves the replay happened.
                await eventually(lambda: "control" in recorder.ids(), "the replayed control")
                await eventually(
                    lambda: any(
                        rid in recorder.ids() for rid, wall in commander.fired if wall > up_at
                    ),
                    "fresh commands after the restart",
                )
                await bus_b.publish(subjects.health("m2"), health("m2"))
                await stored(server, subjects.plant, "counter", {"count": 2})

                received = set(recorder.ids())
                assert "stale" not in received
                assert bus_b.stats.rejected[(subjects.setpoint_request, "expired")] >= 1
                made_while_down = {rid for rid, wall in commander.fired if down_at <= wall < up_at}
                assert made_while_down, "the commander ticked while the server was down"
                assert not made_while_down & received
                for message, got_at in recorder.received:
                    assert isinstance(message, SetpointRequest)
                    assert got_at <= message.expires_at, f"{message.request_id} acted on late"
                assert bus_a.stats.reconnects >= 1
                assert bus_b.stats.reconnects >= 1
        finally:
            await asyncio.to_thread(server.stop)

    asyncio.run(main())


# --- agent state in the key-value store -------------------------------------------------


def test_state_is_saved_on_change_and_restored_by_a_new_runner(
    server: EmbeddedNats, subjects: Subjects
) -> None:
    plant = subjects.plant

    async def run(counter: Counter, machines: list[str], expected: int) -> Bus:
        async with (
            Bus(server.endpoint) as bus,
            AgentRunner(bus, [counter, Recorder("recorder", "unused.subject")], plant=plant),
        ):
            for machine in machines:
                await bus.publish(subjects.health(machine), health(machine))
            await eventually(lambda: counter.count == expected, f"count {expected}")
            await stored(server, plant, "counter", {"count": expected})
        return bus

    async def main() -> None:
        first = await run(Counter("counter", subjects), ["a", "b", "c", "d", "e"], 5)
        assert 1 <= first.stats.state_writes["counter"] <= 5

        restarted = Counter("counter", subjects)
        bus = await run(restarted, ["f", "g", "h"], 8)  # continues from 5
        assert restarted.seen == ["f", "g", "h"]
        assert bus.stats.state_conflicts["counter"] == 0
        assert await kv_value(server, plant, "recorder") is None  # stateless: never written

    asyncio.run(main())


@pytest.mark.parametrize(
    "theirs",
    [100, 2],
    ids=["another-state", "a-backup-of-its-own-earlier-state"],
)
def test_a_conflicting_write_reloads_the_stored_state(
    server: EmbeddedNats, subjects: Subjects, theirs: int
) -> None:
    """Another writer's entry is adopted, even when its bytes equal an earlier write of the
    runner's own (an operator restoring a backup): it is a new revision, not the store
    going back, so the pair (revision, digest) does not match."""
    plant = subjects.plant
    counter = Counter("counter", subjects)

    async def main() -> None:
        async with (
            Bus(server.endpoint) as bus,
            AgentRunner(bus, [counter], plant=plant),
        ):
            for machine in ("a", "b"):
                await bus.publish(subjects.health(machine), health(machine))
            await stored(server, plant, "counter", {"count": 2})

            # Another replica writes the key behind this runner's back.
            nc = await raw_client(server)
            kv = await nc.jetstream().key_value(state_bucket_name(plant))
            await kv.put("counter", json.dumps({"count": theirs}, separators=(",", ":")).encode())
            await nc.close()

            await bus.publish(subjects.health("c"), health("c"))  # count 3: the write conflicts
            await eventually(lambda: bus.stats.state_conflicts["counter"] == 1, "the conflict")
            await eventually(lambda: counter.count == theirs, "the reload")
            await bus.publish(subjects.health("d"), health("d"))
            await stored(server, plant, "counter", {"count": theirs + 1})
            assert bus.stats.state_conflicts["counter"] == 1
            assert bus.stats.state_regressions["counter"] == 0

    asyncio.run(main())


async def restart_with_store(
    server: EmbeddedNats, bus: Bus, *, copy_to: Path, copy_from: Path | None
) -> None:
    """Stop the server gracefully (JetStream flushes), copy its store (or, with no
    ``copy_from``, delete ``copy_to``: the store is lost), and start it again on the same
    port with the same credentials, so ``bus`` comes back to it by itself."""
    await asyncio.to_thread(server.stop)
    await eventually(lambda: not bus.connected, "the link down")
    shutil.rmtree(copy_to, ignore_errors=True)
    if copy_from is not None:
        shutil.copytree(copy_from, copy_to)
    await asyncio.to_thread(server.start)
    await eventually(lambda: bus.connected, "the link back", timeout=10)


@contextlib.asynccontextmanager
async def server_with_store(store: Path) -> AsyncIterator[EmbeddedNats]:
    """A server of this test's own, keeping its JetStream store in ``store``."""
    server = EmbeddedNats(store_dir=store)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def count_to_five(
    server: EmbeddedNats, bus: Bus, subjects: Subjects, store: Path, early: Path
) -> None:
    """The counter stores count 2, the store is copied to ``early``, it stores count 5."""
    for machine in ("a", "b"):
        await bus.publish(subjects.health(machine), health(machine))
    await stored(server, subjects.plant, "counter", {"count": 2})
    await restart_with_store(server, bus, copy_to=early, copy_from=store)
    for machine in ("c", "d", "e"):
        await bus.publish(subjects.health(machine), health(machine))
    await stored(server, subjects.plant, "counter", {"count": 5})


async def count_to_five_then_go_back_to_two(
    server: EmbeddedNats, bus: Bus, subjects: Subjects, store: Path, early: Path
) -> None:
    """:func:`count_to_five`, and then the server starts again on the copy: the store
    holds count 2 again."""
    await count_to_five(server, bus, subjects, store, early)
    await restart_with_store(server, bus, copy_to=store, copy_from=early)


def test_a_store_that_went_back_is_written_over_not_adopted(
    tmp_path: Path, subjects: Subjects
) -> None:
    """A server killed before JetStream flushed comes back without the tail of its stream:
    the key holds an older write of this very runner. The agent's state continues from
    that write, so the runner writes it over the entry instead of going back with it.

    The store really goes back here: the server is stopped, its JetStream store directory
    is replaced by a copy taken earlier, and it starts again on the same port with the same
    credentials, so the runner's connection comes back to the older store by itself. A
    message follows at once; whether its write or the check after the reconnect meets the
    older entry first, the outcome is the same.
    """
    plant = subjects.plant
    store, early = tmp_path / "store", tmp_path / "early"
    counter = Counter("counter", subjects)
    settings = BusSettings(reconnect_wait_s=0.1)

    async def main() -> None:
        async with (
            server_with_store(store) as server,
            Bus(server.endpoint, settings=settings) as bus,
            AgentRunner(bus, [counter], plant=plant) as runner,
        ):
            await count_to_five_then_go_back_to_two(server, bus, subjects, store, early)

            await bus.publish(subjects.health("f"), health("f"))  # count 6
            await eventually(lambda: counter.count == 6, "count 6")
            await eventually(lambda: bus.stats.state_regressions["counter"] == 1, "the regression")
            await runner.save_state()  # waits for the writer's save, conflict and all
            await stored(server, plant, "counter", {"count": 6})
            assert counter.count == 6
            assert counter.seen == ["a", "b", "c", "d", "e", "f"]
            assert bus.stats.state_conflicts["counter"] == 1
            assert bus.stats.state_regressions["counter"] == 1

    asyncio.run(main())


def test_an_idle_agent_s_store_that_went_back_is_written_over_on_reconnect(
    tmp_path: Path, subjects: Subjects
) -> None:
    """The store goes back while the agent has nothing to do: no message, no write. The
    check after the reconnect finds the older entry of its own and writes the agent's
    state over it, so a restart of the agent does not restore the older state."""
    plant = subjects.plant
    store, early = tmp_path / "store", tmp_path / "early"
    counter = Counter("counter", subjects)
    settings = BusSettings(reconnect_wait_s=0.1)

    async def main() -> None:
        async with (
            server_with_store(store) as server,
            Bus(server.endpoint, settings=settings) as bus,
        ):
            async with AgentRunner(bus, [counter], plant=plant):
                await count_to_five_then_go_back_to_two(server, bus, subjects, store, early)

                await stored(server, plant, "counter", {"count": 5})  # no message since
                await eventually(
                    lambda: bus.stats.state_regressions["counter"] == 1, "the regression"
                )
                assert counter.count == 5
                # Only the store that went back conflicted; the intact one was left alone.
                assert bus.stats.state_conflicts["counter"] == 1
                assert bus.stats.handled["counter"] == 5

            restarted = Counter("counter", subjects)
            async with AgentRunner(bus, [restarted], plant=plant):
                assert restarted.count == 5

    asyncio.run(main())


def test_another_writer_s_entry_at_the_runner_s_own_revision_is_adopted_on_reconnect(
    tmp_path: Path, subjects: Subjects
) -> None:
    """The store goes back to count 2, and before the runner is back another writer fills
    the lost revisions, up to the very revision of the runner's last write (count 5). The
    next write's compare-and-set on that revision would pass and overwrite the other
    writer's entry unseen, so the check after the reconnect compares the bytes too and
    adopts it: the conflict policy, run early."""
    plant = subjects.plant
    store, early = tmp_path / "store", tmp_path / "early"
    counter = Counter("counter", subjects)
    settings = BusSettings(reconnect_wait_s=0.1)
    theirs = json.dumps({"count": 42}, separators=(",", ":")).encode()

    async def main() -> None:
        async with (
            server_with_store(store) as server,
            Bus(server.endpoint, settings=settings) as bus,
            AgentRunner(bus, [counter], plant=plant),
        ):
            await count_to_five(server, bus, subjects, store, early)
            nc = await raw_client(server)
            kv = await nc.jetstream().key_value(state_bucket_name(plant))
            ours = (await kv.get("counter")).revision
            await nc.close()

            await asyncio.to_thread(server.stop)
            await eventually(lambda: not bus.connected, "the link down")
            shutil.rmtree(store)
            shutil.copytree(early, store)
            async with server_with_store(store) as other:  # the runner cannot reach it
                nc = await raw_client(other)
                kv = await nc.jetstream().key_value(state_bucket_name(plant))
                revision = 0
                while revision < ours:
                    revision = await kv.put("counter", theirs)
                await nc.close()
            assert revision == ours
            await asyncio.to_thread(server.start)
            await eventually(lambda: bus.connected, "the link back", timeout=10)

            await eventually(lambda: counter.count == 42, "the other writer's state adopted")
            assert bus.stats.state_conflicts["counter"] == 1
            assert bus.stats.state_regressions["counter"] == 0
            await bus.publish(subjects.health("f"), health("f"))
            await stored(server, plant, "counter", {"count": 43})

    asyncio.run(main())


def test_a_lost_store_is_made_again_on_reconnect(
    tmp_path: Path, subjects: Subjects, caplog: pytest.LogCaptureFixture
) -> None:
    """The server comes back with no JetStream store at all, so no bucket: the check after
    the reconnect creates the bucket and writes the agent's state again, and later writes
    go on in the new bucket."""
    plant = subjects.plant
    store = tmp_path / "store"
    counter = Counter("counter", subjects)
    settings = BusSettings(reconnect_wait_s=0.1)

    async def main() -> None:
        async with (
            server_with_store(store) as server,
            Bus(server.endpoint, settings=settings) as bus,
            AgentRunner(bus, [counter], plant=plant),
        ):
            for machine in ("a", "b"):
                await bus.publish(subjects.health(machine), health(machine))
            await stored(server, plant, "counter", {"count": 2})
            writes = bus.stats.state_writes["counter"]
            await restart_with_store(server, bus, copy_to=store, copy_from=None)

            await stored(server, plant, "counter", {"count": 2})  # no message since
            await eventually(lambda: bus.stats.state_writes["counter"] == writes + 1, "the write")
            await bus.publish(subjects.health("c"), health("c"))
            await stored(server, plant, "counter", {"count": 3})
            assert bus.stats.state_conflicts["counter"] == 0
            assert bus.stats.state_regressions["counter"] == 0

    with caplog.at_level("WARNING", logger="autofab.control.bus"):
        asyncio.run(main())
    assert f"state bucket {state_bucket_name(plant)} is gone" in caplog.text


def test_a_bucket_deleted_under_a_running_runner_is_made_again_by_the_next_write(
    server: EmbeddedNats, subjects: Subjects
) -> None:
    """No reconnect here: the write that finds no stream behind the bucket asks for the
    store check, which creates the bucket, and the state is written into it."""
    plant = subjects.plant
    counter = Counter("counter", subjects)

    async def main() -> None:
        async with (
            Bus(server.endpoint, settings=BusSettings(reconnect_wait_s=0.1)) as bus,
            AgentRunner(bus, [counter], plant=plant),
        ):
            await bus.publish(subjects.health("a"), health("a"))
            await stored(server, plant, "counter", {"count": 1})
            nc = await raw_client(server)
            await nc.jetstream().delete_key_value(state_bucket_name(plant))
            await nc.close()

            await bus.publish(subjects.health("b"), health("b"))
            await stored(server, plant, "counter", {"count": 2})
            assert bus.stats.state_errors["counter"] >= 1  # the write that found no stream
            assert bus.stats.state_conflicts["counter"] == 0

    asyncio.run(main())


def test_a_wrong_password_or_dead_server_is_a_connection_error(server: EmbeddedNats) -> None:
    """The first connection has a deadline: no hang on a bad password or a closed port."""
    settings = BusSettings(connect_timeout_s=0.3)
    wrong = NatsEndpoint(server.url, server.user, "not-the-password")
    dead = NatsEndpoint("nats://127.0.0.1:1", server.user, server.password)
    for endpoint in (wrong, dead):
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="could not connect to NATS"):
            asyncio.run(Bus(endpoint, settings=settings).connect())
        assert time.monotonic() - started < 5
