"""The OPC UA plant twin, tested with real asyncua servers and clients on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from typer.testing import CliRunner

from autofab.control.cli import app
from autofab.control.opcua.nodemap import (
    MACHINE_VARIABLES,
    PLANT_VARIABLES,
    NodeMapError,
    load_nodemap,
)
from autofab.control.opcua.security import (
    close_client,
    ensure_client_files,
    ensure_server_files,
    secure_client,
)
from autofab.control.opcua.twin import PlantTwin, TwinSettings
from autofab.envs.plant import load_plant

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def settings(certs: Path, **kw: Any) -> TwinSettings:
    kw.setdefault("speedup", 600.0)
    kw.setdefault("tick_s", 0.05)
    return TwinSettings(cert_dir=certs, nodemap_path=certs / f"nodemap-{id(kw)}.json", **kw)


async def _client(twin: PlantTwin, supervisor: bool = False, secure: bool = True) -> Client:
    client = Client(twin.endpoint, timeout=5)
    if secure:
        files = ensure_client_files(twin.cert_dir)
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(files.certificate),
            str(files.private_key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    if supervisor:
        login = json.loads((twin.cert_dir / "supervisor.json").read_text())
        client.set_user(login["username"])
        client.set_password(login["password"])
    await client.connect()
    return client


def run_twin(certs: Path, body: Callable[[PlantTwin], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with PlantTwin(load_plant(DEMO), settings(certs, **kw)) as twin:
            await body(twin)

    asyncio.run(main())


def test_address_space_has_lines_machines_units_and_ranges(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        client = await _client(twin)
        try:
            idx = await client.get_namespace_index(twin.namespace_uri)
            plant = await client.nodes.objects.get_child(f"{idx}:demo")
            names = {(await n.read_browse_name()).Name: n for n in await plant.get_children()}
            assert set(PLANT_VARIABLES) <= set(names)
            assert {"machining", "finishing"} <= set(names)
            line = names["machining"]
            assert await line.read_type_definition() == ua.NodeId(ua.ObjectIds.FolderType)
            machines = [(await m.read_browse_name()).Name for m in await line.get_children()]
            assert machines == ["mill-1", "mill-2", "lathe-1", "lathe-2"]
            mill = await line.get_child(f"{idx}:mill-1")
            assert await mill.read_node_class() == ua.NodeClass.Object
            for var in MACHINE_VARIABLES:
                await mill.get_child(f"{idx}:{var}")
            vib = await mill.get_child([f"{idx}:vibration", "0:EngineeringUnits"])
            eu = await vib.read_value()
            assert eu.DisplayName.Text == "mm/s"
            assert eu.UnitId == 4403510  # UN/CEFACT C16
            rng = await (await mill.get_child([f"{idx}:speed_setpoint", "0:EURange"])).read_value()
            assert (rng.Low, rng.High) == (0.6, 1.3)
            speed = await mill.get_child(f"{idx}:speed_setpoint")
            assert await speed.read_data_type_as_variant_type() == ua.VariantType.Double
            # The node map the twin wrote names exactly the server's NodeIds.
            nodemap = load_nodemap(twin.nodemap_path)
            assert nodemap.endpoint == twin.endpoint
            assert nodemap.node_id("mill-1", "speed_setpoint") == speed.nodeid.to_string()
            assert nodemap.machines["drill-2"].line == "finishing"
            for machine in nodemap.machines:
                for var in MACHINE_VARIABLES:
                    node = client.get_node(nodemap.node_id(machine, var))
                    assert (await node.read_browse_name()).Name == var
            for var in PLANT_VARIABLES:
                node = client.get_node(nodemap.plant_node_id(var))
                assert (await node.read_browse_name()).Name == var
        finally:
            await client.disconnect()

    run_twin(certs, body)


def test_telemetry_changes_as_plant_time_advances(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        client = await _client(twin)
        try:
            nm = twin.nodemap
            assert nm is not None
            clock = client.get_node(nm.plant_node_id("plant_time"))
            power = client.get_node(nm.plant_node_id("power"))
            t0 = await clock.read_value()
            await asyncio.sleep(0.5)
            t1 = await clock.read_value()
            assert t1 > t0 + 60  # 600x speedup: minutes of plant time per wall second
            assert await power.read_value() > 15_000  # base load alone is 15 kW
            states = [
                await client.get_node(nm.node_id(m, "state")).read_value() for m in nm.machines
            ]
            assert 1 in states  # the local dispatcher keeps machines running
            temps = [
                await client.get_node(nm.node_id(m, "temperature")).read_value()
                for m in nm.machines
            ]
            assert max(temps) > 25.5
        finally:
            await client.disconnect()

    run_twin(certs, body)


def test_supervisor_writes_speed_over_sign_and_encrypt(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        client = await _client(twin, supervisor=True)
        try:
            nm = twin.nodemap
            assert nm is not None
            node = client.get_node(nm.node_id("mill-1", "speed_setpoint"))
            await node.write_value(ua.Variant(1.2, ua.VariantType.Double))
            m = twin.model.plant.machine_names.index("mill-1")
            assert twin.model.speed[m] == pytest.approx(1.2)
            assert await node.read_value() == pytest.approx(1.2)
            # Out of the machine's EURange: refused, not clamped; the setpoint is unchanged.
            with pytest.raises(UaStatusCodeError) as err:
                await node.write_value(ua.Variant(2.5, ua.VariantType.Double))
            assert err.value.code == ua.StatusCodes.BadOutOfRange
            with pytest.raises(UaStatusCodeError) as err:
                await node.write_value(ua.Variant(float("nan"), ua.VariantType.Double))
            assert err.value.code == ua.StatusCodes.BadOutOfRange
            assert twin.model.speed[m] == pytest.approx(1.2)
            run = client.get_node(nm.node_id("mill-1", "run"))
            await run.write_value(ua.Variant(False, ua.VariantType.Boolean))
            assert not twin.run[m]
            # Telemetry is read-only, even for the supervisor.
            with pytest.raises(UaStatusCodeError):
                await client.get_node(nm.node_id("mill-1", "power")).write_value(1.0)
        finally:
            await client.disconnect()

    run_twin(certs, body)


def test_anonymous_reads_but_cannot_write_and_bad_login_is_refused(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        nm = twin.nodemap
        assert nm is not None
        client = await _client(twin)
        try:
            node = client.get_node(nm.node_id("mill-1", "speed_setpoint"))
            assert await node.read_value() == pytest.approx(1.0)
            with pytest.raises(UaStatusCodeError) as err:
                await node.write_value(ua.Variant(1.1, ua.VariantType.Double))
            assert err.value.code == ua.StatusCodes.BadUserAccessDenied
            beat = client.get_node(nm.plant_node_id("watchdog_heartbeat"))
            with pytest.raises(UaStatusCodeError):
                await beat.write_value(ua.Variant(1, ua.VariantType.Int64))
            m = twin.model.plant.machine_names.index("mill-1")
            assert twin.model.speed[m] == pytest.approx(1.0)
        finally:
            await client.disconnect()
        intruder = Client(twin.endpoint, timeout=5)
        files = ensure_client_files(twin.cert_dir)
        await intruder.set_security(
            SecurityPolicyBasic256Sha256, str(files.certificate), str(files.private_key)
        )
        intruder.set_user("supervisor")
        intruder.set_password("guess")
        with pytest.raises(UaStatusCodeError) as err:
            await intruder.connect()
        assert err.value.code == ua.StatusCodes.BadUserAccessDenied

    run_twin(certs, body)


def test_nosecurity_is_refused_unless_insecure_dev(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        endpoints = await Client(twin.endpoint, timeout=5).connect_and_get_server_endpoints()
        modes = {e.SecurityMode for e in endpoints}
        assert modes == {ua.MessageSecurityMode.SignAndEncrypt}
        uris = {e.SecurityPolicyUri.rsplit("#", 1)[-1] for e in endpoints}
        assert uris == {"Basic256Sha256", "Aes256_Sha256_RsaPss"}
        with pytest.raises(UaError, match="No matching endpoints"):
            await _client(twin, secure=False)

    run_twin(certs, body)

    async def insecure(twin: PlantTwin) -> None:
        # Development mode: a None endpoint exists, but writing still needs the login.
        client = await _client(twin, secure=False)
        try:
            node = client.get_node(twin.nodemap.node_id("mill-1", "run"))  # type: ignore[union-attr]
            with pytest.raises(UaStatusCodeError):
                await node.write_value(ua.Variant(False, ua.VariantType.Boolean))
        finally:
            await client.disconnect()

    run_twin(certs, insecure, insecure_dev=True)


def test_watchdog_trips_to_safe_state_and_clears_on_heartbeat(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        nm = twin.nodemap
        assert nm is not None
        client = await _client(twin, supervisor=True)
        try:
            beat = client.get_node(nm.plant_node_id("watchdog_heartbeat"))
            alarm = client.get_node(nm.plant_node_id("watchdog_alarm"))
            await beat.write_value(ua.Variant(1, ua.VariantType.Int64))
            start = time.monotonic()
            while not await alarm.read_value():
                assert time.monotonic() - start < 0.4 + 1.0, "watchdog did not trip"
                await asyncio.sleep(0.05)
            assert time.monotonic() - start >= 0.4
            assert not twin.run.any()
            assert not await client.get_node(nm.node_id("mill-1", "run")).read_value()
            run = client.get_node(nm.node_id("mill-1", "run"))
            with pytest.raises(UaStatusCodeError) as err:
                await run.write_value(ua.Variant(True, ua.VariantType.Boolean))
            assert err.value.code == ua.StatusCodes.BadInvalidState
            await beat.write_value(ua.Variant(2, ua.VariantType.Int64))
            assert not twin.watchdog_alarm
            assert not twin.run.any()  # latched: setpoints must be sent again
            await run.write_value(ua.Variant(True, ua.VariantType.Boolean))
            m = twin.model.plant.machine_names.index("mill-1")
            assert twin.run[m]
        finally:
            await client.disconnect()

    run_twin(certs, body, watchdog_timeout_s=0.4)


def test_watchdog_safe_speed(certs: Path) -> None:
    async def body(twin: PlantTwin) -> None:
        twin._heartbeat(7)
        twin._last_beat_wall = time.monotonic() - 1.0
        assert twin._watchdog(time.monotonic())
        assert twin.watchdog_alarm
        assert (twin.model.speed == twin.model.plant.speed_min).all()
        assert twin.run.all()

    run_twin(certs, body, watchdog_timeout_s=0.2, safe_state="safe_speed")


def test_key_files_are_private_and_open_keys_refused(tmp_path: Path, certs: Path) -> None:
    for name in ("server-key.pem", "supervisor.json", "supervisor-client-key.pem"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    copy = tmp_path / "c"
    copy.mkdir()
    for f in certs.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
            os.chmod(copy / f.name, 0o600)
    os.chmod(copy / "server-key.pem", 0o644)
    with pytest.raises(ValueError, match=r"server-key\.pem.*0600"):
        ensure_server_files(copy, "urn:x")


def test_nodemap_validation_errors(tmp_path: Path, certs: Path) -> None:
    path = tmp_path / "nm.json"
    with pytest.raises(NodeMapError, match="cannot read node map"):
        load_nodemap(path)
    path.write_text("{not json")
    with pytest.raises(NodeMapError, match="not valid JSON"):
        load_nodemap(path)
    good = {
        "schema": 1,
        "plant": "demo",
        "endpoint": "opc.tcp://127.0.0.1:1/x",
        "namespace_uri": "urn:x",
        "plant_variables": {v: f"ns=2;s=demo.{v}" for v in PLANT_VARIABLES},
        "machines": {
            "m1": {"line": "l", "nodes": {v: f"ns=2;s=m1.{v}" for v in MACHINE_VARIABLES}}
        },
    }
    path.write_text(json.dumps(good))
    nm = load_nodemap(path)
    assert nm.node_id("m1", "run") == "ns=2;s=m1.run"
    with pytest.raises(NodeMapError, match="no machine 'm9'"):
        nm.node_id("m9", "run")
    with pytest.raises(NodeMapError, match="no variable 'spd'"):
        nm.node_id("m1", "spd")
    del good["machines"]["m1"]["nodes"]["speed_setpoint"]  # type: ignore[index]
    path.write_text(json.dumps(good))
    with pytest.raises(NodeMapError, match=r"machines\.m1\.nodes: missing speed_setpoint"):
        load_nodemap(path)
    good["machines"]["m1"]["nodes"]["speed_setpoint"] = "not a node"  # type: ignore[index]
    path.write_text(json.dumps(good))
    with pytest.raises(NodeMapError, match="speed_setpoint: expected a NodeId"):
        load_nodemap(path)
    good["schema"] = 9
    path.write_text(json.dumps(good))
    with pytest.raises(NodeMapError, match="'schema': expected 1, got 9"):
        load_nodemap(path)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"speedup": 0.0}, "speedup: expected a positive number"),
        ({"port": 70000}, "port: expected 0"),
        ({"watchdog_timeout_s": -1.0}, "watchdog_timeout_s"),
        ({"safe_state": "explode"}, "safe_state: expected 'stop' or 'safe_speed'"),
        ({"host": "0.0.0.0"}, "loopback only"),
    ],
)
def test_bad_settings_are_named(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TwinSettings(**kw)


def test_cli_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["plant", "serve", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    result = runner.invoke(
        app, ["plant", "serve", str(DEMO), "--speedup", "-1", "--cert-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "speedup: expected a positive number" in result.output
    result = runner.invoke(
        app, ["plant", "serve", str(DEMO), "--safe-state", "boom", "--cert-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "safe_state" in result.output


def test_close_client_is_bounded_when_the_server_stops_answering(
    certs: Path, loop_thread: Callable[[float], Any]
) -> None:
    """A server that holds the link open but never answers must not hang our shutdown:
    ``close_client`` gives up on the polite close after its timeout and drops the socket,
    where asyncua's own ``disconnect`` waits out the client's request timeout (5 s here)."""
    server = loop_thread(30.0)
    twin = PlantTwin(load_plant(DEMO), settings(certs))
    server.call(twin.__aenter__())
    release = threading.Event()
    try:

        async def main() -> float:
            client = await _client(twin)  # its request timeout: 5 s
            assert await client.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value() == 0
            # Freeze the server's event loop: the socket stays open, nothing answers.
            server.loop.call_soon_threadsafe(release.wait, 20.0)
            started = time.monotonic()
            await close_client(client, timeout=0.5)
            return time.monotonic() - started

        assert asyncio.run(main()) < 2.5
    finally:
        release.set()
        server.call(twin.__aexit__(None, None, None))


def test_a_server_stall_shorter_than_the_request_timeout_keeps_the_link(
    certs: Path, loop_thread: Callable[[float], Any]
) -> None:
    """asyncua probes a connected server every second and, by default, drops the link when
    a probe takes over a second. Our clients give a plant their request timeout (4 s)
    instead, so a loaded server that stalls for under that keeps the link (an early CI
    flake: the supervisor lost the twin while the shared machine was busy)."""
    server = loop_thread(30.0)
    twin = PlantTwin(load_plant(DEMO), settings(certs))
    server.call(twin.__aenter__())
    try:

        async def main() -> list[Exception]:
            lost: list[Exception] = []

            async def on_lost(error: Exception) -> None:
                lost.append(error)

            client = await secure_client(twin.endpoint, twin.cert_dir, "supervisor-client")
            client.connection_lost_callback = on_lost
            await client.connect()
            try:
                state = client.get_node(ua.ObjectIds.Server_ServerStatus_State)
                assert await state.read_value() == 0
                server.loop.call_soon_threadsafe(time.sleep, 2.0)  # the server stalls 2 s
                await asyncio.sleep(3.0)
                assert await state.read_value() == 0
            finally:
                await close_client(client)
            return lost

        assert asyncio.run(main()) == []
    finally:
        server.call(twin.__aexit__(None, None, None))
