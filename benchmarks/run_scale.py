"""``autofab run`` at scale: simulated seconds per wall second, and negotiation latency.

For each plant and speedup it runs the whole loop (embedded nats-server, the OPC UA twin,
local Ray, every actor) for ``--duration`` of plant time and reports:

* **sim-s per wall-s**: plant time advanced over wall time, from agents ready to the end;
* **negotiation p50/p99**: the scheduler's contract-net rounds, call for proposals to
  award, in wall milliseconds;
* what the plant made: operations, good parts, OEE.

The peer, measured in the same run: the same plant model with the same seed and the
twin's own local dispatcher (oldest released job first, no agents, no network), stepped
as fast as it goes. Its OEE says what the plant can do; the loop's OEE beside it says how
much of that the agents keep at this speedup (every operation crosses NATS, the supervisor
and OPC UA several times, and at a high speedup each wall millisecond is a lot of plant).

    python benchmarks/run_scale.py                       # demo and plant100 at 120x, 1 h
    python benchmarks/run_scale.py --plants demo --speedups 60,240,960 --duration 2h
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from common import environment_info, header, markdown_table, write_report

from autofab.envs.factory_model import FactoryModel
from autofab.envs.plant import load_plant, parse_duration


def model_alone(plant: str, duration_s: float, seed: int) -> dict[str, Any]:
    """The plant model with the twin's local dispatcher, no agents: the peer."""
    model = FactoryModel.from_config(load_plant(plant), seed=seed)
    started = time.perf_counter()
    while model.now < duration_s - 1e-6:
        for m in model.needs_decision():
            jobs = model.candidates(int(m))
            model.decide(int(m), int(jobs[0]) if len(jobs) else None)
        model.run_until(min(model.now + 60.0, duration_s))
    wall = time.perf_counter() - started
    kpis = model.kpis()
    return {
        "sim_per_wall": model.now / wall,
        "ops": len(model.attempts),
        "parts_good": kpis["parts_good"],
        "oee": kpis["oee"]["oee"],
    }


def under_run(plant: str, duration_s: float, speedup: float, seed: int) -> dict[str, Any]:
    """The whole loop under ``autofab run`` (one fresh Ray per call)."""
    from autofab.control.run_cmd import PlantRun, RunSettings

    settings = RunSettings(duration_s=duration_s, speedup=speedup, seed=seed)

    async def main() -> dict[str, Any]:
        async with PlantRun(load_plant(plant), settings) as run:
            assert run.twin is not None
            t0, p0 = time.monotonic(), run.twin.model.now
            await run.run_until_done()
            wall = time.monotonic() - t0
            report = run.report()
            return {
                "sim_per_wall": (run.twin.model.now - p0) / wall,
                "ops": len(run.twin.model.attempts),
                "parts_good": report["parts_good"],
                "oee": report["oee"]["oee"],
                "rounds": report["negotiation"].get("count", 0),
                "p50_ms": 1e3 * report["negotiation"].get("p50_s", float("nan")),
                "p99_ms": 1e3 * report["negotiation"].get("p99_s", float("nan")),
                "machines": run.twin.model.plant.n_machines,
                "ready_s": report["agents_ready_s"],
            }

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plants", default="demo,plant100")
    parser.add_argument("--speedups", default="120")
    parser.add_argument("--duration", default="1h", help="Plant time per run (like 1h, 90m).")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per case (seeds 0..).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    duration = parse_duration(args.duration)
    info = environment_info("ray", "asyncua", "nats-py")
    print(header(info))
    rows, results = [], {}
    for plant in [p.strip() for p in args.plants.split(",") if p.strip()]:
        peer = [model_alone(plant, duration, seed) for seed in range(args.repeats)]
        for speedup in [float(x) for x in args.speedups.split(",")]:
            runs = [under_run(plant, duration, speedup, seed) for seed in range(args.repeats)]

            def med(key: str, values: list[dict[str, Any]]) -> float:
                return float(statistics.median(v[key] for v in values))

            case = f"{plant}@{speedup:g}x"
            results[case] = {"run": runs, "model_alone": peer}
            oee_run, oee_peer = med("oee", runs), med("oee", peer)
            rows.append(
                [
                    case,
                    str(runs[0]["machines"]),
                    f"{med('sim_per_wall', runs):,.0f}",
                    f"{med('sim_per_wall', peer):,.0f}",
                    f"{med('p50_ms', runs):.1f}",
                    f"{med('p99_ms', runs):.1f}",
                    f"{med('ops', runs):.0f} / {med('ops', peer):.0f}",
                    f"{oee_run:.1%} / {oee_peer:.1%}",
                    f"{oee_run / oee_peer:.2f}" if oee_peer > 0 else "n/a",
                ]
            )
            print(f"  {case}: {runs}", flush=True)
    print(
        markdown_table(
            [
                "plant@speedup",
                "machines",
                "run sim-s/wall-s",
                "model alone sim-s/wall-s",
                "negotiation p50 ms",
                "p99 ms",
                "ops run / alone",
                "OEE run / alone",
                "OEE ratio",
            ],
            rows,
            left=1,
        )
    )
    write_report(args.json, {"environment": info, "duration_s": duration, "results": results})


if __name__ == "__main__":
    main()
