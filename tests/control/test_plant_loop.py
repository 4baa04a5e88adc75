"""The plant side of ``autofab run``: the twin run by agents, the model's abort, the gateway.

Real servers on loopback: the asyncua twin, asyncua clients, and the embedded nats-server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from autofab.agents.protocol import Subjects, Telemetry, decode
from autofab.control.bus import Bus
from autofab.control.gateway import TelemetryGateway, telemetry_from_values
from autofab.control.natsd import EmbeddedNats, NatsEndpoint
from autofab.control.opcua.nodemap import (
    MACHINE_VARIABLES,
    MACHINE_WORK_VARIABLES,
    NodeMap,
    NodeMapError,
    load_nodemap,
)
from autofab.control.opcua.security import secure_client
from autofab.control.opcua.twin import PlantTwin, TwinSettings
from autofab.control.opcua.writer import PlantCredentials
from autofab.envs.factory_model import FactoryModel, MachineStatus
from autofab.envs.plant import load_plant

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _settings(certs: Path, **kw: Any) -> TwinSettings:
    kw.setdefault("speedup", 600.0)
    kw.setdefault("tick_s", 0.05)
    kw.setdefault("dispatch", "agents")
    return TwinSettings(cert_dir=certs, nodemap_path=certs / f"nodemap-{id(kw)}.json", **kw)


async def _supervisor_client(twin: PlantTwin) -> Client:
    """The supervisor's session: its login over SignAndEncrypt, as the runtime opens it."""
    login = PlantCredentials.from_cert_dir(twin.cert_dir)
    client = await secure_client(twin.endpoint, twin.cert_dir, "supervisor-client", timeout=5)
    client.set_user(login.username)
    client.set_password(login.password)
    await client.connect()
    return client


def _first_startable(model: FactoryModel) -> tuple[int, int]:
    """(machine, job): a job some machine could start now, advancing time until one can."""
    for _ in range(1000):
        for m in range(model.plant.n_machines):
            jobs = model.candidates(m)
            if len(jobs):
                return m, int(jobs[0])
        model.run_until(model.now + 60.0)
    raise AssertionError("no job became startable")


async def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_agents_mode_runs_only_what_it_is_told(certs: Path) -> None:
    async def main() -> None:
        async with PlantTwin(load_plant(DEMO), _settings(certs)) as twin:
            model = twin.model
            m, job = _first_startable(model)
            await asyncio.sleep(0.3)  # several scans: nothing starts on its own
            assert not (model.status == MachineStatus.RUNNING).any()
            name = model.plant.machine_names[m]
            node = twin.nodemap.node_id(name, "start_job") if twin.nodemap else ""
            client = await _supervisor_client(twin)
            try:
                await client.get_node(node).write_value(ua.Variant(job, ua.VariantType.Int64))
                await _wait(lambda: model.status[m] == MachineStatus.RUNNING)
                op = int(model.machine_op[m])
                assert int(model.instance.op_job[op]) == job
                job_node = client.get_node(twin.nodemap.node_id(name, "job"))
                await _wait(lambda: twin.last_job[m] == job, timeout=20)
                assert twin.last_op[m] == 0
                await asyncio.sleep(0.2)
                assert await job_node.read_value() == -1
                last = client.get_node(twin.nodemap.node_id(name, "last_job"))
                assert await last.read_value() == job
                # A start_job out of range is refused like any PLC range check.
                with pytest.raises(UaStatusCodeError) as info:
                    await client.get_node(node).write_value(ua.Variant(10**9, ua.VariantType.Int64))
                assert info.value.code == ua.StatusCodes.BadOutOfRange
                # A Double is the wrong type for an order number.
                with pytest.raises(UaStatusCodeError) as info:
                    await client.get_node(node).write_value(ua.Variant(1.0, ua.VariantType.Double))
                assert info.value.code == ua.StatusCodes.BadTypeMismatch
            finally:
                await client.disconnect()

    asyncio.run(main())


def test_local_mode_refuses_start_job(certs: Path) -> None:
    async def main() -> None:
        async with PlantTwin(load_plant(DEMO), _settings(certs, dispatch="local")) as twin:
            assert twin.nodemap is not None
            name = twin.model.plant.machine_names[0]
            client = await _supervisor_client(twin)
            try:
                node = client.get_node(twin.nodemap.node_id(name, "start_job"))
                with pytest.raises(UaStatusCodeError) as info:
                    await node.write_value(ua.Variant(0, ua.VariantType.Int64))
                assert info.value.code == ua.StatusCodes.BadNotSupported
            finally:
                await client.disconnect()

    asyncio.run(main())


def test_broken_machine_hands_its_operation_back() -> None:
    model = FactoryModel.from_config(load_plant(DEMO), seed=3)
    m, job = _first_startable(model)
    model.decide(m, job)
    op = int(model.machine_op[m])
    model.budget[m] = 0.0  # the next event is a breakdown
    model.run_until(model.now + 1.0)
    assert model.status[m] == MachineStatus.DOWN
    assert model.abort_operation(m) == job
    assert model.job_next[job] == op
    assert model.work_left[m] == 0.0
    assert model.abort_operation(m) is None  # nothing left to hand back
    others = [k for k in range(model.plant.n_machines) if k != m and job in model.candidates(k)]
    twins = [k for k in range(model.plant.n_machines) if model._eligible[op, k] and k != m]
    assert others == twins  # every other eligible idle machine may take it now
    while model.status[m] == MachineStatus.DOWN:
        model.run_until(model.now + 600.0)
    assert model.status[m] == MachineStatus.IDLE  # repaired with nothing to resume


def test_nodemap_without_operation_interface_is_named() -> None:
    nodes = {v: f"ns=2;s=m1.{v}" for v in MACHINE_VARIABLES}
    plant = {v: f"ns=2;s={v}" for v in ("power", "tariff", "plant_time")}
    plant |= {"watchdog_heartbeat": "ns=2;s=hb", "watchdog_alarm": "ns=2;s=al"}
    data = {
        "schema": 1,
        "plant": "p",
        "endpoint": "opc.tcp://127.0.0.1:4840",
        "namespace_uri": "urn:x",
        "plant_variables": plant,
        "machines": {"m1": {"line": "l", "nodes": nodes}},
    }
    nodemap = NodeMap.from_dict(data)
    assert nodemap.missing_work_variables() == [f"m1.{v}" for v in MACHINE_WORK_VARIABLES]
    with pytest.raises(NodeMapError, match="lacks the operation interface"):
        TelemetryGateway(nodemap, Bus(NatsEndpoint("nats://127.0.0.1:1")), Path("."))


def test_telemetry_from_values_names_bad_readings() -> None:
    good = [1, 1.0, 2.0, 40.0, 9000.0, 3, 1.0, 60.0, 0, 4, 1, 2, 0, False]
    t = telemetry_from_values("mill-1", 120.0, good)
    assert (t.status, t.plant_job, t.plant_op, t.last_plant_job, t.ops_done) == (
        "running",
        4,
        1,
        2,
        3,
    )
    idle = list(good)
    idle[9] = -1
    assert telemetry_from_values("mill-1", 1.0, idle).plant_job is None
    with pytest.raises(ValueError, match="mill-1: unknown state code 9"):
        telemetry_from_values("mill-1", 1.0, [9, *good[1:]])
    bad = list(good)
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="mill-1: vibration"):
        telemetry_from_values("mill-1", 1.0, bad)


def test_gateway_publishes_plant_telemetry(certs: Path, nats_server: EmbeddedNats) -> None:
    async def main() -> None:
        config = load_plant(DEMO)
        async with PlantTwin(config, _settings(certs)) as twin:
            nodemap = load_nodemap(twin.nodemap_path)
            got: dict[str, Telemetry] = {}
            async with Bus(nats_server.endpoint) as bus:
                subjects = Subjects(config.name)

                async def on(msg: Any) -> None:
                    t = decode(msg.subject, msg.data)
                    assert isinstance(t, Telemetry)
                    got[t.machine] = t

                await bus.client.subscribe(subjects.telemetry_all, cb=on)
                gateway = TelemetryGateway(nodemap, bus, certs, period_s=0.02, refresh_s=0.2)
                task = asyncio.create_task(gateway.run())
                try:
                    await _wait(lambda: len(got) == twin.model.plant.n_machines)
                    first = max(t.plant_time for t in got.values())
                    await _wait(lambda: min(t.plant_time for t in got.values()) > first)
                    assert gateway.stats.connected
                    assert gateway.stats.bad_readings == 0
                    assert all(t.status == "idle" for t in got.values())
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_twin_order_book_matches_the_mes_feed() -> None:
    """The run's MES submits job j of the seeded book under plant_job j: same book."""
    from autofab.control.negotiate_cmd import config_orders

    config = load_plant(DEMO)
    model = FactoryModel.from_config(config, seed=5)
    orders = config_orders(config, 5)
    by_job = {int(o.submit.client_order_id.rsplit("-", 1)[1]) - 1: o for o in orders}
    assert sorted(by_job) == list(range(model.instance.n_jobs))
    for j, o in by_job.items():
        assert o.arrival_at == pytest.approx(float(model.instance.release[j]))
        product = config.products[int(model.orders.job_product[j])].name
        assert o.submit.items[0].product == product
    assert np.all(np.diff([o.arrival_at for o in orders]) >= 0)
