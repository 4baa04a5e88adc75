"""``autofab run`` on the real stack: local Ray, the embedded nats-server, the OPC UA twin.

The end-to-end run is in the default test run (CI); the fault-injection runs (a machine
actor killed, the supervisor killed, nats-server restarted) take a minute each and are
marked ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import CliRunner

from autofab.control.cli import app
from autofab.control.run_cmd import PlantRun, RunSettings
from autofab.envs.plant import load_plant

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Certificates, tokens and runtime files in this test's own folders."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    return tmp_path


def _nats_servers() -> set[int]:
    """nats-server processes this test process started (others may run beside it)."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.name().startswith("nats-server")
    }


def _good_ops_at_most_once(run: PlantRun) -> None:
    """Every operation the plant finished well was finished once per part attempt: a
    second good completion of the same job and operation only after that job was scrapped
    (its route restarts) or the operation reworked."""
    assert run.twin is not None
    attempts = run.twin.model.attempts
    scrapped = Counter(a["job"] for a in attempts if a["defective"])
    good = Counter((a["job"], a["index"]) for a in attempts if not a["defective"])
    for (job, op), n in good.items():
        assert n <= 1 + scrapped[job], f"job {job} op {op} done {n} times"


def _run(
    settings: RunSettings,
    during: Callable[[PlantRun], Awaitable[None]] | None = None,
) -> tuple[str, dict[str, Any], PlantRun]:
    async def main() -> tuple[str, dict[str, Any], PlantRun]:
        async with PlantRun(load_plant(DEMO), settings) as run:
            side = asyncio.create_task(during(run)) if during else None
            outcome = await run.run_until_done()
            if side is not None:
                await side
            return outcome, run.report(), run

    return asyncio.run(main())


def test_run_end_to_end_on_the_real_stack(private_dirs: Path, tmp_path: Path) -> None:
    from autofab.control.policy_cmd import deploy_policy

    before = _nats_servers()
    answers: dict[str, list[Any]] = {}
    bad = tmp_path / "bad-policy.npz"
    bad.write_bytes(b"not a policy")

    async def swap_policies(run: PlantRun) -> None:
        """`autofab policy deploy` while the plant runs: a good one is taken by every
        machine host, a broken file is refused by each and the good one stays."""
        assert run.endpoint is not None
        plant = run.config.name
        answers["good"] = await deploy_policy(run.endpoint, plant, "default", 10.0, "t", 2)
        answers["bad"] = await deploy_policy(run.endpoint, plant, str(bad), 10.0, "t", 2)

    settings = RunSettings(duration_s=3 * 3600.0, speedup=900.0, seed=1)
    outcome, report, run = _run(settings, swap_policies)
    assert outcome == "done"
    hosts = {"line-machining", "line-finishing"}
    assert {a.host for a in answers["good"]} == hosts
    assert all(a.ok for a in answers["good"])
    assert {a.host for a in answers["bad"]} == hosts
    assert not any(a.ok for a in answers["bad"])
    assert all("bad-policy.npz" in a.detail for a in answers["bad"])
    for host in hosts:
        assert run.last_stats[host]["policy"] == "default"  # the old one stayed
    for key in (
        "agents_ready_s",
        "parts_good",
        "parts_scrap",
        "makespan_s",
        "tardiness_s",
        "oee",
        "energy_kwh",
        "energy_cost",
        "peak_kw",
        "cap_violations",
        "safety",
        "breakdowns",
        "maintenance",
    ):
        assert key in report
    assert report["parts_good"] > 0
    assert set(report["oee"]) == {"availability", "performance", "quality", "oee"}
    assert 0 < report["oee"]["oee"] <= 1
    safety = report["safety"]
    assert safety["requests"] == safety["applied"] + safety["clamped"] + safety["rejected"]
    # Every value the twin took came through the supervisor (it holds the only login),
    # and every one it took was one the supervisor decided to write.
    assert report["plant_writes_accepted"] > 0
    assert report["plant_writes_accepted"] <= safety["applied"] + safety["clamped"]
    assert report["watchdog_trips"] == 0
    _good_ops_at_most_once(run)
    assert _nats_servers() == before  # the embedded server is gone


@pytest.mark.slow
def test_killed_machine_actor_restarts_and_restores(private_dirs: Path) -> None:
    import ray

    async def kill_line(run: PlantRun) -> None:
        while run.twin is not None and run.twin.model.jobs_done < 1:
            await asyncio.sleep(0.2)
        ray.kill(run.actors["line-machining"], no_restart=False)

    settings = RunSettings(duration_s=4 * 3600.0, speedup=900.0, seed=2)
    outcome, report, run = _run(settings, kill_line)
    assert outcome == "done"
    assert report["parts_good"] > 1
    _good_ops_at_most_once(run)


@pytest.mark.slow
def test_killed_supervisor_makes_the_plant_safe_then_resumes(private_dirs: Path) -> None:
    import ray

    done_at_kill: list[int] = []

    async def kill_supervisor(run: PlantRun) -> None:
        assert run.twin is not None
        while run.twin.model.jobs_done < 1:
            await asyncio.sleep(0.2)
        done_at_kill.append(run.twin.model.jobs_done)
        ray.kill(run.actors["supervisor"], no_restart=False)
        while run.twin.watchdog_trips == 0:
            await asyncio.sleep(0.05)
        assert not run.twin.run.any()  # safe state: every machine stopped

    settings = RunSettings(duration_s=5 * 3600.0, speedup=900.0, seed=3, watchdog_timeout_s=0.5)
    outcome, report, run = _run(settings, kill_supervisor)
    assert outcome == "done"
    assert report["watchdog_trips"] >= 1
    assert run.twin is not None
    assert not run.twin.watchdog_alarm
    assert report["parts_good"] > done_at_kill[0]  # control resumed after the restart
    _good_ops_at_most_once(run)


@pytest.mark.slow
def test_nats_restart_mid_run_completes(private_dirs: Path) -> None:
    from autofab.control.natsd import EmbeddedNats

    async def main() -> tuple[str, dict[str, Any], PlantRun]:
        async with EmbeddedNats() as server:
            settings = RunSettings(
                duration_s=4 * 3600.0, speedup=900.0, seed=4, nats=server.endpoint
            )
            async with PlantRun(load_plant(DEMO), settings) as run:

                async def bounce() -> None:
                    assert run.twin is not None
                    while run.twin.model.jobs_done < 1:
                        await asyncio.sleep(0.2)
                    await asyncio.to_thread(server.restart)

                side = asyncio.create_task(bounce())
                outcome = await run.run_until_done()
                await side
                return outcome, run.report(), run

    outcome, report, run = asyncio.run(main())
    assert outcome == "done"
    assert report["parts_good"] > 1
    _good_ops_at_most_once(run)


# --- the command's refusals ----------------------------------------------------------------


@pytest.fixture
def cli(private_dirs: Path) -> CliRunner:
    return CliRunner()


def test_bad_config_is_one_clear_line(cli: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlines: 3\n")
    result = cli.invoke(app, ["run", str(bad), "--no-live"])
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "Traceback" not in result.output


def test_missing_policy_is_refused_before_anything_starts(cli: CliRunner, tmp_path: Path) -> None:
    before = _nats_servers()
    result = cli.invoke(app, ["run", "--policy", str(tmp_path / "nope.npz"), "--no-live"])
    assert result.exit_code == 2
    assert "nope.npz" in result.output
    assert _nats_servers() == before


def test_bad_duration_and_hosting_are_named(cli: CliRunner) -> None:
    result = cli.invoke(app, ["run", "--duration", "soon", "--no-live"])
    assert result.exit_code == 2
    assert "soon" in result.output
    result = cli.invoke(app, ["run", "--hosting", "per_cell", "--no-live"])
    assert result.exit_code == 2
    assert "per_cell" in result.output


def test_occupied_port_is_a_startup_error_and_leaves_nothing(cli: CliRunner) -> None:
    """A --nats-url whose port is taken by something that is not NATS."""
    before = _nats_servers()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = cli.invoke(app, ["run", "--nats-url", f"nats://127.0.0.1:{port}", "--no-live"])
    assert result.exit_code == 3, result.output
    assert "could not start" in result.output
    assert _nats_servers() == before
    import ray

    assert not ray.is_initialized()


def test_report_file_is_json(private_dirs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        ["run", "--duration", "40m", "--speedup", "1200", "--no-live", "--report", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["plant"] == "demo"
    assert data["agents_ready_s"] > 0
    assert os.path.getsize(out) > 100


@pytest.mark.slow
def test_run_on_a_two_node_ray_cluster(private_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray start` a head and a second node on this machine; the run spreads its actors
    over both and works through them. (Ray gives cluster nodes the machine's own interface
    address whatever --node-ip-address says; the traffic stays on this machine.)"""
    import shutil
    import subprocess
    import sys

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_cli is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head = [ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    worker = [ray_cli, "start", f"--address=127.0.0.1:{port}", *common]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        settings = RunSettings(
            duration_s=2 * 3600.0, speedup=600.0, seed=5, ray_address=f"127.0.0.1:{port}"
        )
        outcome, report, run = _run(settings)
    finally:
        _stop_ray_cluster(port)
    assert outcome == "done"
    assert report["ray_nodes"] == 2
    assert report["parts_good"] > 0
    _good_ops_at_most_once(run)


def _stop_ray_cluster(port: int) -> None:
    """Stop the processes of the Ray cluster whose GCS listens on ``port``, and only those
    (``ray stop`` would stop every Ray on the machine, a developer's own included): the GCS,
    everything started with its address, and their children (the agents rename themselves
    and carry no address)."""

    def ours(args: list[str]) -> bool:
        return any(
            a == f"--gcs_server_port={port}"
            or (a.startswith(("--gcs-address=", "--gcs_address=")) and a.endswith(f":{port}"))
            for a in args
        )

    found = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if proc.pid != os.getpid() and ours(proc.info["cmdline"] or [])
    ]
    for proc in list(found):
        with contextlib.suppress(psutil.NoSuchProcess):
            found += proc.children(recursive=True)
    for proc in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(found, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def test_run_against_an_existing_plant_server(private_dirs: Path, tmp_path: Path) -> None:
    """--nodemap: no twin of its own; the plant is an OPC UA server that is already up (here
    a twin started apart, with its own certificates), orders come from an MES over NATS."""
    from autofab.agents.protocol import OrderAck, OrderSubmit
    from autofab.control.negotiate_cmd import config_orders
    from autofab.control.opcua.twin import PlantTwin, TwinSettings

    config = load_plant(DEMO)

    async def main() -> tuple[str, dict[str, Any]]:
        plant_settings = TwinSettings(
            speedup=600.0, seed=7, dispatch="agents", cert_dir=tmp_path / "plant-certs"
        )
        async with PlantTwin(config, plant_settings) as plant:
            settings = RunSettings(
                duration_s=2 * 3600.0,
                speedup=600.0,
                nodemap=plant.nodemap_path,
                cert_dir=plant.cert_dir,
            )
            async with PlantRun(config, settings) as run:
                assert run.twin is None
                backlog = [o for o in config_orders(config, 7) if o.arrival_at == 0.0][:4]

                async def mes() -> None:
                    for o in backlog:
                        job = int(o.submit.client_order_id.rsplit("-", 1)[1]) - 1
                        msg = OrderSubmit.model_validate(
                            {**o.submit.model_dump(), "plant_job": job}
                        )
                        answer = await run._bus.request(run.subjects.orders_submit, msg, timeout=5)
                        assert isinstance(answer, OrderAck)

                side = asyncio.create_task(mes())
                outcome = await run.run_until_done()
                await side
                report = run.report()
            assert plant.accepted_writes > 0
            return outcome, report

    outcome, report = asyncio.run(main())
    assert outcome == "done"
    assert report["parts_good"] + report["operations_done"] > 0
    assert report["oee"] is None  # a real plant's OEE comes from its own meters
    assert report["safety"]["requests"] > 0


def test_run_nodemap_needs_the_login(cli: CliRunner, tmp_path: Path) -> None:
    nodemap = tmp_path / "map.json"
    nodemap.write_text("{}")
    result = cli.invoke(app, ["run", "--nodemap", str(nodemap), "--no-live"])
    assert result.exit_code in (2, 3), result.output
    assert "cert-dir" in result.output or "node map" in result.output


def test_ctrl_c_stops_everything_and_reports(private_dirs: Path, tmp_path: Path) -> None:
    """SIGINT to `autofab run`: exit 130 with the report written, and no nats-server, Ray
    or other child process left behind."""
    import signal
    import subprocess
    import sys
    import time

    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "autofab.control.cli", "run", "--no-live"]
    proc = subprocess.Popen(
        [*cmd, "--duration", "8h", "--speedup", "60", "--report", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    children: set[int] = set()
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "actors ready" in line:
            break
        assert time.monotonic() < deadline, "autofab run did not get ready"
    time.sleep(3)
    children = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    assert children  # nats-server and Ray's processes
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert json.loads(report.read_text())["agents_ready_s"] > 0
    time.sleep(2)
    alive = [
        pid
        for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    assert alive == [], [psutil.Process(p).cmdline() for p in alive]


def test_run_file_names_the_servers(cli: CliRunner, tmp_path: Path) -> None:
    """A run file: the plant config plus the servers; its keys are checked, its paths are
    relative to it, and its NATS server is the one used (here a port that is not NATS)."""
    from autofab.control.run_cmd import load_run_source

    good = tmp_path / "run.yaml"
    good.write_text(
        "plant_config: demo\n"
        "nats: {url: 'nats://127.0.0.1:1', user: autofab, kv_replicas: 3}\n"
        "plant: {nodemap: maps/acme.json, cert_dir: certs, endpoint: 'opc.tcp://plc:4840'}\n"
        "ray: {address: 'head:6379'}\n"
    )
    plant, run_file = load_run_source(str(good))
    assert plant.name == "demo"
    assert run_file is not None
    assert run_file.nats is not None
    assert run_file.nats.kv_replicas == 3
    assert run_file.plant is not None
    assert run_file.plant.nodemap == tmp_path / "maps" / "acme.json"
    assert run_file.ray is not None
    assert run_file.ray.address == "head:6379"
    assert load_run_source("demo")[1] is None  # a plain plant config

    bad = tmp_path / "bad.yaml"
    bad.write_text("plant_config: demo\nnats: {url: 'nats://x:4222', pasword: oops}\n")
    result = cli.invoke(app, ["run", str(bad), "--no-live"])
    assert result.exit_code == 2
    assert "nats.pasword" in result.output

    missing_map = tmp_path / "real.yaml"
    missing_map.write_text("plant_config: demo\nplant: {nodemap: nope.json, cert_dir: certs}\n")
    result = cli.invoke(app, ["run", str(missing_map), "--no-live"])
    assert result.exit_code == 2
    assert "nope.json" in result.output

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = tmp_path / "server.yaml"
        server.write_text(f"plant_config: demo\nnats: {{url: 'nats://127.0.0.1:{port}'}}\n")
        result = cli.invoke(app, ["run", str(server), "--no-live"])
    assert result.exit_code == 3, result.output
    assert f"127.0.0.1:{port}" in result.output
