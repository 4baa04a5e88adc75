"""Every Prometheus metric autofab exposes, defined once, and how each process serves them.

Naming follows Prometheus practice (STYLE.md, lesson 8): one prefix, ``autofab_``; base
units in the name (``_seconds``, ``_watts``, ``_joules``, ``_celsius``, ``_ratio``);
counters end in ``_total``. Labels take only bounded values: ``plant``, ``line``,
``machine``, ``kind`` (the agent or process kind: ``scheduler``, ``machine``, ``energy``,
``supply``, ``supervisor``, ``gateway``, ``twin``), ``outcome`` and ``reason`` (fixed code
sets such as :data:`autofab.control.supervisor.Reason`), never a job, request or
operation id.

Registry
--------
All metrics live on :data:`REGISTRY`, a dedicated :class:`~prometheus_client.CollectorRegistry`
(with the usual ``process_*`` and ``python_info`` collectors added), not on
prometheus-client's global default registry. Ray and other libraries in the same process
may use the default one; a dedicated registry keeps our exposition exactly the set defined
here, which the dashboard and rule tests hold the PromQL to (:func:`metric_names`).

Plant metrics mirror the plant model's cumulative counters, so they are not incremented:
the twin calls :meth:`PlantCollector.update` with a :func:`plant_snapshot` after each scan
cycle, and :data:`PLANT` turns the latest snapshot into counter and gauge samples at scrape
time. A new shift (a model reset) reads as a counter reset, which ``rate()`` handles.
Everything else (agents, negotiation, supervisor, bus) is a plain prometheus-client metric
that the owning component increments or sets.

Scraping Ray processes: file_sd
-------------------------------
Each process that holds metrics (every Ray actor process, the driver) calls
:func:`start_exporter` once; it serves :data:`REGISTRY` on a free loopback port and returns
``(host, port)``. The actors hand their addresses to the driver, which writes them all with
:func:`write_file_sd` to ``runs/file_sd/<plant>.json`` (:func:`file_sd_path`), a Prometheus
``file_sd`` file; ``configs/prometheus/prometheus.yml`` watches that folder and picks up
changes without a restart. The file is replaced atomically, so Prometheus never reads half
of it. On a multi-node Ray cluster, bind each exporter to its node's address instead of
loopback.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray
from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from autofab.envs.factory_model import FactoryModel

__all__ = [
    "AGENT_DECISION_DURATION",
    "AGENT_MESSAGES_REJECTED",
    "AGENT_RESTARTS",
    "BUILD_INFO",
    "CNP_AWARDS",
    "CNP_BIDS",
    "CNP_REANNOUNCEMENTS",
    "CNP_ROUNDS",
    "CNP_ROUND_DURATION",
    "FILE_SD_DIR",
    "NATS_CONNECTED",
    "NATS_RECONNECTS",
    "PLANT",
    "REGISTRY",
    "STATUS_NAMES",
    "SUPERVISOR_DECISIONS",
    "SUPERVISOR_OPCUA_CONNECTED",
    "SUPERVISOR_REQUESTS",
    "SUPERVISOR_WATCHDOG_ALARM",
    "SUPERVISOR_WRITE_DURATION",
    "PlantCollector",
    "PlantSnapshot",
    "ScrapeTarget",
    "file_sd_path",
    "metric_names",
    "plant_snapshot",
    "start_exporter",
    "stop_exporter",
    "write_file_sd",
]

#: The registry every autofab metric is on, and the one :func:`start_exporter` serves.
REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
REGISTRY.register(PLATFORM_COLLECTOR)

#: Where ``autofab run`` writes its file_sd file, relative to the project root
#: (``configs/prometheus/prometheus.yml`` watches ``*.json`` here; ``runs/`` is git-ignored).
FILE_SD_DIR: Final = Path("runs/file_sd")

# Histogram buckets, in seconds, sized to what each one times.
_DECISION_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_ROUND_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WRITE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _version() -> str:
    try:
        return metadata.version("autofab")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- build

#: ``autofab_build_info``: 1, labelled with the package and Python versions.
BUILD_INFO: Final = Info(
    "autofab_build", "autofab build: package and Python version.", registry=REGISTRY
)
BUILD_INFO.info({"version": _version(), "python_version": platform.python_version()})

# --------------------------------------------------------------------------- agents

CNP_ROUNDS: Final = Counter(
    "autofab_cnp_rounds_total",
    "Contract-net calls for proposals the scheduler announced, re-announcements included.",
    ["plant"],
    registry=REGISTRY,
)
CNP_BIDS: Final = Counter(
    "autofab_cnp_bids_total",
    "Contract-net bids (proposals) the scheduler received in time.",
    ["plant"],
    registry=REGISTRY,
)
CNP_AWARDS: Final = Counter(
    "autofab_cnp_awards_total",
    "Contract-net rounds that ended with an award (one accepted bid).",
    ["plant"],
    registry=REGISTRY,
)
CNP_REANNOUNCEMENTS: Final = Counter(
    "autofab_cnp_reannouncements_total",
    "Operations announced again, by reason: no_bids, timeout or machine_lost.",
    ["plant", "reason"],
    registry=REGISTRY,
)
CNP_ROUND_DURATION: Final = Histogram(
    "autofab_cnp_round_duration_seconds",
    "Wall time of a contract-net round, from the call for proposals to the award.",
    ["plant"],
    buckets=_ROUND_BUCKETS,
    registry=REGISTRY,
)
AGENT_DECISION_DURATION: Final = Histogram(
    "autofab_agent_decision_duration_seconds",
    "Wall time an agent takes to handle one message or timer (its decision latency).",
    ["plant", "kind"],
    buckets=_DECISION_BUCKETS,
    registry=REGISTRY,
)
AGENT_MESSAGES_REJECTED: Final = Counter(
    "autofab_agent_messages_rejected_total",
    "Messages an agent refused, by reason (a protocol ErrorReason, expired or bad_header).",
    ["plant", "kind", "reason"],
    registry=REGISTRY,
)
AGENT_RESTARTS: Final = Counter(
    "autofab_agent_restarts_total",
    "Agent actor restarts (Ray restarted the actor, or it recovered its state after a crash).",
    ["plant", "kind"],
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- supervisor

SUPERVISOR_REQUESTS: Final = Counter(
    "autofab_supervisor_requests_total",
    "Setpoint requests the safety supervisor received (decoded or not).",
    ["plant"],
    registry=REGISTRY,
)
SUPERVISOR_DECISIONS: Final = Counter(
    "autofab_supervisor_decisions_total",
    "Safety supervisor decisions, by outcome (applied, clamped, rejected) and reason "
    "(ok, out_of_bounds, rate_limit, power_cap, stale, ...).",
    ["plant", "outcome", "reason"],
    registry=REGISTRY,
)
SUPERVISOR_WRITE_DURATION: Final = Histogram(
    "autofab_supervisor_write_duration_seconds",
    "Wall time of one batched OPC UA write with its read-back.",
    ["plant"],
    buckets=_WRITE_BUCKETS,
    registry=REGISTRY,
)
SUPERVISOR_WATCHDOG_ALARM: Final = Gauge(
    "autofab_supervisor_watchdog_alarm",
    "1 while the plant reports its watchdog alarm (the heartbeat stalled and the plant went "
    "to its safe state), as the supervisor last read it; else 0.",
    ["plant"],
    registry=REGISTRY,
)
SUPERVISOR_OPCUA_CONNECTED: Final = Gauge(
    "autofab_supervisor_opcua_connected",
    "1 while the supervisor's OPC UA session to the plant is up; else 0.",
    ["plant"],
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- bus

NATS_CONNECTED: Final = Gauge(
    "autofab_nats_connected",
    "1 while this process's NATS connection is up; else 0.",
    ["plant", "kind"],
    registry=REGISTRY,
)
NATS_RECONNECTS: Final = Counter(
    "autofab_nats_reconnects_total",
    "Times this process's NATS connection came back after a loss.",
    ["plant", "kind"],
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- plant

#: Machine status codes, as in :class:`autofab.envs.factory_model.MachineStatus`.
STATUS_NAMES: Final = ("idle", "running", "down", "maintenance")

_MACHINE_LABELS: Final = ("plant", "line", "machine")


@dataclass(frozen=True)
class _Family:
    name: str  # without ``_total`` for counters
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...]


#: Plant-level families: (name, type, help). Labels: ``plant``.
_PLANT_FAMILIES: Final = (
    _Family(
        "autofab_plant_time_seconds",
        "gauge",
        "Plant clock: plant seconds since the shift "
        "began (runs at speedup times wall time in the twin).",
        ("plant",),
    ),
    _Family(
        "autofab_plant_parts_good",
        "counter",
        "Orders finished good (parts leaving the plant).",
        ("plant",),
    ),
    _Family(
        "autofab_plant_parts_scrap",
        "counter",
        "Orders scrapped after a defect and restarted.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_power_watts",
        "gauge",
        "Plant electrical power now: every machine plus the base load.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_power_cap_watts",
        "gauge",
        "The plant's configured peak power cap.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_peak_power_watts",
        "gauge",
        "Highest plant power seen this shift.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_energy_joules",
        "counter",
        "Plant electrical energy used, base load included.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_energy_cost",
        "counter",
        "Cost of the plant's energy at the time-of-use tariff, in the tariff's currency.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_tariff_per_joule",
        "gauge",
        "Energy price now, in currency per joule (multiply by 3.6e6 for per kWh).",
        ("plant",),
    ),
    _Family(
        "autofab_plant_over_cap_seconds",
        "counter",
        "Plant time spent above the peak power cap.",
        ("plant",),
    ),
    _Family(
        "autofab_plant_cap_violations",
        "counter",
        "Times plant power rose above the peak cap.",
        ("plant",),
    ),
)

#: Per-machine families. Labels: ``plant``, ``line``, ``machine``.
_MACHINE_FAMILIES: Final = (
    _Family(
        "autofab_machine_status",
        "gauge",
        "Machine status code: 0 idle, 1 running, 2 down (breakdown, under repair), 3 maintenance.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_speed_setpoint_ratio",
        "gauge",
        "Speed setpoint as a multiple of the machine's rated speed.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_power_watts", "gauge", "Machine electrical power now.", _MACHINE_LABELS
    ),
    _Family(
        "autofab_machine_vibration_meters_per_second",
        "gauge",
        "Vibration velocity (RMS) from the machine's sensor.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_temperature_celsius",
        "gauge",
        "Machine temperature from its sensor.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_run_since_maintenance_seconds",
        "gauge",
        "Running time since the "
        "machine's last maintenance or repair (what a fixed-interval planner reads).",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_planned_seconds",
        "counter",
        "Planned production time (OEE availability denominator): plant time elapsed in the shift.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_run_seconds",
        "counter",
        "Time the machine spent running an "
        "operation (OEE availability numerator, performance denominator).",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_down_seconds",
        "counter",
        "Unplanned downtime: time broken down or under repair.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_maintenance_seconds",
        "counter",
        "Planned downtime: time in maintenance.",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_ideal_seconds",
        "counter",
        "Ideal cycle time of the operations "
        "completed, at maximum speed (OEE performance numerator).",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_parts_good",
        "counter",
        "Operations completed without a defect (OEE quality numerator).",
        _MACHINE_LABELS,
    ),
    _Family(
        "autofab_machine_parts_defective",
        "counter",
        "Operations completed with a defect, scrapped or reworked (OEE quality loss).",
        _MACHINE_LABELS,
    ),
    _Family("autofab_machine_breakdowns", "counter", "Machine breakdowns.", _MACHINE_LABELS),
    _Family(
        "autofab_machine_maintenances", "counter", "Maintenance actions started.", _MACHINE_LABELS
    ),
    _Family(
        "autofab_machine_energy_joules",
        "counter",
        "Machine electrical energy used.",
        _MACHINE_LABELS,
    ),
)


@dataclass(frozen=True, eq=False)
class PlantSnapshot:
    """The plant's metrics at one moment: plain numbers and array copies, safe to read from
    the exporter's thread while the model moves on.

    Per-machine arrays all have one entry per machine, in ``machines`` order. Counters are
    the model's cumulative values since the shift began.
    """

    plant: str
    time_s: float
    power_w: float
    cap_w: float
    peak_w: float
    energy_j: float
    energy_cost: float
    tariff_per_j: float
    over_cap_s: float
    cap_violations: int
    parts_good: int
    parts_scrap: int
    machines: tuple[str, ...]
    lines: tuple[str, ...]
    machine_values: Mapping[str, NDArray[np.float64]]


def plant_snapshot(
    model: FactoryModel,
    sensors: Mapping[str, NDArray[np.float64]] | None = None,
    plant: str | None = None,
) -> PlantSnapshot:
    """Copy what the metrics need out of a :class:`~autofab.envs.factory_model.FactoryModel`.

    ``sensors`` are the readings the caller publishes as telemetry (with their noise); when
    omitted, the noise-free values are used, so taking a snapshot never draws from the
    model's sensor noise stream. ``plant`` defaults to the plant config's name.
    """
    p = model.plant
    readings = model.sensors(noise=False) if sensors is None else sensors
    n = p.n_machines

    def f64(values: object) -> NDArray[np.float64]:
        out = np.array(values, dtype=np.float64, copy=True).reshape(n)
        return out

    values = {
        "autofab_machine_status": f64(model.status),
        "autofab_machine_speed_setpoint_ratio": f64(model.speed),
        "autofab_machine_power_watts": f64(model.power_w()),
        "autofab_machine_vibration_meters_per_second": f64(readings["vibration_mm_s"]) / 1e3,
        "autofab_machine_temperature_celsius": f64(readings["temperature_c"]),
        "autofab_machine_run_since_maintenance_seconds": f64(model.run_since_maintenance_s),
        "autofab_machine_planned_seconds": np.full(n, float(model.now)),
        "autofab_machine_run_seconds": f64(model.run_s),
        "autofab_machine_down_seconds": f64(model.down_s),
        "autofab_machine_maintenance_seconds": f64(model.maintenance_s),
        "autofab_machine_ideal_seconds": f64(model.ideal_s),
        "autofab_machine_parts_good": f64(model.parts_good),
        "autofab_machine_parts_defective": f64(model.parts_defective),
        "autofab_machine_breakdowns": f64(model.breakdowns),
        "autofab_machine_maintenances": f64(model.maintenances),
        "autofab_machine_energy_joules": f64(model.machine_energy_j),
    }
    return PlantSnapshot(
        plant=p.config.name if plant is None else plant,
        time_s=float(model.now),
        power_w=float(model.plant_power_w()),
        cap_w=float(model.cap_w),
        peak_w=float(model.peak_w),
        energy_j=float(model.energy_j),
        energy_cost=float(model.cost),
        tariff_per_j=model.tariff_now() / 3.6e6,
        over_cap_s=float(model.over_cap_s),
        cap_violations=int(model.cap_violations),
        parts_good=int(model.jobs_done),
        parts_scrap=int(model.jobs_scrapped),
        machines=tuple(p.machine_names),
        lines=tuple(p.line_names[int(i)] for i in p.machine_line),
        machine_values=values,
    )


class PlantCollector(Collector):
    """Serves the latest :class:`PlantSnapshot` as counter and gauge families.

    The model's counters are cumulative, so they are reported as they are (a custom
    collector, not ``Counter.inc``): the exposition stays a valid counter, and a model reset
    (a new shift) is a counter reset. Before the first :meth:`update` the families are
    exposed with no samples.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: PlantSnapshot | None = None

    def update(self, snapshot: PlantSnapshot) -> None:
        """Publish a new snapshot; the next scrape reports it."""
        with self._lock:
            self._snapshot = snapshot

    def clear(self) -> None:
        """Forget the snapshot (the plant stopped); the families report no samples."""
        with self._lock:
            self._snapshot = None

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            snapshot = self._snapshot
        return list(self._families(snapshot))

    @staticmethod
    def _family(spec: _Family) -> CounterMetricFamily | GaugeMetricFamily:
        if spec.kind == "counter":
            return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)

    def _families(self, s: PlantSnapshot | None) -> Iterator[Metric]:
        plant_values: dict[str, float] = {}
        if s is not None:
            plant_values = {
                "autofab_plant_time_seconds": s.time_s,
                "autofab_plant_parts_good": s.parts_good,
                "autofab_plant_parts_scrap": s.parts_scrap,
                "autofab_plant_power_watts": s.power_w,
                "autofab_plant_power_cap_watts": s.cap_w,
                "autofab_plant_peak_power_watts": s.peak_w,
                "autofab_plant_energy_joules": s.energy_j,
                "autofab_plant_energy_cost": s.energy_cost,
                "autofab_plant_tariff_per_joule": s.tariff_per_j,
                "autofab_plant_over_cap_seconds": s.over_cap_s,
                "autofab_plant_cap_violations": s.cap_violations,
            }
        for spec in _PLANT_FAMILIES:
            family = self._family(spec)
            if s is not None:
                family.add_metric([s.plant], float(plant_values[spec.name]))
            yield family
        for spec in _MACHINE_FAMILIES:
            family = self._family(spec)
            if s is not None:
                column = s.machine_values[spec.name]
                for line, machine, value in zip(s.lines, s.machines, column, strict=True):
                    family.add_metric([s.plant, line, machine], float(value))
            yield family


#: The plant's metrics; the twin (or the plant gateway) calls ``PLANT.update(...)``.
PLANT: Final = PlantCollector()
REGISTRY.register(PLANT)


# --------------------------------------------------------------------------- names


def metric_names(registry: CollectorRegistry = REGISTRY) -> frozenset[str]:
    """Every sample name ``registry`` can expose, labelled metrics without children included:
    ``<name>_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms,
    ``_info`` for info metrics (``_created`` samples are left out: nothing should query them).
    """
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "info": ("_info",),
        "gauge": ("",),
        "unknown": ("",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples if not s.name.endswith("_created"))
    return frozenset(names)


# --------------------------------------------------------------------------- exporter

_exporter_lock: Final = threading.Lock()
_exporter: tuple[WSGIServer, threading.Thread] | None = None


def start_exporter(
    host: str = "127.0.0.1", port: int = 0, registry: CollectorRegistry = REGISTRY
) -> tuple[str, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` on a daemon thread; return the
    address actually bound.

    ``port=0`` lets the OS pick a free port, so many processes on one host never collide.
    One exporter per process: a second call returns the running one's address (whatever its
    arguments). Stop it with :func:`stop_exporter`.
    """
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            _exporter = start_http_server(port, addr=host, registry=registry)
        server = _exporter[0]
        bound_host, bound_port = server.server_address[:2]
        return str(bound_host), int(bound_port)


def stop_exporter() -> None:
    """Stop this process's exporter, if one runs, and free its port."""
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            return
        server, thread = _exporter
        _exporter = None
    server.shutdown()
    server.server_close()
    thread.join(5.0)


# --------------------------------------------------------------------------- file_sd

_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class ScrapeTarget:
    """One exporter to scrape, with the labels Prometheus should attach to its series."""

    host: str
    port: int
    labels: Mapping[str, str] | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def file_sd_path(plant: str, directory: Path = FILE_SD_DIR) -> Path:
    """The file_sd file a run for ``plant`` writes: ``<directory>/<plant>.json``."""
    return directory / f"{plant}.json"


def _check_labels(labels: Mapping[str, str], where: str) -> None:
    for key, value in labels.items():
        if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(
                f"{where}: label name {key!r} is not a Prometheus label name "
                "([a-zA-Z_][a-zA-Z0-9_]*, not starting with '__')"
            )
        if not isinstance(value, str):
            raise TypeError(f"{where}: label {key!r} must be a string, got {value!r}")


def write_file_sd(
    path: Path | str,
    targets: Iterable[ScrapeTarget | tuple[str, int] | str],
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a Prometheus ``file_sd`` JSON file listing ``targets``; return its path.

    ``labels`` go on every target; a :class:`ScrapeTarget`'s own labels add to them (and
    win). Targets with the same labels share one group. The file is written to a hidden
    temporary file in the same folder and renamed over ``path``, so Prometheus, which
    watches the folder, only ever reads a whole file (the temporary name does not match the
    ``*.json`` glob). An empty ``targets`` writes ``[]``: nothing to scrape.
    """
    path = Path(path)
    common = dict(labels or {})
    _check_labels(common, "write_file_sd labels")
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for target in targets:
        if isinstance(target, str):
            address, own = target, {}
        elif isinstance(target, ScrapeTarget):
            address, own = target.address, dict(target.labels or {})
        else:
            address, own = ScrapeTarget(*target).address, {}
        _check_labels(own, f"write_file_sd target {address}")
        merged = tuple(sorted({**common, **own}.items()))
        groups.setdefault(merged, []).append(address)
    document: Sequence[dict[str, object]] = [
        {"targets": sorted(set(addresses)), "labels": dict(key)}
        for key, addresses in sorted(groups.items())
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
