"""Build the Grafana dashboards: ``python dashboards/build.py`` writes ``dashboards/*.json``.

The JSON files are generated, committed output; edit this file, not them, and run it again
(``--check`` fails when a file is stale, which the tests also check). Panels are typed
values (:class:`Panel`, :class:`Query`), so every panel gets a unit and a description, every
query the ``$datasource`` variable, and the layout flows by itself. Only the Python
standard library is used.

Every PromQL expression here may name only metrics that ``autofab.control.metrics``
defines or recording rules in ``configs/prometheus/rules/recording.yml``
(``tests/oversight/test_dashboards.py`` enforces it), and rates use ``$__rate_interval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

OUT_DIR: Final = Path(__file__).resolve().parent
DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION: Final = 39
GRID_WIDTH: Final = 24

PanelKind = Literal["timeseries", "stat", "gauge", "state-timeline", "table"]

#: ``autofab_machine_status`` codes (MachineStatus) as state-timeline colours and names.
STATUS_MAPPINGS: Final = (
    (0, "idle", "blue"),
    (1, "running", "green"),
    (2, "down", "red"),
    (3, "maintenance", "orange"),
)
UP_DOWN_MAPPINGS: Final = ((0, "down", "red"), (1, "up", "green"))
ALARM_MAPPINGS: Final = ((0, "ok", "green"), (1, "tripped", "red"))
#: OEE colours: red below the alert's 0.6 target, yellow to 0.85 (world class), green above.
OEE_THRESHOLDS: Final = ((None, "red"), (0.6, "yellow"), (0.85, "green"))


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel; ``legend`` is Grafana's legend format."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    """A panel: what it shows (``description``), in what ``unit`` (a Grafana unit id)."""

    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: PanelKind = "timeseries"
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    mappings: tuple[tuple[int, str, str], ...] = ()
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)
    stacked: bool = False


@dataclass(frozen=True)
class Variable:
    """A query variable over the label values of a metric (after ``$datasource``)."""

    name: str
    label: str
    query: str  # label_values(...)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("autofab",))


# --------------------------------------------------------------------------- JSON


def _mappings(values: Sequence[tuple[int, str, str]]) -> list[dict[str, Any]]:
    if not values:
        return []
    options = {
        str(value): {"text": text, "color": color, "index": i}
        for i, (value, text, color) in enumerate(values)
    }
    return [{"type": "value", "options": options}]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "mappings": _mappings(panel.mappings),
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for value, color in panel.thresholds],
        },
        "color": {"mode": "thresholds" if panel.kind in ("stat", "gauge") else "palette-classic"},
    }
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind in ("stat", "gauge"):
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "auto",
        }
        if panel.kind == "stat":
            options |= {"colorMode": "value", "graphMode": "area", "textMode": "auto"}
        else:
            options |= {"showThresholdLabels": False, "showThresholdMarkers": True}
    elif panel.kind == "state-timeline":
        defaults["color"] = {"mode": "thresholds"}
        defaults["custom"] = {"fillOpacity": 80, "lineWidth": 0}
        options = {
            "mergeValues": True,
            "showValue": "never",
            "rowHeight": 0.9,
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "single", "sort": "none"},
        }
    else:  # table
        options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    targets = [
        {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + i),
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "range": not q.instant,
            "instant": q.instant,
            **({"format": "table"} if panel.kind == "table" else {}),
        }
        for i, q in enumerate(panel.queries)
    ]
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        out["transformations"] = [
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            }
        ]
    return out


def _variable_json(var: Variable) -> dict[str, Any]:
    return {
        "name": var.name,
        "label": var.label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": var.query,
        "query": {"query": var.query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
        "current": {},
        "options": [],
        "hide": 0,
        "regex": "",
    }


def to_json(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model; panels flow left to right, top to bottom."""
    panels = []
    x = y = row_height = 0
    for i, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, i, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    datasource_var = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "options": [],
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "includeAll": False,
        "multi": False,
    }
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["autofab"],
                "asDropdown": True,
                "title": "autofab",
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": [datasource_var, *map(_variable_json, dashboard.variables)]},
        "panels": panels,
    }


# --------------------------------------------------------------------------- dashboards

PLANT_VAR: Final = Variable("plant", "Plant", "label_values(autofab_plant_time_seconds, plant)")
AGENT_PLANT_VAR: Final = Variable("plant", "Plant", "label_values(autofab_nats_connected, plant)")
P: Final = 'plant="$plant"'
RI: Final = "$__rate_interval"


def _rate(metric: str, by: str = "", selector: str = P) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[{RI}]))"


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    extra = f", {by}" if by else ""
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le{extra}) (rate({metric}_bucket{{{P}}}[{RI}])))",
            f"{legend}p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    )


def _oee_stat(name: str, rule: str, what: str) -> Panel:
    return Panel(
        name,
        f"{what} of the plant over the last 5 minutes, from counters summed over all "
        f"machines (recording rule {rule}).",
        "percentunit",
        (Query(f"{rule}{{{P}}}", name),),
        kind="stat",
        width=6,
        height=5,
        min=0,
        max=1,
        thresholds=OEE_THRESHOLDS,
    )


def plant_overview() -> Dashboard:
    oee = "plant:autofab_oee:ratio_rate5m"
    return Dashboard(
        uid="autofab-plant-overview",
        title="autofab / Plant overview",
        description="OEE with availability, performance and quality, throughput, energy, "
        "cost, power against the peak cap, machine states and firing alerts.",
        variables=(PLANT_VAR,),
        panels=(
            _oee_stat("OEE", oee, "Overall equipment effectiveness (A x P x Q)"),
            _oee_stat(
                "Availability",
                "plant:autofab_oee_availability:ratio_rate5m",
                "Run time over planned time",
            ),
            _oee_stat(
                "Performance",
                "plant:autofab_oee_performance:ratio_rate5m",
                "Ideal cycle time over run time",
            ),
            _oee_stat("Quality", "plant:autofab_oee_quality:ratio_rate5m", "Good over total parts"),
            Panel(
                "OEE by line",
                "OEE of each line over the last 5 minutes (recording rule "
                "plant_line:autofab_oee:ratio_rate5m), and the plant's.",
                "percentunit",
                (
                    Query(f"plant_line:autofab_oee:ratio_rate5m{{{P}}}", "{{line}}"),
                    Query(f"{oee}{{{P}}}", "plant"),
                ),
                min=0,
                max=1,
            ),
            Panel(
                "OEE factors",
                "Availability, performance and quality of the plant over time: the lowest "
                "names the biggest loss.",
                "percentunit",
                (
                    Query(f"plant:autofab_oee_availability:ratio_rate5m{{{P}}}", "availability"),
                    Query(f"plant:autofab_oee_performance:ratio_rate5m{{{P}}}", "performance"),
                    Query(f"plant:autofab_oee_quality:ratio_rate5m{{{P}}}", "quality"),
                ),
                min=0,
                max=1,
            ),
            Panel(
                "Throughput",
                "Orders finished good and orders scrapped, per wall-clock second (the twin "
                "may run plant time faster; see Plant speedup).",
                "suffix: parts/s",
                (
                    Query(_rate("autofab_plant_parts_good_total"), "good"),
                    Query(_rate("autofab_plant_parts_scrap_total"), "scrap"),
                ),
                min=0,
            ),
            Panel(
                "Operations completed by line",
                "Operations completed without a defect on each line, per wall-clock second.",
                "suffix: ops/s",
                (Query(_rate("autofab_machine_parts_good_total", "line"), "{{line}}"),),
                min=0,
                stacked=True,
            ),
            Panel(
                "Power vs cap",
                "Plant electrical power (machines plus base load) against the configured "
                "peak power cap.",
                "watt",
                (
                    Query(f"autofab_plant_power_watts{{{P}}}", "power"),
                    Query(f"autofab_plant_power_cap_watts{{{P}}}", "cap"),
                    Query(f"autofab_plant_peak_power_watts{{{P}}}", "shift peak"),
                ),
                min=0,
            ),
            Panel(
                "Power by line",
                "Electrical power drawn by each line's machines (base load excluded).",
                "watt",
                (
                    Query(
                        f"sum by (line) (autofab_machine_power_watts{{{P}}})",
                        "{{line}}",
                    ),
                ),
                min=0,
                stacked=True,
            ),
            Panel(
                "Energy in range",
                "Plant electrical energy used over the dashboard's time range.",
                "joule",
                (Query(f"sum(increase(autofab_plant_energy_joules_total{{{P}}}[$__range]))"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Energy cost in range",
                "Cost of the plant's energy at the time-of-use tariff over the dashboard's "
                "time range.",
                "currencyEUR",
                (Query(f"sum(increase(autofab_plant_energy_cost_total{{{P}}}[$__range]))"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Tariff (per kWh)",
                "Energy price now, per kilowatt-hour (the metric is per joule).",
                "currencyEUR",
                (Query(f"autofab_plant_tariff_per_joule{{{P}}} * 3.6e6", "tariff"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Plant speedup",
                "Plant seconds per wall-clock second: how much faster than real time the "
                "twin runs (1 for a real plant).",
                "none",
                (Query(f"deriv(autofab_plant_time_seconds{{{P}}}[{RI}])", "speedup"),),
                kind="stat",
                width=6,
                height=5,
            ),
            Panel(
                "Machine states",
                "Each machine's status over time: idle, running, down (breakdown, under "
                "repair) or maintenance.",
                "none",
                (Query(f"autofab_machine_status{{{P}}}", "{{machine}}"),),
                kind="state-timeline",
                width=24,
                height=10,
                mappings=STATUS_MAPPINGS,
            ),
            Panel(
                "Firing alerts",
                "autofab alerts Prometheus is firing now for this plant "
                "(configs/prometheus/rules/alerts.yml; runbook in RUNBOOK.md).",
                "none",
                (
                    Query(
                        f'ALERTS{{alertstate="firing", alertname=~"Autofab.*", {P}}}',
                        instant=True,
                    ),
                ),
                kind="table",
                width=24,
                height=6,
            ),
        ),
    )


def machine_drilldown() -> Dashboard:
    m = f'{P}, machine="$machine"'

    def oee_factor(num: str, den: str) -> str:
        return f"sum(rate({num}{{{m}}}[{RI}])) / sum(rate({den}{{{m}}}[{RI}]))"

    return Dashboard(
        uid="autofab-machine",
        title="autofab / Machine drill-down",
        description="One machine ($machine): state timeline, OEE factors, speed, power, "
        "sensors and maintenance.",
        variables=(
            PLANT_VAR,
            Variable(
                "machine",
                "Machine",
                'label_values(autofab_machine_status{plant="$plant"}, machine)',
            ),
        ),
        panels=(
            Panel(
                "State",
                "The machine's status over time: idle, running, down (breakdown, under "
                "repair) or maintenance.",
                "none",
                (Query(f"autofab_machine_status{{{m}}}", "{{machine}}"),),
                kind="state-timeline",
                width=24,
                height=5,
                mappings=STATUS_MAPPINGS,
            ),
            Panel(
                "OEE factors",
                "The machine's availability (run / planned time), performance (ideal cycle "
                "time / run time) and quality (good / all operations) over the rate window.",
                "percentunit",
                (
                    Query(
                        oee_factor(
                            "autofab_machine_run_seconds_total",
                            "autofab_machine_planned_seconds_total",
                        ),
                        "availability",
                    ),
                    Query(
                        "clamp_max("
                        + oee_factor(
                            "autofab_machine_ideal_seconds_total",
                            "autofab_machine_run_seconds_total",
                        )
                        + ", 1)",
                        "performance",
                    ),
                    Query(
                        f"sum(rate(autofab_machine_parts_good_total{{{m}}}[{RI}])) / ("
                        f"sum(rate(autofab_machine_parts_good_total{{{m}}}[{RI}])) + "
                        f"sum(rate(autofab_machine_parts_defective_total{{{m}}}[{RI}])))",
                        "quality",
                    ),
                ),
                min=0,
                max=1,
            ),
            Panel(
                "Speed setpoint",
                "Speed setpoint as a share of the machine's rated speed (100 % = rated).",
                "percentunit",
                (Query(f"autofab_machine_speed_setpoint_ratio{{{m}}}", "speed setpoint"),),
                min=0,
            ),
            Panel(
                "Power",
                "The machine's electrical power: idle, load (rising with speed and wear) or down.",
                "watt",
                (Query(f"autofab_machine_power_watts{{{m}}}", "power"),),
                min=0,
            ),
            Panel(
                "Vibration",
                "Vibration velocity (RMS) from the machine's sensor; it rises with wear, so "
                "predictive maintenance watches it.",
                "suffix: mm/s",
                (Query(f"autofab_machine_vibration_meters_per_second{{{m}}} * 1e3", "vibration"),),
                min=0,
            ),
            Panel(
                "Temperature",
                "Machine temperature from its sensor (a first-order lag of power and wear).",
                "celsius",
                (Query(f"autofab_machine_temperature_celsius{{{m}}}", "temperature"),),
            ),
            Panel(
                "Running time since maintenance",
                "Running time since the last maintenance or repair: the age a fixed-interval "
                "maintenance plan compares with its interval.",
                "s",
                (Query(f"autofab_machine_run_since_maintenance_seconds{{{m}}}", "age"),),
                min=0,
            ),
            Panel(
                "Breakdowns in range",
                "Breakdowns of the machine over the dashboard's time range.",
                "none",
                (Query(f"sum(increase(autofab_machine_breakdowns_total{{{m}}}[$__range]))"),),
                kind="stat",
                width=6,
                height=8,
                thresholds=((None, "green"), (1, "red")),
            ),
            Panel(
                "Maintenance in range",
                "Maintenance actions started on the machine over the dashboard's time range.",
                "none",
                (Query(f"sum(increase(autofab_machine_maintenances_total{{{m}}}[$__range]))"),),
                kind="stat",
                width=6,
                height=8,
            ),
            Panel(
                "Downtime and maintenance",
                "Share of plant time the machine spent broken down (unplanned) and in "
                "maintenance (planned).",
                "percentunit",
                (
                    Query(
                        oee_factor(
                            "autofab_machine_down_seconds_total",
                            "autofab_machine_planned_seconds_total",
                        ),
                        "down",
                    ),
                    Query(
                        oee_factor(
                            "autofab_machine_maintenance_seconds_total",
                            "autofab_machine_planned_seconds_total",
                        ),
                        "maintenance",
                    ),
                ),
                min=0,
                max=1,
                stacked=True,
            ),
            Panel(
                "Operations",
                "Operations the machine completed good and defective, per wall-clock second.",
                "suffix: ops/s",
                (
                    Query(_rate("autofab_machine_parts_good_total", selector=m), "good"),
                    Query(_rate("autofab_machine_parts_defective_total", selector=m), "defective"),
                ),
                min=0,
            ),
            Panel(
                "Energy in range",
                "The machine's electrical energy over the dashboard's time range.",
                "joule",
                (Query(f"sum(increase(autofab_machine_energy_joules_total{{{m}}}[$__range]))"),),
                kind="stat",
                width=12,
                height=8,
            ),
        ),
    )


def agents_negotiation() -> Dashboard:
    return Dashboard(
        uid="autofab-agents",
        title="autofab / Agents & negotiation",
        description="Contract-net rounds, bids, awards and re-announcements, round and "
        "decision latency, refused messages, restarts and NATS links.",
        variables=(AGENT_PLANT_VAR,),
        panels=(
            Panel(
                "Contract-net activity",
                "Calls for proposals announced, bids received and awards made, per second.",
                "suffix: /s",
                (
                    Query(_rate("autofab_cnp_rounds_total"), "rounds"),
                    Query(_rate("autofab_cnp_bids_total"), "bids"),
                    Query(_rate("autofab_cnp_awards_total"), "awards"),
                ),
                min=0,
            ),
            Panel(
                "Bids per round",
                "Average bids a call for proposals receives: how many machines compete for "
                "each operation.",
                "none",
                (
                    Query(
                        f"{_rate('autofab_cnp_bids_total')} / {_rate('autofab_cnp_rounds_total')}",
                        "bids per round",
                    ),
                ),
                min=0,
            ),
            Panel(
                "Re-announcements by reason",
                "Operations announced again because no machine bid, the round timed out, or "
                "the awarded machine was lost, per second.",
                "suffix: /s",
                (Query(_rate("autofab_cnp_reannouncements_total", "reason"), "{{reason}}"),),
                min=0,
                stacked=True,
            ),
            Panel(
                "Re-announcement share",
                "Re-announcements over all rounds in the last 5 minutes (recording rule "
                "plant:autofab_cnp_reannouncements_per_rounds:ratio_rate5m); the "
                "negotiation-failing alert fires above 50 %.",
                "percentunit",
                (
                    Query(
                        f"plant:autofab_cnp_reannouncements_per_rounds:ratio_rate5m{{{P}}}",
                        "re-announced",
                    ),
                ),
                min=0,
                max=1,
                thresholds=((None, "green"), (0.5, "red")),
            ),
            Panel(
                "Round latency",
                "Wall time from a call for proposals to its award (quantiles).",
                "s",
                _quantiles("autofab_cnp_round_duration_seconds"),
                min=0,
            ),
            Panel(
                "Decision latency (p95) by agent kind",
                "95th percentile of the time an agent takes to handle one message or timer, "
                "by agent kind.",
                "s",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (le, kind) "
                        f"(rate(autofab_agent_decision_duration_seconds_bucket{{{P}}}[{RI}])))",
                        "{{kind}}",
                    ),
                ),
                min=0,
            ),
            Panel(
                "Messages refused",
                "Messages agents refused (malformed, wrong schema, expired, ...), by agent "
                "kind and reason, per second.",
                "suffix: /s",
                (
                    Query(
                        _rate("autofab_agent_messages_rejected_total", "kind, reason"),
                        "{{kind}} {{reason}}",
                    ),
                ),
                min=0,
            ),
            Panel(
                "Agent restarts in range",
                "Agent actor restarts over the dashboard's time range, by agent kind.",
                "none",
                (
                    Query(
                        f"sum by (kind) (increase(autofab_agent_restarts_total{{{P}}}[$__range]))",
                        "{{kind}}",
                    ),
                ),
                kind="stat",
                thresholds=((None, "green"), (1, "orange")),
            ),
            Panel(
                "NATS connection",
                "Whether each process's NATS connection is up.",
                "none",
                (Query(f"autofab_nats_connected{{{P}}}", "{{kind}} {{instance}}"),),
                kind="state-timeline",
                mappings=UP_DOWN_MAPPINGS,
            ),
            Panel(
                "NATS reconnects",
                "Times a process's NATS connection came back after a loss, by process kind, "
                "per rate interval.",
                "none",
                (
                    Query(
                        f"sum by (kind) (increase(autofab_nats_reconnects_total{{{P}}}[{RI}]))",
                        "{{kind}}",
                    ),
                ),
                min=0,
            ),
        ),
    )


def safety_supervisor() -> Dashboard:
    return Dashboard(
        uid="autofab-supervisor",
        title="autofab / Safety supervisor",
        description="Setpoint requests and the supervisor's decisions (applied, clamped, "
        "rejected, by reason), write latency, the plant watchdog and the OPC UA link.",
        variables=(AGENT_PLANT_VAR,),
        panels=(
            Panel(
                "Requests and decisions",
                "Setpoint requests received and the supervisor's decisions by outcome, per second.",
                "suffix: /s",
                (
                    Query(_rate("autofab_supervisor_requests_total"), "requests"),
                    Query(_rate("autofab_supervisor_decisions_total", "outcome"), "{{outcome}}"),
                ),
                min=0,
            ),
            Panel(
                "Rejection share",
                "Rejected over all requests in the last 5 minutes (recording rule "
                "plant:autofab_supervisor_rejections_per_requests:ratio_rate5m); the "
                "rejections-spiking alert fires above 20 %.",
                "percentunit",
                (
                    Query(
                        f"plant:autofab_supervisor_rejections_per_requests:ratio_rate5m{{{P}}}",
                        "rejected",
                    ),
                ),
                min=0,
                max=1,
                thresholds=((None, "green"), (0.2, "red")),
            ),
            Panel(
                "Rejections by reason",
                "Requests rejected, by the first rule that refused them, per second.",
                "suffix: /s",
                (
                    Query(
                        _rate(
                            "autofab_supervisor_decisions_total",
                            "reason",
                            f'{P}, outcome="rejected"',
                        ),
                        "{{reason}}",
                    ),
                ),
                min=0,
                stacked=True,
            ),
            Panel(
                "Clamps by reason",
                "Requests applied after clamping (bounds, rate limit, power cap), per second.",
                "suffix: /s",
                (
                    Query(
                        _rate(
                            "autofab_supervisor_decisions_total",
                            "reason",
                            f'{P}, outcome="clamped"',
                        ),
                        "{{reason}}",
                    ),
                ),
                min=0,
                stacked=True,
            ),
            Panel(
                "Write latency",
                "Wall time of one batched OPC UA write with its read-back (quantiles).",
                "s",
                _quantiles("autofab_supervisor_write_duration_seconds"),
                min=0,
            ),
            Panel(
                "Power vs cap",
                "Plant power as a share of the peak cap (recording rule "
                "plant:autofab_plant_power_per_cap:ratio); near 100 % the supervisor "
                "clamps or rejects for power_cap.",
                "percentunit",
                (Query(f"plant:autofab_plant_power_per_cap:ratio{{{P}}}", "power / cap"),),
                min=0,
                thresholds=((None, "green"), (0.95, "red")),
            ),
            Panel(
                "Plant watchdog",
                "The plant's watchdog alarm as the supervisor reads it: tripped means the "
                "heartbeat stalled and the plant went to its safe state.",
                "none",
                (Query(f"autofab_supervisor_watchdog_alarm{{{P}}}", "watchdog"),),
                kind="state-timeline",
                mappings=ALARM_MAPPINGS,
            ),
            Panel(
                "OPC UA link",
                "Whether the supervisor's OPC UA session to the plant is up.",
                "none",
                (Query(f"autofab_supervisor_opcua_connected{{{P}}}", "OPC UA"),),
                kind="state-timeline",
                mappings=UP_DOWN_MAPPINGS,
            ),
        ),
    )


DASHBOARDS: Final = {
    "plant-overview.json": plant_overview,
    "machine-drilldown.json": machine_drilldown,
    "agents-negotiation.json": agents_negotiation,
    "safety-supervisor.json": safety_supervisor,
}


def render() -> dict[str, str]:
    """Every dashboard file's name and text, as the build writes them."""
    return {
        name: json.dumps(to_json(build()), indent=2, ensure_ascii=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Grafana dashboards into JSON files.")
    parser.add_argument(
        "--check", action="store_true", help="fail if a committed file differs from the build"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write into")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            f"stale dashboards: {', '.join(stale)}; run python dashboards/build.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
