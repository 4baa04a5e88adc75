"""Simulated hours per wall second, and decision steps/s, of the factory model.

Runs whole shifts of the demo plant and the 100-machine plant with an MWKR dispatching
policy, on several seeds, and prints the median with the min and max over seeds.

There is no off-the-shelf factory simulator with these dynamics to compare against, so
the peer is a **time-stepped reference (dt=1 s), a reimplementation for comparison, not
a third-party library**: the conventional way to simulate such a plant. It advances a
fixed tick, and on every tick draws each running machine's breakdown from its hazard,
wears it, adds each machine's power x dt to the energy, counts down work and repairs,
and dispatches with the same MWKR rule. It is vectorised over machines with numpy (one
Python loop iteration per tick, plus one per dispatch), so it is a fair, not a naive,
tick simulation.

Both sides simulate the same subset of the dynamics on the same orders: machines,
operations at nominal speed, order arrivals, wear, hazard-driven breakdowns with
lognormal repairs, and energy with a base load. The event-driven model runs with
``quality``, ``supply`` and ``sensors`` switched off so that it does no work the
reference does not; it still computes cost, CO2, temperature and the OEE counters, which
the reference skips. Randomness differs (the reference samples failures per tick), so
the two trajectories differ in detail but not in distribution; the sanity table shows
parts, breakdowns and energy side by side. A cross-check on seed 0 with wear and
failures off, where only the orders are random, shows both simulators making the same
dispatches, so the reference implements the same plant.

A *decision step* is one dispatch: a policy call that starts an operation. Both sides
make about the same number per shift, so decision steps/s compares like with like. The
event-driven model also asks idle machines with nothing to do whether to wait; those
policy calls are shown separately, for information.

Run from the repository root::

    python benchmarks/factory_speed.py                  # demo and plant100, 5 seeds
    python benchmarks/factory_speed.py --seeds 3 --json factory_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# The table helpers are shared with the environment speed benchmark next to this file.
from common import environment_info, header, markdown_table, spread

from autofab.envs.factory_model import (
    Decision,
    FactoryModel,
    OrderBook,
    generate_orders,
    run_shift,
)
from autofab.envs.plant import PlantArrays, PlantConfig, compile_plant, load_plant
from autofab.envs.rules import RULES

OURS = "autofab (event-driven)"
PEER = (
    "time-stepped reference (dt=1 s), a reimplementation for comparison, not a third-party library"
)
PEER_SHORT = "time-stepped reference (dt=1 s)"
#: The dynamics both sides simulate; the rest are switched off in the event-driven model.
SHARED_DYNAMICS = {"quality": False, "supply": False, "sensors": False}


@dataclass
class Shift:
    """What one simulated shift did, and how long it took."""

    seed: int
    wall_s: float
    sim_s: float
    dispatches: int
    policy_calls: int
    parts: int
    breakdowns: int
    energy_kwh: float

    @property
    def sim_h_per_s(self) -> float:
        return self.sim_s / 3600.0 / self.wall_s

    @property
    def dispatches_per_s(self) -> float:
        return self.dispatches / self.wall_s


@dataclass
class Measurement:
    plant: str
    simulator: str
    n_machines: int
    shifts: list[Shift] = field(default_factory=list)

    def figures(self, name: str) -> list[float]:
        return [float(getattr(s, name)) for s in self.shifts]

    def median(self, name: str) -> float:
        return statistics.median(self.figures(name))


# ---------------------------------------------------------------------- ours


class MwkrPolicy:
    """Most work remaining among the machine's candidates; wait when there are none.

    Counts its calls, and the calls that started an operation (the decision steps)."""

    def __init__(self) -> None:
        self.score = RULES["mwkr"]
        self.calls = 0
        self.dispatches = 0

    def __call__(self, model: FactoryModel, machine: int) -> Decision:
        self.calls += 1
        jobs = model.candidates(machine)
        if len(jobs) == 0:
            return Decision()
        self.dispatches += 1
        return Decision(job=int(jobs[np.argmin(self.score(model)[jobs])]))


def run_ours(plant: PlantArrays, seed: int) -> Shift:
    """One event-driven shift; times building the model and running it, not the orders."""
    rng = np.random.default_rng(seed)
    horizon = plant.config.horizon_seconds
    orders = generate_orders(plant, horizon, rng)  # exactly what from_config(seed) draws
    policy = MwkrPolicy()
    start = time.perf_counter()
    model = FactoryModel(plant, orders, horizon, rng)
    kpis = run_shift(model, policy)
    wall = time.perf_counter() - start
    return Shift(
        seed=seed,
        wall_s=wall,
        sim_s=model.now,
        dispatches=policy.dispatches,
        policy_calls=policy.calls,
        parts=kpis["parts_good"],
        breakdowns=kpis["breakdowns"],
        energy_kwh=kpis["energy_kwh"],
    )


# ---------------------------------------------------------------------- the peer


def run_tick_reference(plant: PlantArrays, orders: OrderBook, seed: int, dt: float) -> Shift:
    """The time-stepped reference: one shift in fixed ticks of ``dt`` seconds.

    Per tick: power of every machine (running: ``idle + load * speed**b * (1 + g(1-h))``,
    idle: ``idle``, down: ``down``) plus the base load, times ``dt``, into the energy;
    running machines wear by ``rate * speed**a * dt`` and break down with probability
    ``hazard * dt``; work and repairs count down; finished operations free their job;
    then every idle machine with work takes the job with the most work remaining.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    inst = orders.instance
    n = plant.n_machines
    horizon = plant.config.horizon_seconds
    base_w = plant.config.energy.base_load_kw * 1e3
    dyn = plant.config.dynamics
    speed = plant.speed_nominal.copy()
    run_w = plant.load_w * speed**plant.power_exponent
    wear_per_tick = plant.wear_per_s * speed**plant.wear_speed_exponent * dt * dyn.wear
    base_hazard = plant.hazard_per_s * dyn.failures
    work_per_tick = speed * dt
    repair_sigma = np.sqrt(np.log1p(plant.repair_cv**2))
    repair_mu = np.log(plant.repair_mean_s) - repair_sigma**2 / 2

    health = rng.uniform(plant.health0_min, plant.health0_max) if dyn.wear else np.ones(n)
    status = np.zeros(n, dtype=np.int64)  # 0 idle, 1 running, 2 down
    work_left = np.zeros(n)
    repair_left = np.zeros(n)
    machine_job = np.full(n, -1, dtype=np.int64)
    job_next = inst.job_offsets[:-1].astype(np.int64).copy()
    job_end = inst.job_offsets[1:].astype(np.int64)
    job_busy = np.zeros(inst.n_jobs, dtype=bool)
    release = inst.release
    eligible = inst.eligible
    durations = inst.durations
    # Work remaining from each operation to the end of its job (MWKR's score).
    work_from = np.zeros(inst.n_ops)
    for j in range(inst.n_jobs):
        lo, hi = inst.job_offsets[j], inst.job_offsets[j + 1]
        work_from[lo:hi] = np.cumsum(inst.min_duration[lo:hi][::-1])[::-1]

    energy_j = 0.0
    dispatches = breakdowns = parts = 0
    ticks = math.ceil(horizon / dt)
    tick = 0
    while tick < ticks and parts < inst.n_jobs:
        running = status == 1
        power = np.where(
            running,
            plant.idle_w + run_w * (1 + plant.power_wear_gain * (1 - health)),
            np.where(status == 0, plant.idle_w, plant.down_w),
        )
        energy_j += (float(power.sum()) + base_w) * dt
        health -= wear_per_tick * running
        hazard = base_hazard * np.exp(plant.hazard_sensitivity * (1 - health))
        failed = running & (rng.random(n) < hazard * dt)
        for m in np.flatnonzero(failed):
            status[m] = 2
            repair_left[m] = rng.lognormal(repair_mu[m], repair_sigma[m])
            breakdowns += 1
        working = running & ~failed
        work_left -= work_per_tick * working
        for m in np.flatnonzero(working & (work_left <= 1e-9)):
            job = machine_job[m]
            job_next[job] += 1
            job_busy[job] = False
            parts += int(job_next[job] == job_end[job])
            status[m] = 0
            machine_job[m] = -1
        down = status == 2
        repair_left -= dt * down
        for m in np.flatnonzero(down & (repair_left <= 1e-9)):
            health[m] = max(health[m], plant.repair_health[m])
            status[m] = 1 if machine_job[m] >= 0 else 0
        tick += 1
        now = tick * dt
        idle = np.flatnonzero(status == 0)
        if idle.size == 0:
            continue
        waiting = np.flatnonzero(~job_busy & (job_next < job_end) & (release <= now))
        if waiting.size == 0 or not eligible[job_next[waiting]][:, idle].any():
            continue
        for m in idle:
            ops = job_next[waiting]
            ok = eligible[ops, m] & ~job_busy[waiting]
            if not ok.any():
                continue
            k = int(np.argmax(np.where(ok, work_from[ops], -1.0)))
            job, op = waiting[k], ops[k]
            status[m] = 1
            work_left[m] = durations[op, m]
            machine_job[m] = job
            job_busy[job] = True
            dispatches += 1
    wall = time.perf_counter() - start
    return Shift(
        seed=seed,
        wall_s=wall,
        sim_s=tick * dt,
        dispatches=dispatches,
        policy_calls=dispatches,
        parts=parts,
        breakdowns=breakdowns,
        energy_kwh=energy_j / 3.6e6,
    )


def run_peer(plant: PlantArrays, seed: int, dt: float) -> Shift:
    """The reference on the orders the event-driven model gets for the same seed."""
    rng = np.random.default_rng(seed)
    orders = generate_orders(plant, plant.config.horizon_seconds, rng)
    return run_tick_reference(plant, orders, seed, dt)


# ---------------------------------------------------------------------- measuring


def shared_subset(config: PlantConfig) -> PlantArrays:
    dynamics = config.dynamics.model_copy(update=SHARED_DYNAMICS)
    return compile_plant(config.model_copy(update={"dynamics": dynamics}))


def measure(name: str, seeds: Sequence[int], dt: float) -> tuple[Measurement, Measurement]:
    """Interleaved shifts of ours and the peer on each seed, after one untimed warm-up."""
    plant = shared_subset(load_plant(name))
    ours = Measurement(name, OURS, plant.n_machines)
    peer = Measurement(name, PEER_SHORT, plant.n_machines)
    run_ours(plant, seeds[0])
    run_peer(plant, seeds[0], dt)
    for i, seed in enumerate(seeds):
        pair = [(ours, lambda s: run_ours(plant, s)), (peer, lambda s: run_peer(plant, s, dt))]
        for m, run in pair if i % 2 == 0 else pair[::-1]:
            m.shifts.append(run(seed))
            print(
                f"  {name} seed {seed} {m.simulator}: {m.shifts[-1].wall_s:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    return ours, peer


def cross_check(name: str, dt: float) -> list[list[str]]:
    """Seed 0 with wear and failures off, the only randomness left being the orders: the
    two simulators must then make the same dispatches, so the reference is shown to
    implement the same plant (up to arrivals rounded to the tick)."""
    config = load_plant(name)
    dynamics = config.dynamics.model_copy(
        update={**SHARED_DYNAMICS, "wear": False, "failures": False}
    )
    plant = compile_plant(config.model_copy(update={"dynamics": dynamics}))
    rows = []
    for label, shift in ((OURS, run_ours(plant, 0)), (PEER_SHORT, run_peer(plant, 0, dt))):
        rows.append(
            [name, label, str(shift.dispatches), str(shift.parts), f"{shift.energy_kwh:,.2f}"]
        )
    return rows


# ---------------------------------------------------------------------- reporting


def speed_table(results: list[tuple[Measurement, Measurement]]) -> str:
    rows = []
    for ours, peer in results:
        hour_ratio = ours.median("sim_h_per_s") / peer.median("sim_h_per_s")
        step_ratio = ours.median("dispatches_per_s") / peer.median("dispatches_per_s")
        for m, ratios in ((ours, (hour_ratio, step_ratio)), (peer, (1.0, 1.0))):
            rows.append(
                [
                    f"{m.plant} ({m.n_machines})",
                    m.simulator,
                    spread(m.figures("sim_h_per_s"), ",.1f"),
                    f"{ratios[0]:,.1f}x",
                    spread(m.figures("dispatches_per_s"), ",.0f"),
                    f"{ratios[1]:,.1f}x",
                    spread(m.figures("wall_s"), ".3f"),
                ]
            )
    header = [
        "plant (machines)",
        "simulator",
        "sim h / wall s, median [min-max]",
        "ratio",
        "decision steps/s, median [min-max]",
        "ratio",
        "wall s per shift",
    ]
    return markdown_table(header, rows)


def sanity_table(results: list[tuple[Measurement, Measurement]]) -> str:
    rows = [
        [
            m.plant,
            m.simulator,
            f"{m.median('sim_s') / 3600:g}",
            f"{m.median('parts'):g}",
            f"{m.median('dispatches'):g}",
            f"{m.median('breakdowns'):g}",
            f"{m.median('energy_kwh'):,.0f}",
        ]
        for pair in results
        for m in pair
    ]
    header = ["plant", "simulator", "sim h", "parts", "decision steps", "breakdowns", "kWh"]
    return markdown_table(header, rows)


def waits_table(results: list[tuple[Measurement, Measurement]]) -> str:
    rows = [
        [
            ours.plant,
            f"{ours.median('policy_calls'):g}",
            spread([s.policy_calls / s.wall_s for s in ours.shifts], ",.0f"),
        ]
        for ours, _ in results
    ]
    return markdown_table(["plant", "policy calls", "policy calls/s, median [min-max]"], rows, 1)


# ---------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Simulated hours per wall second and decision steps/s of the "
        "event-driven factory model against a time-stepped reference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--plants", default="demo,plant100", help="comma-separated plants")
    parser.add_argument("--seeds", type=int, default=5, help="shifts (seeds 0..N-1) per side")
    parser.add_argument("--dt", type=float, default=1.0, help="reference tick, seconds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure")
    args = parser.parse_args(argv)
    args.plants = [p.strip() for p in args.plants.split(",") if p.strip()]
    if not args.plants:
        parser.error("--plants: give at least one plant, e.g. demo,plant100")
    if args.seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {args.seeds}")
    if not args.dt > 0:
        parser.error(f"--dt: must be > 0, got {args.dt}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = environment_info()
    print(header(info))
    print(f"peer: {PEER}")
    print(
        "workload: one 8 h shift per seed, MWKR dispatch at nominal speed; shared dynamics: "
        "orders, wear, hazard breakdowns + lognormal repair, energy (ours also: cost, CO2, "
        f"temperature, OEE); seeds 0..{args.seeds - 1}, medians [min-max] over seeds"
    )
    seeds = list(range(args.seeds))
    results = [measure(name, seeds, args.dt) for name in args.plants]
    print()
    print(speed_table(results))
    print()
    print("Same work on both sides (medians over seeds):")
    print()
    print(sanity_table(results))
    print()
    print("Cross-check, seed 0 with wear and failures off (no randomness but the orders):")
    print()
    rows = [row for name in args.plants for row in cross_check(name, args.dt)]
    print(markdown_table(["plant", "simulator", "decision steps", "parts", "kWh"], rows))
    print()
    print("Informative: event-driven policy calls including waits (not compared):")
    print()
    print(waits_table(results))
    if args.json:
        payload = {
            "info": info,
            "peer": PEER,
            "results": [
                {**asdict(m), "shifts": [asdict(s) for s in m.shifts]}
                for pair in results
                for m in pair
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
