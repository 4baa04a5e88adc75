"""How long ``autofab run`` takes from command to every agent ready, and how much memory.

Each case runs in a fresh Python process (Ray starts once per process), which starts the
embedded nats-server, the OPC UA plant twin, a local Ray and every actor of the plan
(:func:`autofab.control.cluster.plan_actors`), exactly as ``autofab run`` does, then stops.
Measured: ``agents_ready_s`` (wall seconds from the start of the run to every actor ready)
and the memory in use once ready, as the summed unique set size (USS; PSS where available)
of this process tree and Ray's processes, so shared libraries are not counted once per
process.

The floor beside them, measured the same way in a fresh process: ``ray.init`` plus one
trivial actor answering a call.

    python benchmarks/startup.py                      # demo and plant100, grouped and per agent
    python benchmarks/startup.py --repeats 3 --cases demo:per_line,plant100:per_line

Targets (issue 7): demo at most 15 s; the 100-machine plant grouped (``per_line``) at most
30 s and 4 GB in total.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import environment_info, header, markdown_table, write_report

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = "demo:per_line,demo:per_agent,plant100:per_line,plant100:per_agent"


def _memory_bytes() -> int:
    """PSS (or USS) summed over this process, its children, and Ray's processes."""
    import psutil

    me = psutil.Process()
    procs = {me.pid: me}
    for p in me.children(recursive=True):
        procs[p.pid] = p
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "ray" in (p.info.get("name") or "") or "ray/" in cmd or "raylet" in cmd:
            procs.setdefault(p.pid, p)
    total = 0
    for p in procs.values():
        try:
            full = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += int(getattr(full, "pss", 0) or full.uss)
    return total


def _one_run(plant: str, hosting: str) -> dict[str, Any]:
    """One ``autofab run`` start-up, in this (fresh) process."""
    from autofab.control.run_cmd import PlantRun, RunSettings
    from autofab.envs.plant import load_plant

    config = load_plant(plant)
    settings = RunSettings(duration_s=60.0, hosting=hosting)  # type: ignore[arg-type]

    async def main() -> dict[str, Any]:
        async with PlantRun(config, settings) as run:
            await run.poll()
            return {
                "ready_s": run.agents_ready_s,
                "actors": len(run.specs),
                "machines": run.twin.model.plant.n_machines if run.twin else 0,
                "memory_bytes": _memory_bytes(),
            }

    return asyncio.run(main())


def _one_floor() -> dict[str, Any]:
    """``ray.init`` plus one trivial actor, as autofab run starts Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.monotonic()
    import logging

    import ray

    from autofab.control.ray_tasks import init_local_ray

    init_local_ray(ray, logging_level=logging.WARNING)

    @ray.remote(num_cpus=0)
    class Trivial:
        def ping(self) -> int:
            return 1

    actor = Trivial.remote()  # type: ignore[attr-defined]
    ray.get(actor.ping.remote())
    ready = time.monotonic() - t0
    memory = _memory_bytes()
    ray.shutdown()
    return {"ready_s": ready, "actors": 1, "machines": 0, "memory_bytes": memory}


def _child(case: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", case],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed ({out.returncode}): {out.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="PLANT:HOSTING,...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = _one_floor() if args.child == "floor" else _one_run(*args.child.split(":"))
        print(json.dumps(result), flush=True)
        return
    info = environment_info("ray", "asyncua", "nats-py")
    print(header(info))
    cases = ["floor", *[c.strip() for c in args.cases.split(",") if c.strip()]]
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for r in range(args.repeats):
        for case in cases:
            results[case].append(_child(case))
            got = results[case][-1]
            print(
                f"  repeat {r + 1} {case}: {got['ready_s']:.1f} s, "
                f"{got['memory_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
    floor = statistics.median(x["ready_s"] for x in results["floor"])
    rows = []
    summary: dict[str, Any] = {}
    for case in cases:
        ready = [x["ready_s"] for x in results[case]]
        memory = [x["memory_bytes"] / 2**30 for x in results[case]]
        med = statistics.median(ready)
        summary[case] = {
            "ready_s_median": med,
            "ready_s": ready,
            "memory_gib_median": statistics.median(memory),
            "actors": results[case][0]["actors"],
            "machines": results[case][0]["machines"],
        }
        rows.append(
            [
                "ray.init + 1 trivial actor (floor)" if case == "floor" else case,
                str(results[case][0]["actors"]),
                f"{med:.1f} [{min(ready):.1f}-{max(ready):.1f}]",
                f"{med / floor:.1f}x",
                f"{statistics.median(memory):.2f}",
            ]
        )
    print(
        markdown_table(
            ["case (plant:hosting)", "actors", "ready s, median [min-max]", "vs floor", "GiB"],
            rows,
            left=1,
        )
    )
    write_report(args.json, {"environment": info, "results": summary})


if __name__ == "__main__":
    main()
