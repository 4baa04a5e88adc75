"""Render a run's KPIs from a real Prometheus to PNG: the dashboards' queries, plotted.

Not a Grafana screenshot: it asks Prometheus's HTTP API (``query_range``) for the same
PromQL the plant-overview dashboard uses and draws the answers with matplotlib, so the
picture shows exactly what Prometheus recorded.

    python dashboards/render.py --prometheus http://127.0.0.1:9090 --minutes 5 --out kpis.png
    python dashboards/render.py --demo --out dashboards/run-kpis.png   # run, scrape, render

``--demo`` does everything on this machine: an ``autofab run`` of the demo plant, a
Prometheus (Debian's ``prometheus`` on the PATH) on a free loopback port with the shipped
config and rules scraping it through the run's file_sd file, then the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: (title, unit, [(label, PromQL)]): the panels, as in the plant-overview dashboard.
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Plant OEE (recording rules, 5 m rates of summed counters)",
        "ratio",
        (
            ("OEE", "plant:autofab_oee:ratio_rate5m"),
            ("availability", "plant:autofab_oee_availability:ratio_rate5m"),
            ("performance", "plant:autofab_oee_performance:ratio_rate5m"),
            ("quality", "plant:autofab_oee_quality:ratio_rate5m"),
        ),
    ),
    (
        "Parts made (good and scrap, counters)",
        "parts",
        (
            ("good", "sum(autofab_plant_parts_good_total)"),
            ("scrap", "sum(autofab_plant_parts_scrap_total)"),
        ),
    ),
    (
        "Power against the peak cap",
        "kW",
        (
            ("plant power", "sum(autofab_plant_power_watts) / 1000"),
            ("peak cap", "max(autofab_plant_power_cap_watts) / 1000"),
        ),
    ),
    (
        "Safety supervisor decisions (cumulative)",
        "decisions",
        (
            ("applied", 'sum(autofab_supervisor_decisions_total{outcome="applied"})'),
            ("clamped", 'sum(autofab_supervisor_decisions_total{outcome="clamped"})'),
            ("rejected", 'sum(autofab_supervisor_decisions_total{outcome="rejected"})'),
        ),
    ),
)


def query_range(base: str, promql: str, start: float, end: float, step: float) -> list[Any]:
    """``/api/v1/query_range`` on a Prometheus at ``base`` (a loopback URL)."""
    params = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=10) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {promql!r}: {body}")
    return list(body["data"]["result"])


def render(base: str, start: float, end: float, out: Path, title: str) -> Path:
    """Plot every panel over [start, end] (Unix seconds) to ``out``."""
    step = max((end - start) / 300, 0.5)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.6 * len(PANELS)), sharex=True)
    for ax, (panel, unit, series) in zip(axes, PANELS, strict=True):
        for label, promql in series:
            for result in query_range(base, promql, start, end, step):
                xs = [float(t) - start for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                ax.plot(xs, ys, label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("wall seconds since the start of the window")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def demo(out: Path, duration: str, speedup: float) -> Path:
    """Run the demo plant under a real Prometheus and render what it recorded."""
    import asyncio
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    import yaml

    from autofab.control.run_cmd import PlantRun, RunSettings
    from autofab.envs.plant import load_plant, parse_duration

    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("prometheus is not on the PATH (Debian: apt-get install prometheus)")
    shipped = Path(__file__).resolve().parents[1] / "configs" / "prometheus"
    work = Path(tempfile.mkdtemp(prefix="autofab-render-"))
    os.chdir(work)  # the run writes runs/file_sd/<plant>.json here

    async def main() -> Path:
        settings = RunSettings(duration_s=parse_duration(duration), speedup=speedup, seed=0)
        async with PlantRun(load_plant("demo"), settings) as run:
            assert run.file_sd is not None
            config = yaml.safe_load((shipped / "prometheus.yml").read_text())
            config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            config["rule_files"] = [str(shipped / f) for f in config["rule_files"]]
            [job] = [j for j in config["scrape_configs"] if j["job_name"] == "autofab"]
            job["file_sd_configs"][0]["files"] = [str(run.file_sd.parent / "*.json")]
            config["scrape_configs"] = [job]
            (work / "prometheus.yml").write_text(yaml.safe_dump(config))
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                start = time.time()
                await run.run_until_done()
                await asyncio.sleep(3)  # a last scrape and rule evaluation
                end = time.time()
                report = run.report()
                title = (
                    f"autofab run, demo plant, {duration} of plant time at {speedup:g}x: "
                    f"{report['parts_good']} good parts, OEE {report['oee']['oee']:.0%}"
                )
                return render(f"http://127.0.0.1:{port}", start, end, out, title)
            finally:
                proc.terminate()
                proc.wait(15)

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10.0, help="The window to plot.")
    parser.add_argument("--out", type=Path, default=Path("kpis.png"))
    parser.add_argument("--demo", action="store_true", help="Run, scrape and render here.")
    parser.add_argument("--duration", default="4h", help="--demo: plant time to run.")
    parser.add_argument("--speedup", type=float, default=240.0, help="--demo: the speedup.")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.demo:
        path = demo(out, args.duration, args.speedup)
    else:
        end = time.time()
        path = render(args.prometheus, end - 60 * args.minutes, end, out, "autofab run KPIs")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
