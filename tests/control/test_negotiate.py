"""``autofab negotiate`` over a real ``nats-server``: the negotiation properties of the
in-memory tests, now with sockets, a server that dies, agents that restart and garbage on
every subject.

Each test runs its coroutine under ``asyncio.run`` (no pytest-asyncio) and gets its own
plant name, so subjects and state buckets never mix on the shared server. Runtime files go
to a temporary ``XDG_RUNTIME_DIR``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autofab.agents.protocol import (
    DEFAULT_MAX_BYTES,
    OrderAck,
    OrderStatusQuery,
    encode,
)
from autofab.control.bus import BusSettings
from autofab.control.cli import app
from autofab.control.natsd import EmbeddedNats
from autofab.control.negotiate_cmd import (
    Negotiation,
    NegotiationSettings,
    RuntimeInfo,
    config_orders,
    read_runtime_file,
    runtime_file,
    write_runtime_file,
)
from autofab.envs.plant import PlantConfig, load_plant

nats = pytest.importorskip("nats")

DEMO = load_plant("demo")
#: Fast enough for tests, slow enough that a message hop stays a few plant seconds.
SPEEDUP = 4000.0


@pytest.fixture(autouse=True)
def runtime_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runtime files in a temporary folder, never the user's."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "autofab"


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as running:
        yield running


def plant_config() -> PlantConfig:
    """The demo plant under a fresh name."""
    return DEMO.model_copy(update={"name": f"t{secrets.token_hex(4)}"})


def make(endpoint_of: EmbeddedNats, orders: int = 8, **settings: object) -> Negotiation:
    config = plant_config()
    options: dict[str, object] = {"speedup": SPEEDUP, "hosts": 3, "seed": 1, **settings}
    return Negotiation(
        config,
        endpoint_of.endpoint,
        NegotiationSettings(**options),  # type: ignore[arg-type]
        orders=config_orders(config, seed=1, limit=orders),
    )


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def run(
    negotiation: Negotiation,
    during: Callable[[Negotiation], Awaitable[None]] | None = None,
    time_limit: float = 40.0,
) -> None:
    """Start, do ``during``, run to the end, stop."""

    async def main() -> None:
        await negotiation.start()
        try:
            if during is not None:
                await during(negotiation)
            assert await negotiation.run(time_limit=time_limit) == "done"
            # Power releases and the last state writes follow the last InformDone.
            await until(lambda: negotiation.agent("energy").granted_w < 1e-6, "power released")
        finally:
            await negotiation.stop()

    asyncio.run(main())


def check_exactly_once(n: Negotiation) -> None:
    """Every operation of every acknowledged job done by the plant once, recorded by the
    scheduler once, in route order, on the machine that won its award."""
    scheduler = n.scheduler
    routes = {p.name: len(p.route) for p in n.config.products}
    assert len(n.answers) == len(n.planned)
    jobs = [j for a in n.answers.values() if isinstance(a, OrderAck) for j in a.jobs]
    assert jobs
    expected = {(j, op) for j in jobs for op in range(routes[scheduler.jobs[j].product])}
    plant_done = Counter((job, op) for job, op, *_ in n.world.finished)
    assert set(plant_done) == expected
    assert all(count == 1 for count in plant_done.values()), plant_done.most_common(3)
    recorded = Counter((c.job, c.op) for c in scheduler.completions)
    assert recorded == plant_done
    by_job: dict[str, list[int]] = {}
    for c in scheduler.completions:
        by_job.setdefault(c.job, []).append(c.op)
    assert all(ops == sorted(ops) for ops in by_job.values())
    finished_on = {(job, op): machine for job, op, machine, *_ in n.world.finished}
    assert {(c.job, c.op): c.machine for c in scheduler.completions} == finished_on
    awarded = {a.round_id: a.machine for a in n.awards}
    assert all(awarded[c.round_id] == c.machine for c in scheduler.completions)
    assert n.world.stale_setpoints_acted == 0
    assert sum(n.bus.stats.handler_errors.values()) == 0


# --- the negotiation ----------------------------------------------------------------------


def test_every_operation_is_awarded_and_done_exactly_once_over_nats(
    server: EmbeddedNats,
) -> None:
    n = make(server, orders=10, breakdowns=True)
    run(n)
    check_exactly_once(n)
    totals = n.summary()["totals"]
    assert totals["jobs_done"] == totals["jobs"] == 10
    assert totals["rejected"] == 0
    assert totals["rounds"] >= totals["ops_done"]
    assert all(a.score >= 0 and a.finish_at >= 0 for a in n.awards)


def bad_payloads() -> dict[str, bytes]:
    """One of each kind of garbage a subscriber must survive."""
    valid = encode(OrderStatusQuery(client_order_id="x"))
    wrong_version = json.loads(valid)
    wrong_version["schema"] = 99
    return {
        "malformed_json": b"{not json",
        "truncated": valid[: len(valid) // 2],
        "too_large": b"{" + b" " * (DEFAULT_MAX_BYTES + 1) + b"}",
        "schema_version": json.dumps(wrong_version).encode(),
        "not_utf8": b"\xff\xfe\x00",
        "unknown_type": json.dumps({"schema": 1, "type": "launch_missiles"}).encode(),
    }


REASON = {"truncated": "malformed_json"}


def test_garbage_on_every_agent_subject_is_counted_and_loses_no_work(
    server: EmbeddedNats,
) -> None:
    n = make(server, orders=8, breakdowns=False)
    topics: set[str] = set()

    async def flood(negotiation: Negotiation) -> None:
        await until(lambda: len(negotiation.scheduler.completions) >= 2, "some work done")
        raw = await nats.connect(**server.connect_options())
        try:
            for runner in negotiation.runners.values():
                for sub in runner.agents[0].subscriptions():
                    topics.add(sub.subject)
            for topic in sorted(topics):
                subject = topic.replace("*", "junk").replace(">", "junk")
                for payload in bad_payloads().values():
                    await raw.publish(subject, payload)
            await raw.flush()
        finally:
            await raw.close()

    run(n, flood)
    check_exactly_once(n)
    rejected = n.bus.stats.rejected
    for topic in topics:
        for kind in bad_payloads():
            reason = REASON.get(kind, kind)
            assert rejected[(topic, reason)] >= 1, (topic, reason, dict(rejected))
    assert n.bus.stats.rejected_total() >= len(topics) * len(bad_payloads())


def test_a_killed_and_restarted_server_neither_loses_nor_repeats_work() -> None:
    with EmbeddedNats() as own:
        # Setpoints expire quicker than the outage lasts: one replayed late must be dropped.
        n = make(own, orders=8, breakdowns=False, setpoint_ttl_seconds=0.5, grace_wall_seconds=4.0)
        n.bus_settings = BusSettings(name="test", reconnect_wait_s=0.2)

        async def crash(negotiation: Negotiation) -> None:
            await until(lambda: len(negotiation.scheduler.completions) >= 3, "some work done")
            await asyncio.to_thread(own.kill)
            await asyncio.sleep(0.8)
            await asyncio.to_thread(own.start)
            await until(lambda: negotiation.bus.connected, "the reconnect")

        run(n, crash)
    check_exactly_once(n)
    assert n.bus.stats.reconnects >= 1


def test_agents_restarted_from_their_stored_state_finish_the_run(server: EmbeddedNats) -> None:
    n = make(server, orders=10, breakdowns=False)
    restarted: dict[str, object] = {}

    async def restart_each(negotiation: Negotiation) -> None:
        for i, name in enumerate(("scheduler", "host-1", "energy", "supply")):
            done = 2 + 2 * i

            def progressed(done: int = done) -> bool:
                return len(negotiation.scheduler.completions) >= done

            await until(progressed, "progress")
            old = negotiation.agent(name)
            before = json.dumps(old.snapshot(), sort_keys=True)
            fresh = await negotiation.restart(name, down_seconds=0.2)
            assert fresh is not old
            if name == "scheduler":
                # Restored from the store, not started empty.
                assert len(negotiation.scheduler.completions) >= done
                assert negotiation.scheduler.orders
            restarted[name] = before

    run(n, restart_each)
    check_exactly_once(n)
    assert set(restarted) == {"scheduler", "host-1", "energy", "supply"}


# --- the runtime file ---------------------------------------------------------------------


def test_runtime_file_is_private_and_names_a_live_process(runtime_home: Path) -> None:
    info = RuntimeInfo("p1", "nats://127.0.0.1:4222", "u", "secret", os.getpid(), time.time())
    path = write_runtime_file(info)
    assert path == runtime_file("p1")
    assert path.parent == runtime_home
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_runtime_file("p1") == info
    assert "secret" not in repr(info)
    # A file left by a process that is gone is not trusted.
    dead = RuntimeInfo("p2", "nats://x:1", None, None, 2**22 + 12345, 0.0)
    runtime_file("p2").write_text(json.dumps(dead.__dict__))
    with pytest.raises(ValueError, match="is gone"):
        read_runtime_file("p2")
    with pytest.raises(ValueError, match="no running plant 'p3'"):
        read_runtime_file("p3")


# --- the command ----------------------------------------------------------------------------


def test_negotiate_command_runs_the_demo(tmp_path: Path, runtime_home: Path) -> None:
    result = CliRunner().invoke(
        app, ["negotiate", "demo", "--speedup", "20000", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    for text in ("Jobs", "Machines", "Totals (done)", "makespan", "re-announcements"):
        assert text in result.output
    log = json.loads((tmp_path / "run" / "awards.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["totals"]["jobs_done"] == summary["totals"]["jobs"] > 0
    assert len(log["awards"]) >= summary["totals"]["ops_done"]
    keys = {"round_id", "job", "op", "machine", "score", "finish_at", "wall_time"}
    assert keys <= set(log["awards"][0])
    assert not runtime_file("demo").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["no-such-plant.yaml"], "no-such-plant"),
        (["demo", "--hosts", "0"], "--hosts"),
        (["demo", "--user", "u"], "--nats-url"),
    ],
)
def test_negotiate_bad_input_is_one_line_and_exit_2(args: list[str], says: str) -> None:
    result = CliRunner().invoke(app, ["negotiate", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output


def test_negotiate_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (Path(__file__).parents[2] / "configs" / "demo.yaml").read_text()
    bad.write_text(text.replace("peak_cap_kw: 85", "peak_cap_kw: -1"))
    result = CliRunner().invoke(app, ["negotiate", str(bad)])
    assert result.exit_code == 2
    assert "peak_cap_kw" in result.output
    assert "Traceback" not in result.output


def test_negotiate_refuses_a_plant_that_is_already_running() -> None:
    write_runtime_file(RuntimeInfo("demo", "nats://127.0.0.1:1", None, None, os.getppid(), 0.0))
    result = CliRunner().invoke(app, ["negotiate", "demo"])
    assert result.exit_code == 2
    assert "already running" in result.output


def test_negotiate_reports_an_unreachable_server() -> None:
    result = CliRunner().invoke(
        app,
        ["negotiate", "demo", "--nats-url", "nats://127.0.0.1:1", "--connect-timeout", "0.5"],
    )
    assert result.exit_code == 2
    assert "could not connect" in result.output
