"""control/metrics.py: names and labels by the conventions, the plant collector, the
exporter, the file_sd writer, and promtool's lint of the exposition."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from autofab.control import metrics
from autofab.control.metrics import (
    PLANT,
    REGISTRY,
    PlantCollector,
    ScrapeTarget,
    file_sd_path,
    metric_names,
    plant_snapshot,
    start_exporter,
    stop_exporter,
    write_file_sd,
)
from autofab.envs.factory_model import Decision, FactoryModel, run_shift
from autofab.envs.plant import load_plant

UNITS = ("_seconds", "_watts", "_joules", "_celsius", "_ratio", "_meters_per_second")
#: Families named after what they count, or state codes and booleans, with no unit.
UNITLESS = re.compile(
    r"_total$|_info$|_status$|_connected$|_alarm$|^autofab_plant_tariff_per_joule$"
)
BOUNDED_LABELS = {
    "plant",
    "line",
    "machine",
    "kind",
    "reason",
    "outcome",
    "version",
    "python_version",
    "le",  # histogram buckets
}


def autofab_families() -> list:
    return [f for f in REGISTRY.collect() if f.name.startswith("autofab_")]


def first_come(model: FactoryModel, machine: int) -> Decision:
    jobs = model.candidates(machine)
    return Decision(job=int(jobs[0])) if len(jobs) else Decision()


@pytest.fixture(scope="module")
def shift() -> FactoryModel:
    """The demo plant after a two-hour shift with a first-come policy."""
    model = FactoryModel.from_config(load_plant("demo"), seed=3, horizon_s=7200)
    run_shift(model, first_come)
    return model


@pytest.fixture
def plant_collector(shift: FactoryModel) -> Iterator[PlantCollector]:
    PLANT.update(plant_snapshot(shift))
    yield PLANT
    PLANT.clear()


@pytest.fixture
def populated(plant_collector: PlantCollector) -> bytes:
    """The exposition with a sample in every autofab family (a child for each labelled one)."""
    metrics.CNP_ROUNDS.labels(plant="demo").inc()
    metrics.CNP_BIDS.labels(plant="demo").inc(3)
    metrics.CNP_AWARDS.labels(plant="demo").inc()
    metrics.CNP_REANNOUNCEMENTS.labels(plant="demo", reason="no_bids").inc()
    metrics.CNP_ROUND_DURATION.labels(plant="demo").observe(0.2)
    metrics.AGENT_DECISION_DURATION.labels(plant="demo", kind="machine").observe(0.001)
    metrics.AGENT_MESSAGES_REJECTED.labels(
        plant="demo", kind="scheduler", reason="malformed_json"
    ).inc()
    metrics.AGENT_RESTARTS.labels(plant="demo", kind="energy").inc()
    metrics.SUPERVISOR_REQUESTS.labels(plant="demo").inc(2)
    metrics.SUPERVISOR_DECISIONS.labels(plant="demo", outcome="applied", reason="ok").inc()
    metrics.SUPERVISOR_DECISIONS.labels(plant="demo", outcome="rejected", reason="power_cap").inc()
    metrics.SUPERVISOR_WRITE_DURATION.labels(plant="demo").observe(0.01)
    metrics.SUPERVISOR_WATCHDOG_ALARM.labels(plant="demo").set(0)
    metrics.SUPERVISOR_OPCUA_CONNECTED.labels(plant="demo").set(1)
    metrics.NATS_CONNECTED.labels(plant="demo", kind="scheduler").set(1)
    metrics.NATS_RECONNECTS.labels(plant="demo", kind="scheduler").inc()
    exposition = generate_latest(REGISTRY)
    exposed = {
        sample.name
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }
    assert {n for n in metric_names() if n.startswith("autofab_")} <= exposed
    return exposition


@pytest.fixture
def exporter() -> Iterator[tuple[str, int]]:
    address = start_exporter()
    yield address
    stop_exporter()


# --------------------------------------------------------------------------- conventions


def test_every_family_follows_the_naming_conventions():
    families = autofab_families()
    assert len(families) >= 40
    for family in families:
        exposed = family.name + ("_total" if family.type == "counter" else "")
        exposed += "_info" if family.type == "info" else ""
        assert re.fullmatch(r"autofab_[a-z0-9_]+", exposed), exposed
        if family.type == "counter":
            assert exposed.endswith("_total")
        else:
            assert not exposed.endswith("_total"), exposed
        stem = exposed.removesuffix("_total")
        assert stem.endswith(UNITS) or UNITLESS.search(exposed), f"{exposed}: no base unit"
        assert not re.search(r"_(milli|kilo|mega)|_kw|_kwh|_ms$|_minutes|_hours", exposed)
        assert len(family.documentation) > 15, f"{exposed}: help text missing"


def test_labels_are_bounded_and_never_ids(populated: bytes):
    families = list(text_string_to_metric_families(populated.decode()))
    for family in families:
        if not family.name.startswith("autofab_"):
            continue
        labelnames = {name for sample in family.samples for name in sample.labels}
        assert labelnames <= BOUNDED_LABELS, f"{family.name}: {labelnames - BOUNDED_LABELS}"


def test_metric_names_lists_exposed_sample_names():
    names = metric_names()
    assert "autofab_cnp_rounds_total" in names
    assert "autofab_cnp_round_duration_seconds_bucket" in names
    assert "autofab_cnp_round_duration_seconds_count" in names
    assert "autofab_machine_run_seconds_total" in names
    assert "autofab_machine_status" in names
    assert "autofab_build_info" in names
    assert "autofab_cnp_rounds" not in names
    assert not any(n.endswith("_created") for n in names)


def test_build_info_carries_the_version():
    [family] = [f for f in REGISTRY.collect() if f.name == "autofab_build"]
    [sample] = family.samples
    assert sample.name == "autofab_build_info"
    assert sample.value == 1
    assert sample.labels["version"]


# --------------------------------------------------------------------------- plant


def test_plant_snapshot_mirrors_the_model(shift: FactoryModel, plant_collector: PlantCollector):
    by_name = {f.name: f for f in plant_collector.collect()}

    def samples(name: str) -> dict[str, float]:
        family = by_name[name]
        return {s.labels.get("machine", "plant"): s.value for s in family.samples}

    names = shift.plant.machine_names
    run = samples("autofab_machine_run_seconds")
    assert list(run) == list(names)
    assert np.allclose(list(run.values()), shift.run_s)
    assert sum(run.values()) > 0
    planned = samples("autofab_machine_planned_seconds")
    assert set(planned.values()) == {shift.now}
    assert samples("autofab_machine_parts_good") == dict(
        zip(names, shift.parts_good.astype(float), strict=True)
    )
    assert samples("autofab_plant_energy_joules")["plant"] == pytest.approx(shift.energy_j)
    assert samples("autofab_plant_power_cap_watts")["plant"] == shift.cap_w
    assert samples("autofab_plant_parts_good")["plant"] == shift.jobs_done
    tariff = samples("autofab_plant_tariff_per_joule")["plant"]
    assert tariff * 3.6e6 == pytest.approx(shift.tariff_now())
    vibration = samples("autofab_machine_vibration_meters_per_second")
    assert all(0 < v < 0.1 for v in vibration.values())  # m/s, not mm/s
    lines = {s.labels["line"] for s in by_name["autofab_machine_status"].samples}
    assert lines == set(shift.plant.line_names)
    # Same OEE as the model's own, from the same counters.
    a = sum(run.values()) / sum(planned.values())
    assert a == pytest.approx(shift.oee()["availability"])


def test_snapshot_does_not_touch_the_sensor_noise_stream(shift: FactoryModel):
    state = shift.sensor_rng.bit_generator.state
    plant_snapshot(shift)
    assert shift.sensor_rng.bit_generator.state == state


def test_plant_families_exist_before_the_first_snapshot():
    collector = PlantCollector()
    families = list(collector.collect())
    assert {f.name for f in families} >= {"autofab_machine_status", "autofab_plant_power_watts"}
    assert all(not f.samples for f in families)


def test_plant_counters_are_counters_and_reset_with_a_new_shift():
    model = FactoryModel.from_config(load_plant("demo"), seed=1, horizon_s=3600)
    run_shift(model, first_come)
    registry = CollectorRegistry()
    collector = PlantCollector()
    registry.register(collector)
    collector.update(plant_snapshot(model))
    text = generate_latest(registry).decode()
    assert "# TYPE autofab_machine_run_seconds_total counter" in text
    before = registry.get_sample_value("autofab_plant_energy_joules_total", {"plant": "demo"})
    model.reset()
    collector.update(plant_snapshot(model))
    after = registry.get_sample_value("autofab_plant_energy_joules_total", {"plant": "demo"})
    assert before is not None
    assert before > 0
    assert after == 0.0


# --------------------------------------------------------------------------- exporter


def test_exporter_serves_the_registry_on_a_free_loopback_port(exporter: tuple[str, int]):
    host, port = exporter
    assert host == "127.0.0.1"
    assert port > 0
    assert start_exporter() == exporter  # one per process
    metrics.CNP_ROUNDS.labels(plant="exporter-test").inc()
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = [
        s
        for s in parsed["autofab_cnp_rounds"].samples
        if s.name.endswith("_total") and s.labels == {"plant": "exporter-test"}
    ]
    assert sample.value == 1.0
    assert "process_resident_memory_bytes" in parsed


def test_exporter_stops_and_starts_again():
    first = start_exporter()
    stop_exporter()
    stop_exporter()  # idempotent
    second = start_exporter()
    try:
        with urllib.request.urlopen(f"http://{second[0]}:{second[1]}/metrics", timeout=5):
            pass
    finally:
        stop_exporter()
    assert first[1] > 0
    assert second[1] > 0


# --------------------------------------------------------------------------- file_sd


def test_write_file_sd_groups_targets_by_labels(tmp_path: Path):
    path = file_sd_path("demo", tmp_path / "file_sd")
    assert path == tmp_path / "file_sd" / "demo.json"
    written = write_file_sd(
        path,
        [
            ScrapeTarget("127.0.0.1", 40001, {"kind": "scheduler"}),
            ScrapeTarget("127.0.0.1", 40002, {"kind": "machine"}),
            ScrapeTarget("127.0.0.1", 40003, {"kind": "machine"}),
            ("127.0.0.1", 40004),
            "127.0.0.1:40005",
            ScrapeTarget("::1", 40006),
        ],
        labels={"plant": "demo"},
    )
    assert written == path
    document = json.loads(path.read_text())
    assert document == [
        {"targets": ["127.0.0.1:40002", "127.0.0.1:40003"],
         "labels": {"kind": "machine", "plant": "demo"}},
        {"targets": ["127.0.0.1:40001"], "labels": {"kind": "scheduler", "plant": "demo"}},
        {"targets": ["127.0.0.1:40004", "127.0.0.1:40005", "[::1]:40006"],
         "labels": {"plant": "demo"}},
    ]  # fmt: skip
    assert [p.name for p in path.parent.iterdir()] == ["demo.json"]  # no temporary left


def test_write_file_sd_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "demo.json"
    write_file_sd(path, ["127.0.0.1:1"])
    original = path.read_text()

    def broken_dump(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(metrics.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_file_sd(path, ["127.0.0.1:2"])
    assert path.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]


def test_write_file_sd_empty_and_bad_labels(tmp_path: Path):
    path = write_file_sd(tmp_path / "x.json", [])
    assert json.loads(path.read_text()) == []
    with pytest.raises(ValueError, match="'__address__'"):
        write_file_sd(tmp_path / "x.json", ["127.0.0.1:1"], labels={"__address__": "x"})
    with pytest.raises(ValueError, match="'bad-name'"):
        write_file_sd(tmp_path / "x.json", [ScrapeTarget("127.0.0.1", 1, {"bad-name": "x"})])


# --------------------------------------------------------------------------- promtool


@pytest.mark.promtool
def test_promtool_accepts_the_exposition(promtool: str, populated: bytes):
    result = subprocess.run(
        [promtool, "check", "metrics"], input=populated, capture_output=True, timeout=60
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", report
