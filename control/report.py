"""Reports of one simulated shift: the KPI rows, a JSON report, and a chart.

``autofab simulate`` prints :func:`kpi_rows` as a table and writes :func:`shift_report`
and :func:`shift_chart` into its run folder. The rows and the JSON take their figures
from the same :meth:`~autofab.envs.factory_model.FactoryModel.kpis` dictionary, so the
table and the file always agree.

matplotlib is imported inside :func:`shift_chart` only (it takes about half a second), so
importing this module keeps ``autofab --help`` quick. Figures use the object API with an
Agg canvas, as :mod:`autofab.control.plots` does: no GUI backend, no global figure state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autofab.envs.factory_model import FactoryModel, MachineStatus

__all__ = ["kpi_rows", "shift_chart", "shift_report", "write_json"]

#: Version of the report.json layout; bump it when a key changes meaning.
REPORT_SCHEMA = 1


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def kpi_rows(kpis: Mapping[str, Any], currency: str = "EUR") -> list[tuple[str, str, str]]:
    """The KPIs as ``(name, value, unit)`` rows, in the order people read a shift report:
    output, time, OEE, energy, downtime, supply."""
    oee = kpis["oee"]
    return [
        ("orders released / total", f"{kpis['orders_released']} / {kpis['orders']}", ""),
        ("parts good", str(kpis["parts_good"]), "parts"),
        ("parts scrapped", str(kpis["parts_scrap"]), "parts"),
        ("operations reworked", str(kpis["ops_reworked"]), "ops"),
        ("makespan", _hours(kpis["makespan_s"]), "h"),
        ("tardiness", _hours(kpis["tardiness_s"]), "h"),
        ("OEE", _pct(oee["oee"]), "%"),
        ("  availability", _pct(oee["availability"]), "%"),
        ("  performance", _pct(oee["performance"]), "%"),
        ("  quality", _pct(oee["quality"]), "%"),
        ("energy", f"{kpis['energy_kwh']:.1f}", "kWh"),
        ("energy cost", f"{kpis['energy_cost']:.2f}", currency),
        ("CO2", f"{kpis['co2_kg']:.1f}", "kg"),
        ("peak power / cap", f"{kpis['peak_kw']:.1f} / {kpis['cap_kw']:.1f}", "kW"),
        ("cap violations", str(kpis["cap_violations"]), ""),
        ("time over cap", f"{kpis['over_cap_s']:.0f}", "s"),
        ("breakdowns", str(kpis["breakdowns"]), ""),
        ("unplanned downtime", _hours(kpis["unplanned_downtime_s"]), "h"),
        ("maintenance actions", str(kpis["maintenance"]), ""),
        ("planned downtime", _hours(kpis["planned_downtime_s"]), "h"),
        ("late deliveries", str(kpis["late_deliveries"]), ""),
        ("decisions", str(kpis.get("decisions", "")), ""),
    ]


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into JSON-ready Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        x = float(value)
        return x if math.isfinite(x) else None
    return value


def shift_report(
    model: FactoryModel,
    kpis: Mapping[str, Any],
    *,
    policy: str,
    seed: int,
) -> dict[str, Any]:
    """Everything about one shift a later analysis needs, as JSON-ready data.

    Keys: ``schema``, ``plant``, ``policy``, ``seed``, ``horizon_s``,
    ``shift_start_hour``, ``currency``, ``kpis`` (as :meth:`FactoryModel.kpis` plus
    ``decisions``), ``machines`` (per-machine counters, in machine index order),
    ``attempts`` (every finished operation attempt, scrapped and reworked ones included),
    ``events`` (breakdowns, repairs, maintenance, defects) and ``power_trace`` (plant
    power in kW at times in s). Machines are named by index, as in ``autofab schedule``'s
    JSON; ``machines[i]["name"]`` names machine ``i``.
    """
    p = model.plant
    cfg = p.config
    machines = []
    for m, name in enumerate(p.machine_names):
        machines.append(
            {
                "name": name,
                "line": p.line_names[int(p.machine_line[m])],
                "run_s": model.run_s[m],
                "unplanned_downtime_s": model.down_s[m],
                "planned_downtime_s": model.maintenance_s[m],
                "breakdowns": model.breakdowns[m],
                "maintenance": model.maintenances[m],
                "parts_good": model.parts_good[m],
                "parts_defective": model.parts_defective[m],
                "energy_kwh": model.machine_energy_j[m] / 3.6e6,
                "oee": model.oee(np.array([m])),
            }
        )
    return _plain(
        {
            "schema": REPORT_SCHEMA,
            "plant": cfg.name,
            "policy": policy,
            "seed": seed,
            "horizon_s": model.horizon,
            "shift_start_hour": cfg.shift_start_hour,
            "currency": cfg.energy.currency,
            "kpis": dict(kpis),
            "machines": machines,
            "attempts": model.attempts,
            "events": [
                {"time_s": t, "kind": kind, "machine": m, "detail": detail}
                for t, kind, m, detail in model.events
            ],
            "power_trace": {
                "time_s": [t for t, _ in model.power_trace],
                "kw": [w / 1e3 for _, w in model.power_trace],
            },
        }
    )


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON; returns the path. Raises ``OSError``."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def _intervals(model: FactoryModel, start: str, end: str) -> list[tuple[int, float, float]]:
    """``(machine, begin, finish)`` of each repair or maintenance, from the event log; one
    still open at the end of the run lasts until then."""
    open_at: dict[int, float] = {}
    out: list[tuple[int, float, float]] = []
    for t, kind, m, _ in model.events:
        if kind == start:
            open_at[m] = t
        elif kind == end and m in open_at:
            out.append((m, open_at.pop(m), t))
    out.extend((m, t, model.now) for m, t in open_at.items())
    return out


def shift_chart(model: FactoryModel, path: str | Path, title: str | None = None) -> Path:
    """Draw the shift and save it to ``path`` (format from the suffix).

    Top: a Gantt chart, one row per machine, operations coloured by product (hatched
    when the part came out defective, faded when still running at the end), repairs in
    red and maintenance in grey. Bottom: the plant's power against the peak cap, with the
    time over the cap shaded and the tariff on a second axis. Time is the plant's clock.

    Raises ``ValueError`` for an unknown file format and ``OSError`` when the file cannot
    be written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    p = model.plant
    cfg = p.config
    n = p.n_machines
    t0 = cfg.shift_start_hour

    def clock(seconds: Any) -> Any:
        return t0 + np.asarray(seconds, dtype=np.float64) / 3600.0

    products = [prod.name for prod in cfg.products]
    palette = colormaps["tab10"]
    colors = [palette(i % 10) for i in range(len(products))]

    fig = Figure(figsize=(12, 4.0 + 0.4 * n), layout="constrained")
    FigureCanvasAgg(fig)
    gantt, power = fig.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [max(2.0, 0.4 * n), 2.5]}
    )

    def bars(rows: list[tuple[int, float, float, Any]], **style: Any) -> None:
        """One barh call per kind of bar: ``(machine, start s, end s, colour)`` rows."""
        if rows:
            m, a, b, color = zip(*rows, strict=True)
            start = np.asarray(a)
            width = (np.asarray(b) - start) / 3600.0
            gantt.barh(m, width, left=clock(start), height=0.75, color=list(color), **style)

    outline = {"edgecolor": "black", "linewidth": 0.3}
    done: dict[bool, list[tuple[int, float, float, Any]]] = {False: [], True: []}
    for rec in model.attempts:
        product = int(model.orders.job_product[rec["job"]])
        done[bool(rec["defective"])].append(
            (rec["machine"], rec["start"], rec["end"], colors[product])
        )
    bars(done[False], **outline)
    bars(done[True], hatch="xxx", **outline)
    running = []
    for m in range(n):
        op = int(model.machine_op[m])
        busy = model.status[m] in (MachineStatus.RUNNING, MachineStatus.DOWN)
        if op >= 0 and busy and model.work_left[m] > 1e-9:
            product = int(model.orders.job_product[int(model.instance.op_job[op])])
            running.append((m, float(model.op_start[op]), model.now, colors[product]))
    bars(running, alpha=0.4, **outline)
    repairs = [(m, a, b, "crimson") for m, a, b in _intervals(model, "breakdown", "repaired")]
    bars(repairs, alpha=0.85, edgecolor="darkred", linewidth=0.3)
    upkeep = [(m, a, b, "0.55") for m, a, b in _intervals(model, "maintenance", "maintained")]
    bars(upkeep, edgecolor="0.2", linewidth=0.3)
    gantt.set_yticks(range(n), labels=list(p.machine_names))
    gantt.set_ylim(n - 0.5, -0.5)
    gantt.set_ylabel("machine")
    gantt.grid(axis="x", linestyle=":", linewidth=0.5)
    handles = [Patch(color=c, label=name) for c, name in zip(colors, products, strict=True)]
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch="xxx", label="defective"),
        Patch(color="crimson", label="repair"),
        Patch(color="0.55", label="maintenance"),
    ]
    gantt.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    gantt.set_title(title or f"{cfg.name}: one shift")

    cap_kw = model.cap_w / 1e3
    if model.power_trace:
        t = clock([x for x, _ in model.power_trace])
        kw = np.array([w for _, w in model.power_trace]) / 1e3
        power.plot(t, kw, color="tab:blue", linewidth=1.0, label="plant power")
        power.fill_between(t, cap_kw, kw, where=kw > cap_kw, color="crimson", alpha=0.3)
    power.axhline(cap_kw, color="crimson", linestyle="--", linewidth=1.2, label="peak cap")
    power.set_ylabel("power (kW)")
    power.set_xlabel("time of day (h)")
    power.set_ylim(bottom=0)
    power.grid(linestyle=":", linewidth=0.5)
    tariff = power.twinx()
    end = t0 + max(model.now, 1.0) / 3600.0
    hours = np.arange(math.floor(t0), math.ceil(end) + 1)
    prices = p.tariff_per_j[hours.astype(int) % 24] * 3.6e6
    tariff.step(
        hours, prices, where="post", color="tab:orange", linewidth=1.0, alpha=0.8, label="tariff"
    )
    tariff.set_ylabel(f"tariff ({cfg.energy.currency}/kWh)", color="tab:orange")
    tariff.set_ylim(bottom=0, top=1.6 * float(prices.max()) if prices.size else None)
    lines = power.get_legend_handles_labels()
    extra = tariff.get_legend_handles_labels()
    power.legend(
        lines[0] + extra[0], lines[1] + extra[1], loc="upper right", fontsize=8, frameon=False
    )
    power.set_xlim(t0, end)
    fig.savefig(path, dpi=110)
    return path
