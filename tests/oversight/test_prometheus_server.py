"""A real Prometheus scrapes an exporter from control/metrics.py found through a file_sd file,
as ``autofab run`` will set it up, and evaluates the shipped recording rules.

Prometheus listens on a free loopback port; the test waits for its "ready" log line, then
polls the HTTP API on 127.0.0.1 (bounded in time) until a scrape and a rule evaluation have
happened. Nothing but loopback is ever contacted.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import yaml

from autofab.control.metrics import (
    PLANT,
    PlantSnapshot,
    ScrapeTarget,
    file_sd_path,
    start_exporter,
    stop_exporter,
    write_file_sd,
)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "configs" / "prometheus"
READY = "Server is ready to receive web requests."
SPEEDUP = 60.0
MACHINES = (("machining", "m1"), ("machining", "m2"), ("finishing", "m3"))
#: Shares of plant time that give availability 0.5, performance 0.5, quality 0.8.
RUN, IDEAL, GOOD, DEFECTIVE = 0.5, 0.25, 0.08, 0.02
EXPECTED_OEE = 0.5 * 0.5 * 0.8


def synthetic_snapshot(plant_s: float) -> PlantSnapshot:
    """Every machine with counters proportional to plant time, so each OEE factor is fixed."""
    n = len(MACHINES)

    def column(share: float) -> np.ndarray:
        return np.full(n, share * plant_s)

    values = {
        "autofab_machine_status": np.ones(n),
        "autofab_machine_speed_setpoint_ratio": np.ones(n),
        "autofab_machine_power_watts": np.full(n, 5e3),
        "autofab_machine_vibration_meters_per_second": np.full(n, 2e-3),
        "autofab_machine_temperature_celsius": np.full(n, 40.0),
        "autofab_machine_run_since_maintenance_seconds": column(RUN),
        "autofab_machine_planned_seconds": column(1.0),
        "autofab_machine_run_seconds": column(RUN),
        "autofab_machine_down_seconds": column(0.0),
        "autofab_machine_maintenance_seconds": column(0.0),
        "autofab_machine_ideal_seconds": column(IDEAL),
        "autofab_machine_parts_good": column(GOOD),
        "autofab_machine_parts_defective": column(DEFECTIVE),
        "autofab_machine_breakdowns": np.zeros(n),
        "autofab_machine_maintenances": np.zeros(n),
        "autofab_machine_energy_joules": column(5e3),
    }
    return PlantSnapshot(
        plant="itest",
        time_s=plant_s,
        power_w=15e3,
        cap_w=40e3,
        peak_w=15e3,
        energy_j=15e3 * plant_s,
        energy_cost=15e3 * plant_s * 5e-8,
        tariff_per_j=5e-8,
        over_cap_s=0.0,
        cap_violations=0,
        parts_good=int(plant_s // 600),
        parts_scrap=0,
        machines=tuple(m for _, m in MACHINES),
        lines=tuple(line for line, _ in MACHINES),
        machine_values=values,
    )


@pytest.fixture
def plant_exporter() -> Iterator[tuple[str, int]]:
    """The exporter, with a plant whose clock runs at SPEEDUP times wall time."""
    stop = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not stop.is_set():
            PLANT.update(synthetic_snapshot(SPEEDUP * (time.monotonic() - start)))
            stop.wait(0.1)

    PLANT.update(synthetic_snapshot(0.0))
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    address = start_exporter()
    yield address
    stop.set()
    thread.join(5)
    stop_exporter()
    PLANT.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrometheusServer:
    process: subprocess.Popen[str]
    port: int
    log: list[str]

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``promql`` returns a finite sample (Prometheus scrapes twice a second)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result and all(math.isfinite(float(r["value"][1])) for r in result):
                return result
            if time.monotonic() > deadline:
                tail = "\n".join(self.log[-20:])
                pytest.fail(f"no samples for {promql} after {timeout} s; log:\n{tail}")
            time.sleep(0.25)


def _pump(stream: IO[str], log: list[str], ready: threading.Event) -> None:
    """Collect the log (so Prometheus never blocks on a full pipe) and spot the ready line."""
    for line in stream:
        log.append(line.rstrip())
        if READY in line:
            ready.set()


def start_prometheus(binary: str, config: Path, data: Path) -> PrometheusServer:
    """Start Prometheus on a free loopback port and wait for its ready line."""
    for _ in range(3):
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=info",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        log: list[str] = []
        ready = threading.Event()
        threading.Thread(target=_pump, args=(process.stderr, log, ready), daemon=True).start()
        deadline = time.monotonic() + 30
        while not ready.wait(0.05) and process.poll() is None and time.monotonic() < deadline:
            pass
        if ready.is_set():
            return PrometheusServer(process, port, log)
        process.kill()
        process.wait(10)
        if not any("address already in use" in line for line in log):
            pytest.fail("prometheus did not start:\n" + "\n".join(log[-20:]))
    pytest.fail("prometheus found no free port in 3 tries")


@pytest.fixture
def prometheus(prometheus_bin: str, tmp_path: Path, plant_exporter: tuple[str, int]):
    """Prometheus with the shipped config, sped up, pointed at a temporary file_sd folder."""
    host, port = plant_exporter
    sd = file_sd_path("itest", tmp_path / "file_sd")
    write_file_sd(sd, [ScrapeTarget(host, port, {"kind": "twin"})], labels={"plant": "itest"})
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "autofab"]
    job["file_sd_configs"][0]["files"] = [str(sd.parent / "*.json")]
    config["scrape_configs"] = [job]  # not Ray's: nothing else is scraped
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    server = start_prometheus(prometheus_bin, config_path, tmp_path / "data")
    yield server
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(10)


@pytest.mark.promtool
def test_prometheus_scrapes_the_file_sd_target_and_records_oee(prometheus: PrometheusServer):
    [up] = prometheus.wait_for('up{job="autofab"} == 1')
    assert up["metric"]["plant"] == "itest"
    assert up["metric"]["kind"] == "twin"

    run = prometheus.wait_for("autofab_machine_run_seconds_total")
    assert {r["metric"]["machine"] for r in run} == {"m1", "m2", "m3"}
    # honor_labels: the series keep their own labels, no exported_* copies.
    assert all("exported_plant" not in r["metric"] for r in run)

    [oee] = prometheus.wait_for("plant:autofab_oee:ratio_rate5m")
    assert oee["metric"]["plant"] == "itest"
    assert float(oee["value"][1]) == pytest.approx(EXPECTED_OEE, rel=0.05)
    lines = prometheus.wait_for("plant_line:autofab_oee_availability:ratio_rate5m")
    assert {r["metric"]["line"] for r in lines} == {"machining", "finishing"}
    for r in lines:
        assert float(r["value"][1]) == pytest.approx(0.5, rel=0.05)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query, Grafana's variables filled in."""
    values = {
        "$__rate_interval": "1m",
        "$__range": "1h",
        "$plant": "itest",
        "$machine": "m1",
    }
    out = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for name, value in values.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, expr
                out.append((f"{path.name} {panel['title']!r}", expr))
    return out


@pytest.mark.promtool
def test_prometheus_parses_every_dashboard_query(prometheus: PrometheusServer):
    for where, expr in dashboard_queries():
        try:
            prometheus.query(expr)
        except urllib.error.HTTPError as error:
            pytest.fail(f"{where}: Prometheus refuses {expr}: {error.read().decode()}")


def _prometheus_config(sd_dir: Path, path: Path) -> Path:
    """The shipped config, scraping twice a second, pointed at ``sd_dir``."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "autofab"]
    job["file_sd_configs"][0]["files"] = [str(sd_dir / "*.json")]
    config["scrape_configs"] = [job]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.promtool
def test_prometheus_scrapes_a_live_autofab_run(
    prometheus_bin: str, promtool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Prometheus scrapes a short ``autofab run`` (Ray actors, nats-server, the
    twin) through the run's file_sd file; the exposition of every process passes
    ``promtool check metrics``."""
    import asyncio

    from autofab.control.run_cmd import PlantRun, RunSettings
    from autofab.envs.plant import load_plant

    monkeypatch.chdir(tmp_path)  # the run writes runs/file_sd/<plant>.json here
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    found: dict[str, Any] = {}

    async def main() -> None:
        settings = RunSettings(duration_s=3 * 3600.0, speedup=900.0, seed=1)
        async with PlantRun(load_plant("demo"), settings) as run:
            assert run.file_sd is not None
            config = _prometheus_config(run.file_sd.parent, tmp_path / "prometheus.yml")
            server = await asyncio.to_thread(
                start_prometheus, prometheus_bin, config, tmp_path / "data"
            )
            try:
                await run.run_until_done()
                # The exporters are still up: ask Prometheus, and lint each exposition.
                found["parts"] = await asyncio.to_thread(
                    server.wait_for, "sum(autofab_plant_parts_good_total) > 0"
                )
                found["oee"] = await asyncio.to_thread(
                    server.wait_for, "plant:autofab_oee:ratio_rate5m"
                )
                found["rounds"] = await asyncio.to_thread(
                    server.wait_for, "sum(autofab_cnp_round_duration_seconds_count) > 0"
                )
                found["up"] = server.query('up{job="autofab"} == 1')
                for target in run.metrics_targets:
                    url = f"http://{target}/metrics"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        text = response.read()
                    check = subprocess.run(
                        [promtool, "check", "metrics"], input=text, capture_output=True
                    )
                    found.setdefault("lint", []).append(
                        (target, check.returncode, check.stdout + check.stderr)
                    )
            finally:
                server.process.terminate()
                server.process.wait(15)

    asyncio.run(main())
    assert float(found["parts"][0]["value"][1]) > 0
    [oee] = found["oee"]
    assert 0 < float(oee["value"][1]) <= 1
    assert float(found["rounds"][0]["value"][1]) > 0
    assert len(found["up"]) >= 7  # the driver and every actor
    for target, code, output in found["lint"]:
        assert code == 0, f"{target}: {output!r}"
        assert output.strip() == b"", f"{target}: {output!r}"
