"""The supervisor runtime against real servers on loopback: nats-server with JetStream, the
OPC UA plant twin, and a hand-written OPC UA server standing in for a real plant."""

from __future__ import annotations

import asyncio
import json
import math
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asyncua import Client, Server, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from typer.testing import CliRunner

from autofab.agents.protocol import SetpointRequest, Subjects, decode
from autofab.control.bus import Bus
from autofab.control.cli import app
from autofab.control.natsd import EmbeddedNats
from autofab.control.opcua.nodemap import MACHINE_VARIABLES, PLANT_VARIABLES, NodeMap
from autofab.control.opcua.security import (
    SECURE_POLICIES,
    TwinPermissionRuleset,
    TwinUserManager,
    ensure_client_files,
    ensure_server_files,
)
from autofab.control.opcua.twin import PlantTwin, TwinSettings, free_port
from autofab.control.opcua.writer import PlantCredentials
from autofab.control.supervisor import MachineLimits, SupervisorLimits
from autofab.control.supervisor_runtime import (
    AuditBatch,
    AuditRecord,
    SupervisorRuntime,
    SupervisorSettings,
    audit_stream_name,
    audit_subject,
    ensure_operator_token,
    operator_token_file,
    read_operator_token,
)
from autofab.envs.plant import load_plant

DEMO = load_plant("demo")
TOKEN = "test-operator-token"
T = TypeVar("T")


def limits(**speed: Any) -> SupervisorLimits:
    return SupervisorLimits.from_plant(
        DEMO, {"speed_setpoint": {"max_rate_per_second": 100.0, **speed}}
    )


def request(
    rid: str,
    machine: str,
    variable: str,
    value: float,
    *,
    ttl: float = 5.0,
    origin: str = "agent",
    at: float | None = None,
) -> SetpointRequest:
    return SetpointRequest(
        request_id=rid,
        machine=machine,
        variable=variable,
        value=value,
        requested_at=time.time() if at is None else at,
        ttl_seconds=ttl,
        origin=origin,
    )


async def reader(endpoint: str, certs: Path) -> Client:
    """An anonymous, read-only secure client: how the tests look at the plant."""
    client = Client(endpoint, timeout=5)
    client.application_uri = "urn:autofab:test-reader"
    files = ensure_client_files(certs, "test-reader")
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(files.certificate),
        str(files.private_key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    await client.connect()
    return client


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll ``check`` until true; return the seconds it took (fail after ``timeout``)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@dataclass
class Rig:
    twin: PlantTwin
    sup: SupervisorRuntime
    agent: Bus
    view: Client

    async def value(self, machine: str, variable: str) -> Any:
        assert self.twin.nodemap is not None
        return await self.view.get_node(self.twin.nodemap.node_id(machine, variable)).read_value()

    def audit(self, rid: str) -> list[AuditRecord]:
        return [r for r in self.sup.audit_log if r.request_id == rid]


@asynccontextmanager
async def rig(
    certs: Path,
    nats_server: EmbeddedNats,
    lim: SupervisorLimits | None = None,
    settings: SupervisorSettings | None = None,
    **twin_kw: Any,
) -> AsyncIterator[Rig]:
    twin_kw.setdefault("speedup", 1.0)
    twin_kw.setdefault("tick_s", 0.05)
    tw = TwinSettings(
        cert_dir=certs, nodemap_path=certs / f"nm-{time.monotonic_ns()}.json", **twin_kw
    )
    async with PlantTwin(DEMO, tw) as twin:
        assert twin.nodemap is not None
        sup = SupervisorRuntime(
            limits=lim or limits(),
            nodemap=twin.nodemap,
            credentials=PlantCredentials.from_cert_dir(certs),
            nats=nats_server.endpoint,
            operator_token=TOKEN,
            settings=settings or SupervisorSettings(heartbeat_interval_s=0.2),
        )
        async with sup, Bus(nats_server.endpoint) as agent:
            await sup.wait_connected(10)
            view = await reader(twin.endpoint, certs)
            try:
                yield Rig(twin, sup, agent, view)
            finally:
                await view.disconnect()


def test_requests_reach_the_twin_in_one_batch_and_are_audited(
    certs: Path, nats_server: EmbeddedNats
) -> None:
    async def main() -> None:
        async with rig(certs, nats_server) as r:
            subject = Subjects("demo").setpoint_request
            for req in (
                # The same value twice: the rate limit allows no second change in one instant.
                request("a1", "mill-1", "speed_setpoint", 0.9),
                request("a2", "mill-1", "speed_setpoint", 0.9),  # supersedes a1
                request("a3", "lathe-1", "speed_setpoint", 0.8),
                request("a4", "mill-2", "run", 0.0),
            ):
                await r.agent.publish(subject, req)
            await r.agent.flush()
            took = await wait_for(
                lambda: _all(
                    r.value("mill-1", "speed_setpoint"), 0.9,
                    r.value("lathe-1", "speed_setpoint"), 0.8,
                    r.value("mill-2", "run"), False,
                ),
                1.0,
                "setpoints on the twin",
            )  # fmt: skip
            assert took < 1.0

            # a1 may be written on its own before a2 arrives (batches form while a write is
            # in flight), so wait for a2's own write record too.
            def a2_written() -> bool:
                return any(a.request_id == "a2" and a.write_status for a in r.sup.audit_log)

            await wait_for(_true(a2_written), 1.0, "a2 written")
            m = r.twin.model.plant.machine_names.index("mill-1")
            assert r.twin.model.speed[m] == pytest.approx(0.9)
            written = {rec.request_id: rec for rec in r.sup.audit_log if rec.write_status}
            assert written["a2"].write_status == "written"
            assert written["a2"].read_back == pytest.approx(0.9)
            assert not written["a2"].mismatch
            # Same-variable requests within one batching window: only the latest is written.
            assert written["a1"].write_status in ("superseded", "written")
            assert r.sup.stats.write_batches <= 3
            # And the audit trail is on JetStream.
            await _wait_audit_flushed(r.sup)
            js = r.agent.client.jetstream()
            sub = await js.subscribe(
                audit_subject("demo", "setpoint"), stream=audit_stream_name("demo"),
                ordered_consumer=True,
            )  # fmt: skip
            ids = ("a1", "a2", "a3", "a4")
            seen: dict[str, AuditRecord] = {}
            times = Counter[str]()
            with_deadline = time.monotonic() + 3
            while not set(ids) <= set(seen) and time.monotonic() < with_deadline:
                msg = await sub.next_msg(timeout=2)
                stored = decode(msg.subject, msg.data, AuditBatch)
                assert stored.kind == "setpoint"
                for rec in stored.records:
                    seen[rec.request_id] = rec
                    times[rec.request_id] += 1
            await sub.unsubscribe()
            # Every decision is on the stream, once, as kept in memory.
            assert [times[i] for i in ids] == [1, 1, 1, 1]
            assert seen["a4"].value is False
            assert seen["a4"].write_status == "written"
            assert seen["a2"] == written["a2"]
            assert r.sup.stats.audit_published >= 4
            assert r.sup.stats.audit_failed == 0

    asyncio.run(main())


async def _all(*pairs: Any) -> bool:
    """Whether each awaitable in ``(awaitable, wanted, ...)`` gives its wanted value."""
    got = await asyncio.gather(*pairs[::2])
    for value, want in zip(got, pairs[1::2], strict=True):
        if isinstance(want, bool):
            if value is not want:
                return False
        elif not math.isclose(value, want, rel_tol=1e-6):
            return False
    return True


async def _wait_audit_flushed(sup: SupervisorRuntime) -> None:
    await sup.wait_audit_stored(5)


def test_rejected_requests_never_reach_the_twin_and_are_audited(
    certs: Path, nats_server: EmbeddedNats
) -> None:
    async def main() -> None:
        async with rig(certs, nats_server, lim=limits(mode="reject")) as r:
            subject = Subjects("demo").setpoint_request
            nc = r.agent.client
            now = time.time()
            nan = {
                "schema": 1, "type": "setpoint_request", "request_id": "nan", "machine": "mill-1",
                "variable": "speed_setpoint", "value": math.nan, "requested_at": now,
                "ttl_seconds": 5.0, "origin": "agent",
            }  # fmt: skip
            await nc.publish(subject, json.dumps(nan).encode())
            for req in (
                request("oob", "mill-1", "speed_setpoint", 5.0),
                request("stale", "mill-1", "speed_setpoint", 0.7, ttl=1.0, at=now - 10),
            ):
                await nc.publish(subject, req.model_dump_json(by_alias=True).encode())
            # A stale request carried with an expired header is dropped on the header alone.
            fresh = request("hdr", "mill-1", "speed_setpoint", 0.7)
            await nc.publish(
                subject,
                fresh.model_dump_json(by_alias=True).encode(),
                headers={"Autofab-Expires": f"{now - 1:.6f}"},
            )
            await r.agent.publish(subject, request("marker", "lathe-2", "speed_setpoint", 0.85))
            await wait_for(lambda: _all(r.value("lathe-2", "speed_setpoint"), 0.85), 2.0, "marker")
            assert await r.value("mill-1", "speed_setpoint") == pytest.approx(1.0)
            reasons = {
                rid: [a.reason for a in r.audit(rid)] for rid in ("nan", "oob", "stale", "hdr")
            }
            assert reasons == {
                "nan": ["invalid_field"],
                "oob": ["out_of_bounds"],
                "stale": ["stale"],
                "hdr": ["stale"],
            }
            assert all(a.outcome == "rejected" for rid in reasons for a in r.audit(rid))

    asyncio.run(main())


def test_read_back_is_coalesced_and_every_write_is_audited(
    certs: Path, nats_server: EmbeddedNats
) -> None:
    async def main() -> None:
        settings = SupervisorSettings(
            heartbeat_interval_s=0.2, readback_idle_s=0.5, readback_max_delay_s=5.0
        )
        async with rig(certs, nats_server, settings=settings) as r:
            subject = Subjects("demo").setpoint_request
            before = r.sup.stats.read_backs
            await r.agent.publish(subject, request("c1", "mill-1", "speed_setpoint", 0.9))
            await wait_for(lambda: _all(r.value("mill-1", "speed_setpoint"), 0.9), 1.0, "c1")
            assert not r.audit("c1")  # written, its read-back put off
            await r.agent.publish(subject, request("c2", "mill-1", "speed_setpoint", 0.8))
            await r.agent.publish(subject, request("c3", "lathe-1", "speed_setpoint", 0.85))
            # c1 is written over before its read-back: audited then, with no read-back.
            await wait_for(_true(lambda: bool(r.audit("c1"))), 1.0, "c2 written")
            (c1,) = r.audit("c1")
            assert (c1.write_status, c1.read_back, c1.mismatch) == ("written", None, False)
            await wait_for(_true(lambda: bool(r.audit("c3"))), 2.0, "the read-back")
            (c2,), (c3,) = r.audit("c2"), r.audit("c3")
            assert c2.write_status == c3.write_status == "written"
            assert (c2.read_back, c3.read_back) == (pytest.approx(0.8), pytest.approx(0.85))
            assert not c2.mismatch
            assert not c3.mismatch
            assert r.sup.stats.read_backs == before + 1  # one read for c2 and c3
            assert r.sup.stats.writes["Good"] == 3

    asyncio.run(main())


def test_an_audit_record_that_cannot_be_stored_is_counted(
    certs: Path, nats_server: EmbeddedNats
) -> None:
    async def main() -> None:
        async with rig(certs, nats_server) as r:
            await r.sup.wait_audit_stored(5)
            assert r.sup.stats.audit_failed == 0
            await r.agent.client.jetstream().delete_stream(audit_stream_name("demo"))
            subject = Subjects("demo").setpoint_request
            for rid in ("lost-1", "lost-2"):
                await r.agent.publish(subject, request(rid, "ghost", "speed_setpoint", 0.9))
            await wait_for(_true(lambda: len(r.audit("lost-2")) == 1), 2.0, "the audit")
            await r.sup.wait_audit_stored(5)
            assert r.sup.stats.audit_failed == 2
            assert [a.reason for a in r.audit("lost-1")] == ["unknown_machine"]

    asyncio.run(main())


def test_heartbeat_stopping_trips_the_twin_watchdog(certs: Path, nats_server: EmbeddedNats) -> None:
    async def main() -> None:
        # A timeout of 4 heartbeat intervals, so a loaded CI machine does not trip it early;
        # the trip must then come within the timeout plus a scan and some scheduling slack.
        timeout = 2.0
        async with rig(certs, nats_server, watchdog_timeout_s=timeout) as r:
            await asyncio.sleep(timeout * 1.25)  # the heartbeat keeps it quiet past the timeout
            assert not r.twin.watchdog_alarm
            assert r.twin.run.all()
            r.sup.heartbeat_enabled = False
            start = time.monotonic()
            while not r.twin.watchdog_alarm:
                assert time.monotonic() - start < timeout + 1.5, "watchdog did not trip"
                await asyncio.sleep(0.02)
            assert time.monotonic() - start >= timeout - 0.6, "watchdog tripped too early"
            assert not r.twin.run.any()
            assert await r.value("mill-1", "run") is False
            # Beating again clears the alarm, and the supervisor takes the latched safe
            # state as what the plant holds.
            r.sup.heartbeat_enabled = True
            await wait_for(_true(lambda: r.sup.stats.watchdog_alarms > 0), 2.0, "alarm seen")
            assert not any(r.sup.state.value(m, "run") for m in r.sup.limits.machines)
            await wait_for(_true(lambda: not r.twin.watchdog_alarm), 1.0, "alarm cleared")

    asyncio.run(main())


def test_cli_override_and_estop(
    certs: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, loop_thread: Any
) -> None:
    monkeypatch.delenv("AUTOFAB_OPERATOR_TOKEN", raising=False)
    thread = loop_thread(15.0)
    runner = CliRunner()
    ctx = rig(certs, nats_server)
    nats_args = [
        "--nats-url", nats_server.url, "--user", nats_server.user,
        "--password", nats_server.password, "--token", TOKEN,
    ]  # fmt: skip
    subject = Subjects("demo").setpoint_request
    try:
        r = thread.call(ctx.__aenter__())

        async def send(req: SetpointRequest) -> None:
            await r.agent.publish(subject, req)
            await r.agent.flush()

        async def settle(rid: str) -> list[AuditRecord]:
            await wait_for(_true(lambda: bool(r.audit(rid))), 2.0, f"audit of {rid}")
            return r.audit(rid)

        result = runner.invoke(app, ["supervisor", "override", "mill-1", *nats_args])
        assert result.exit_code == 0, result.output
        assert "operator holds mill-1" in result.output
        thread.call(send(request("agent-1", "mill-1", "speed_setpoint", 0.7)))
        (audit,) = thread.call(settle("agent-1"))
        assert audit.reason == "manual_override"
        assert thread.call(r.value("mill-1", "speed_setpoint")) == pytest.approx(1.0)
        thread.call(send(request("op-1", "mill-1", "speed_setpoint", 0.7, origin="operator")))
        assert thread.call(settle("op-1"))[-1].outcome == "applied"

        bad = runner.invoke(app, ["supervisor", "estop", *nats_args[:-1], "wrong"])
        assert bad.exit_code == 3
        assert thread.call(r.value("lathe-1", "run")) is True

        result = runner.invoke(app, ["supervisor", "estop", *nats_args])
        assert result.exit_code == 0, result.output
        assert not r.twin.run.any()
        thread.call(send(request("agent-2", "lathe-1", "run", 1.0)))
        assert thread.call(settle("agent-2"))[0].reason == "estop"
        assert not r.twin.run.any()

        result = runner.invoke(app, ["supervisor", "release", *nats_args])
        assert result.exit_code == 0
        assert "estop: off" in result.output
        result = runner.invoke(app, ["supervisor", "release", "mill-1", *nats_args])
        assert result.exit_code == 0
        assert "overrides: none" in result.output
    finally:
        thread.call(ctx.__aexit__(None, None, None))


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


@pytest.mark.slow
def test_plant_restart_reconnects_and_writes_no_stale_value(
    certs: Path, nats_server: EmbeddedNats
) -> None:
    async def main() -> None:
        port = free_port()
        settings = SupervisorSettings(
            heartbeat_interval_s=0.1, reconnect_min_s=0.1, reconnect_max_s=0.4
        )
        async with rig(certs, nats_server, settings=settings, port=port) as r:
            nodemap_path = r.twin.nodemap_path
            await r.view.disconnect()
            await r.twin.stop()
            await wait_for(_true(lambda: not r.sup.connected), 3.0, "link loss noticed")
            now = time.time()
            await r.sup.process(
                [
                    request("short", "mill-1", "speed_setpoint", 0.7, ttl=0.3, at=now),
                    request("long", "lathe-1", "speed_setpoint", 0.75, ttl=30, at=now),
                ]
            )
            await asyncio.sleep(0.6)  # "short" expires while the plant is away
            twin2 = PlantTwin(
                DEMO,
                TwinSettings(port=port, cert_dir=certs, nodemap_path=nodemap_path, speedup=1.0),
            )
            async with twin2:
                await r.sup.wait_connected(5)
                view = await reader(twin2.endpoint, certs)
                try:
                    assert twin2.nodemap is not None
                    node = view.get_node(twin2.nodemap.node_id("lathe-1", "speed_setpoint"))
                    await wait_for(
                        lambda: _all(node.read_value(), 0.75), 2.0, "valid value after reconnect"
                    )
                    mill = view.get_node(twin2.nodemap.node_id("mill-1", "speed_setpoint"))
                    await asyncio.sleep(0.3)
                    assert await mill.read_value() == pytest.approx(1.0)  # never the stale 0.7
                finally:
                    await view.disconnect()
            assert [a.write_status for a in r.audit("short")] == ["expired_unwritten"]
            assert r.sup.stats.connects >= 2

    asyncio.run(main())


# --- a "real plant": another address space, another node map -----------------------------


async def _real_plant(cert_dir: Path) -> tuple[Server, NodeMap, dict[str, Any]]:
    """An OPC UA server laid out as a PLC vendor might: numeric NodeIds, Float speeds,
    other folder names; and the node map an integrator would write for it."""
    uri = "urn:acme:plc"
    files = ensure_server_files(cert_dir, uri)
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/acme"
    server = Server()
    await server.init()
    server.set_endpoint(endpoint)
    await server.set_application_uri(uri)
    await server.load_certificate(str(files.certificate))
    await server.load_private_key(str(files.private_key))
    server.set_security_policy(list(SECURE_POLICIES), permission_ruleset=TwinPermissionRuleset())
    server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
    server.iserver.set_user_manager(TwinUserManager(files.username, files.password))
    idx = await server.register_namespace(uri)
    plc = await server.nodes.objects.add_folder(ua.NodeId(1, idx), "PLC_01")
    nodes: dict[str, Any] = {}
    counter = iter(range(100, 10_000))

    async def var(parent: Any, name: str, value: Any, vtype: ua.VariantType) -> str:
        node = await parent.add_variable(
            ua.NodeId(next(counter), idx), name, ua.Variant(value, vtype)
        )
        await node.set_writable()
        nodes[node.nodeid.to_string()] = node
        return node.nodeid.to_string()

    plant_vars = {
        "power": await var(plc, "P_total", 0.0, ua.VariantType.Double),
        "tariff": await var(plc, "Tariff", 0.0, ua.VariantType.Double),
        "plant_time": await var(plc, "T_plant", 0.0, ua.VariantType.Double),
        "watchdog_heartbeat": await var(plc, "WD_Counter", 0, ua.VariantType.Int64),
        "watchdog_alarm": await var(plc, "WD_Alarm", False, ua.VariantType.Boolean),
    }
    machines: dict[str, Any] = {}
    for machine in ("press-7", "press-8"):
        obj = await plc.add_object(ua.NodeId(next(counter), idx), f"DB_{machine}")
        ids: dict[str, str] = {}
        for v in MACHINE_VARIABLES:
            if v == "speed_setpoint":
                ids[v] = await var(obj, "SpeedSP", 1.0, ua.VariantType.Float)
            elif v in ("run", "maintenance_request"):
                ids[v] = await var(obj, f"CMD_{v}", v == "run", ua.VariantType.Boolean)
            elif v == "state":
                ids[v] = await var(obj, "Status", 0, ua.VariantType.Int32)
            else:
                ids[v] = await var(obj, f"X_{v}", 0.0, ua.VariantType.Double)
        machines[machine] = {"line": "press-shop", "nodes": ids}
    assert set(plant_vars) == set(PLANT_VARIABLES)
    nodemap = NodeMap.from_dict(
        {
            "schema": 1, "plant": "acme", "endpoint": endpoint, "namespace_uri": uri,
            "plant_variables": plant_vars, "machines": machines,
        },
        source="hand-written node map",
    )  # fmt: skip
    await server.start()
    return server, nodemap, nodes


def test_real_plant_with_its_own_address_space(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    press = MachineLimits(
        speed_min=0.5, speed_nominal=1.0, speed_max=1.5, idle_kw=1.0, load_kw=5.0, exponent=2.0,
        down_kw=0.5,
    )  # fmt: skip
    lim = SupervisorLimits(
        machines={"press-7": press, "press-8": press},
        power_cap={"peak_cap_kw": 100.0},  # type: ignore[arg-type]
        speed_setpoint={"max_rate_per_second": 100.0},  # type: ignore[arg-type]
    )

    async def main() -> None:
        server, nodemap, nodes = await _real_plant(tmp_path)
        try:
            sup = SupervisorRuntime(
                limits=lim,
                nodemap=nodemap,
                credentials=PlantCredentials.from_cert_dir(tmp_path),
                nats=nats_server.endpoint,
                operator_token=TOKEN,
                settings=SupervisorSettings(heartbeat_interval_s=0.1),
            )
            async with sup, Bus(nats_server.endpoint) as agent:
                await sup.wait_connected(10)
                # On connect the supervisor takes the plant's values as just applied; give
                # the rate limit (100/s) the few ms a 0.25 step needs, so nothing is clamped.
                await asyncio.sleep(0.05)
                subject = Subjects("acme").setpoint_request
                await agent.publish(subject, request("p1", "press-7", "speed_setpoint", 1.25))
                await agent.publish(subject, request("p2", "press-8", "run", 0.0))
                speed = nodes[nodemap.node_id("press-7", "speed_setpoint")]
                run = nodes[nodemap.node_id("press-8", "run")]
                beat = nodes[nodemap.plant_node_id("watchdog_heartbeat")]
                await wait_for(
                    lambda: _all(speed.read_value(), 1.25, run.read_value(), False),
                    2.0,
                    "writes on the real plant",
                )
                assert await speed.read_data_type_as_variant_type() == ua.VariantType.Float
                first = await beat.read_value()
                await asyncio.sleep(0.35)
                assert await beat.read_value() > first  # the heartbeat goes to WD_Counter
                await asyncio.sleep(0.05)
                (rec,) = [a for a in sup.audit_log if a.request_id == "p1" and a.write_status]
                assert rec.write_status == "written"
                assert not rec.mismatch
        finally:
            await server.stop()

    asyncio.run(main())


def test_operator_token_file_is_private_and_the_cli_needs_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("AUTOFAB_OPERATOR_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["supervisor", "estop", "--nats-url", "nats://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "no operator token" in result.output
    token = ensure_operator_token("demo")
    path = operator_token_file("demo")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_operator_token("demo") == token == read_operator_token("demo")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users"):
        read_operator_token("demo")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("readback_idle_s", -0.1, ">= 0"),
        ("readback_max_delay_s", math.nan, ">= 0"),
        ("heartbeat_interval_s", 0.0, "> 0"),
        ("batch_window_s", math.inf, ">= 0"),
    ],
)
def test_bad_settings_name_the_key(key: str, value: float, expected: str) -> None:
    with pytest.raises(ValueError, match=f"SupervisorSettings.{key}: expected seconds {expected}"):
        SupervisorSettings(**{key: value})
    SupervisorSettings(readback_idle_s=0.0, readback_max_delay_s=0.0)  # read back every write
