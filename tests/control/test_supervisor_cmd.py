"""``autofab supervisor run`` against real servers on loopback: nats-server with JetStream
and the OPC UA plant twin; bad input through typer's CliRunner."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from typer.testing import CliRunner

from autofab.agents.protocol import SetpointRequest, Subjects
from autofab.control.bus import Bus
from autofab.control.cli import app
from autofab.control.natsd import EmbeddedNats
from autofab.control.opcua.twin import PlantTwin, TwinSettings, free_port
from autofab.control.supervisor_cmd import (
    SupervisorRun,
    load_limits,
    prepare_run,
    serve_supervisor,
    status_line,
)
from autofab.control.supervisor_runtime import SupervisorRuntime, SupervisorStats
from autofab.envs.plant import load_plant

DEMO = load_plant("demo")
TOKEN = "test-operator-token"
T = TypeVar("T")


@contextmanager
def twin_in_thread(certs: Path, thread: Any) -> Iterator[PlantTwin]:
    """A running plant twin on ``thread``'s loop; its node map is written into ``certs``."""
    settings = TwinSettings(
        cert_dir=certs,
        nodemap_path=certs / f"nm-{time.monotonic_ns()}.json",
        speedup=1.0,
        tick_s=0.05,
    )
    twin = PlantTwin(DEMO, settings)
    thread.call(twin.__aenter__())
    try:
        yield twin
    finally:
        thread.call(twin.__aexit__(None, None, None))


def request(rid: str, machine: str, variable: str, value: float) -> SetpointRequest:
    return SetpointRequest(
        request_id=rid,
        machine=machine,
        variable=variable,
        value=value,
        requested_at=time.time(),
        ttl_seconds=5.0,
        origin="agent",
    )


LIMITS_YAML = """\
speed_setpoint: {mode: clamp, min: 0.8, max_rate_per_second: 100.0}
machines:
  lathe-1: {speed_min: 0.85}
"""


def test_run_core_takes_requests_from_nats_to_the_twin(
    certs: Path, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    limits_file = tmp_path / "limits.yaml"
    limits_file.write_text(LIMITS_YAML)

    async def main() -> None:
        settings = TwinSettings(
            cert_dir=certs, nodemap_path=tmp_path / "nodemap.json", speedup=1.0, tick_s=0.05
        )
        async with PlantTwin(DEMO, settings) as twin:
            run = prepare_run(
                "demo", plant=None, endpoint=twin.endpoint, nodemap_path=twin.nodemap_path,
                cert_dir=certs, limits_file=limits_file, nats=lambda _: nats_server.endpoint,
                token=TOKEN,
            )  # fmt: skip
            assert run.plant == "demo"
            assert run.limits.speed_bounds("lathe-1") == (0.85, 1.3)
            stop = asyncio.Event()
            ready = asyncio.Event()
            lines: list[str] = []

            def on_ready(sup: SupervisorRuntime) -> None:
                assert sup.connected
                ready.set()

            task = asyncio.create_task(
                serve_supervisor(
                    run, stop, on_ready=on_ready, on_status=lines.append, status_every_s=0.05
                )
            )
            await asyncio.wait_for(ready.wait(), 15)
            subject = Subjects("demo").setpoint_request
            async with Bus(nats_server.endpoint) as agent:
                await agent.publish(subject, request("c1", "mill-1", "speed_setpoint", 0.9))
                await agent.publish(subject, request("c2", "mill-2", "speed_setpoint", 0.7))
                await agent.publish(subject, request("c3", "lathe-1", "speed_setpoint", 0.82))
                await agent.flush()
            names = twin.model.plant.machine_names
            want = {"mill-1": 0.9, "mill-2": 0.8, "lathe-1": 0.85}  # two clamped to the limits
            deadline = time.monotonic() + 3.0
            while any(
                abs(float(twin.model.speed[names.index(m)]) - v) > 1e-6 for m, v in want.items()
            ):
                assert time.monotonic() < deadline, "setpoints did not reach the twin"
                await asyncio.sleep(0.02)
            while "1 applied, 2 clamped" not in lines[-1]:
                assert time.monotonic() < deadline + 2, lines[-1:]
                await asyncio.sleep(0.02)
            assert "link: up" in lines[-1]
            stop.set()
            stats: SupervisorStats = await asyncio.wait_for(task, 10)
            assert stats.heartbeats >= 1
            assert stats.audit_failed == 0

    asyncio.run(main())


def test_cli_runs_until_ctrl_c(
    certs: Path, nats_server: EmbeddedNats, tmp_path: Path, loop_thread: Any
) -> None:
    """The real command in a subprocess: ready line, a request applied, SIGINT, clean exit."""
    limits_file = tmp_path / "limits.yaml"
    limits_file.write_text(LIMITS_YAML)
    with twin_in_thread(certs, loop_thread(30.0)) as twin:
        env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
        env.pop("AUTOFAB_OPERATOR_TOKEN", None)
        proc = subprocess.Popen(
            [
                sys.executable, "-c", "from autofab.control.cli import app; app()",
                "supervisor", "run", "demo", "--endpoint", twin.endpoint,
                "--nodemap", str(twin.nodemap_path), "--cert-dir", str(certs),
                "--limits", str(limits_file), "--nats-url", nats_server.url,
                "--user", nats_server.user or "", "--password", nats_server.password or "",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("supervisor ready: endpoint " + twin.endpoint), first
            assert "SignAndEncrypt" in first
            assert "audit stream AUTOFAB_DEMO_AUDIT" in first
            assert str(tmp_path / "autofab" / "demo.operator-token") in first

            async def send() -> None:
                async with Bus(nats_server.endpoint) as agent:
                    req = request("cli-1", "mill-2", "speed_setpoint", 0.95)
                    await agent.publish(Subjects("demo").setpoint_request, req)
                    await agent.flush()

            asyncio.run(send())
            m = twin.model.plant.machine_names.index("mill-2")
            deadline = time.monotonic() + 5.0
            while abs(float(twin.model.speed[m]) - 0.95) > 1e-6:
                assert time.monotonic() < deadline, "the request did not reach the twin"
                time.sleep(0.02)
            time.sleep(0.6)  # one status refresh after the write
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert "1 applied" in out
        assert "Traceback" not in out


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["supervisor", "run", "demo", *args])
    return result.exit_code, result.output


def test_bad_input_is_one_line_and_exit_2(certs: Path, tmp_path: Path) -> None:
    nats = ["--nats-url", "nats://127.0.0.1:1", "--token", TOKEN]
    code, out = _invoke(
        "--nodemap", str(tmp_path / "missing.json"), "--cert-dir", str(certs), *nats
    )
    assert code == 2
    assert "cannot read node map" in out
    assert "missing.json" in out
    assert len(out.strip().splitlines()) == 1

    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("speed_setpoint: {maxx: 1.0}\n")
    code, out = _invoke("--limits", str(bad_key), *nats)
    assert code == 2
    assert "speed_setpoint.maxx: unknown key" in out
    assert len(out.strip().splitlines()) == 1

    bad_machine = tmp_path / "machine.yaml"
    bad_machine.write_text("machines: {mill-9: {speed_max: 1.0}}\n")
    code, out = _invoke("--limits", str(bad_machine), *nats)
    assert code == 2
    assert "machines.mill-9: no such machine" in out

    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("speed_setpoint: [1,\n")
    code, out = _invoke("--limits", str(not_yaml), *nats)
    assert code == 2
    assert "is not valid YAML" in out


def test_unreachable_endpoint_and_wrong_login_exit_2(
    certs: Path, tmp_path: Path, loop_thread: Any
) -> None:
    nats = ["--nats-url", "nats://127.0.0.1:1", "--token", TOKEN]
    with twin_in_thread(certs, loop_thread(30.0)) as twin:
        nodemap = str(twin.nodemap_path)
        wrong = tmp_path / "wrong-login"
        shutil.copytree(certs, wrong)
        login = json.loads((wrong / "supervisor.json").read_text())
        (wrong / "supervisor.json").write_text(json.dumps({**login, "password": "not-it"}))
        code, out = _invoke(
            "--endpoint", twin.endpoint, "--nodemap", nodemap, "--cert-dir", str(wrong), *nats
        )
        assert code == 2, out
        assert "refused the supervisor login" in out
        assert len(out.strip().splitlines()) == 1
    nowhere = f"opc.tcp://127.0.0.1:{free_port()}/autofab/demo"
    started = time.monotonic()
    code, out = _invoke(
        "--endpoint", nowhere, "--nodemap", nodemap, "--cert-dir", str(certs), "--timeout", "2",
        *nats,
    )  # fmt: skip
    assert code == 2, out
    assert f"the plant at {nowhere}" in out
    assert len(out.strip().splitlines()) == 1
    assert time.monotonic() - started < 10
    code, out = _invoke("--endpoint", "http://x", "--nodemap", nodemap, "--cert-dir", str(certs))
    assert code == 2
    assert "--endpoint: expected an opc.tcp://" in out


def test_limits_yaml_merges_per_machine(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS_YAML + "power_cap: {mode: reject, peak_cap_kw: 40}\n")
    limits = load_limits(DEMO, path)
    assert limits.machines["lathe-1"].speed_min == 0.85
    assert limits.machines["lathe-1"].speed_max == 1.3  # untouched keys stay the plant's
    assert limits.power_cap.mode == "reject"
    assert limits.power_cap.peak_cap_kw == 40
    assert limits.power_cap.base_load_kw == DEMO.energy.base_load_kw
    assert load_limits(DEMO, None) == load_limits(DEMO, _empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


def test_run_spec_hides_the_token() -> None:
    fields = {f.name: f for f in SupervisorRun.__dataclass_fields__.values()}
    assert fields["operator_token"].repr is False


def test_status_line_shows_lost_audit_records_only_when_there_are_some() -> None:
    stats = SupervisorStats()
    stats.decisions[("applied", "ok")] += 2
    stats.writes["Good"] += 2
    line = status_line(stats, connected=True)
    assert line == (
        "requests: 2 applied, 0 clamped, 0 rejected; heartbeats: 0; writes: 2; link: up"
    )
    stats.audit_failed = 3
    assert status_line(stats, connected=False).endswith(
        "link: DOWN (reconnecting); AUDIT RECORDS LOST: 3"
    )
