"""An exact(ish) reference: solve a job shop with OR-Tools CP-SAT under a time limit.

Dispatching rules and learned policies are compared against this solver on the same
instance. Within the time limit CP-SAT usually proves optimality on small instances
(``ft06`` in well under a second) and returns a strong upper bound on larger ones, so its
gap is the yardstick a learned policy is measured by.

The model is the textbook one: a start and end variable per operation, an interval per
eligible machine (optional, with a presence literal, when the operation has more than one
eligible machine, so flexible shops are covered), route precedence, release times,
``NoOverlap`` per machine, and a makespan variable to minimise.

CP-SAT works on integers. Benchmark durations are integers and are used as they are. When
an instance has fractional durations or release times, every time is multiplied by the
smallest power of ten up to ``10**3`` that makes them whole; past that, times are rounded
*up* at ``10**3``. Rounding up keeps the solver's schedule feasible in real time: the
reported schedule uses the true processing times, so every operation ends no later than
the solver believed, and precedence and no-overlap still hold. The makespan reported is the
real one, read from that schedule.

Runs are seeded (``random_seed = 0``). With one worker and a time limit that is not hit,
results repeat exactly; with several workers, or when the limit cuts the search short, the
solution found can differ from run to run: that is CP-SAT's parallel portfolio, not ours.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autofab.envs.instances import Instance
from autofab.envs.validate import validate_schedule

if TYPE_CHECKING:  # OR-Tools takes about a second to import: only a solve loads it
    from ortools.sat.python import cp_model

__all__ = ["CpSatError", "CpSatResult", "available_cpus", "solve_cpsat", "time_scale"]

#: Largest factor fractional times are scaled by before they are rounded up.
MAX_TIME_SCALE = 1000
#: The solver's random seed: fixed, so runs repeat as far as CP-SAT allows.
RANDOM_SEED = 0


class CpSatError(RuntimeError):
    """CP-SAT found no schedule (time limit too short, or the model is infeasible)."""


@dataclass(frozen=True)
class CpSatResult:
    """A CP-SAT solution, with what is needed to report it fairly.

    Attributes:
        makespan: The schedule's makespan, in the instance's own time units.
        schedule: One ``{job, index, machine, start, end}`` entry per operation, sorted by
            start time like ``info["schedule"]`` of ``autofab/JobShop-v0``; validated.
        status: ``"OPTIMAL"`` (proven) or ``"FEASIBLE"`` (the time limit stopped the proof).
        seconds: Wall time of the solve, model building included.
        workers: Search workers CP-SAT ran with (report it with the time limit: CP-SAT's
            result depends on both).
    """

    makespan: float
    schedule: list[dict[str, Any]]
    status: str
    seconds: float
    workers: int


def available_cpus() -> int:
    """CPUs this process may run on (its affinity set, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def time_scale(instance: Instance) -> int:
    """The factor that makes the instance's durations and release times integers.

    1 for the benchmarks. Otherwise the smallest power of ten up to
    :data:`MAX_TIME_SCALE` that makes them whole, else :data:`MAX_TIME_SCALE` (and
    :func:`solve_cpsat` rounds up).
    """
    values = np.concatenate([instance.durations[instance.eligible], instance.release])
    scale = 1
    while scale <= MAX_TIME_SCALE:
        scaled = values * scale
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-9 * np.maximum(1.0, scaled)):
            return scale
        scale *= 10
    return MAX_TIME_SCALE


def _ticks(value: float, scale: int) -> int:
    """``value`` in solver ticks, rounded up (exact when ``value * scale`` is whole)."""
    scaled = value * scale
    nearest = round(scaled)
    return int(nearest) if abs(scaled - nearest) <= 1e-9 * max(1.0, scaled) else math.ceil(scaled)


def solve_cpsat(
    instance: Instance,
    time_limit_s: float,
    workers: int | None = None,
    hint: Sequence[Mapping[str, Any]] | None = None,
) -> CpSatResult:
    """Minimise the makespan of ``instance`` with CP-SAT within ``time_limit_s`` seconds.

    Args:
        instance: A classic or flexible job shop.
        time_limit_s: Search time limit in seconds (> 0).
        workers: Search workers; default :func:`available_cpus`.
        hint: A schedule (``{job, index, machine, start, ...}`` entries, e.g. a rule's or a
            policy's) given to CP-SAT as a solution hint on start times and machine choices,
            so the search starts from it and improves it.

    Returns:
        The best schedule found, already checked by
        :func:`~autofab.envs.validate.validate_schedule`.

    Raises:
        ValueError: ``time_limit_s`` or ``workers`` is out of range, or ``hint`` names an
            operation or machine the instance does not have.
        CpSatError: No schedule was found within the time limit.
    """
    if not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ValueError(f"CP-SAT time limit must be a number of seconds > 0, got {time_limit_s}")
    n_workers = available_cpus() if workers is None else workers
    if n_workers < 1:
        raise ValueError(f"CP-SAT workers must be >= 1, got {workers}")
    started = time.perf_counter()
    scale = time_scale(instance)
    inst = instance
    ticks = {
        (int(o), int(m)): _ticks(float(inst.durations[o, m]), scale)
        for o, m in zip(*np.nonzero(inst.eligible), strict=True)
    }
    release = [_ticks(float(r), scale) for r in inst.release]
    horizon = max(release) + sum(
        max(ticks[o, int(m)] for m in np.flatnonzero(inst.eligible[o])) for o in range(inst.n_ops)
    )

    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    starts: list[cp_model.IntVar] = []
    ends: list[cp_model.IntVar] = []
    # op -> {machine: presence literal}; absent for single-machine operations.
    chosen: dict[int, dict[int, cp_model.IntVar]] = {}
    per_machine: list[list[cp_model.IntervalVar]] = [[] for _ in range(inst.n_machines)]
    for o in range(inst.n_ops):
        j = int(inst.op_job[o])
        start = model.new_int_var(release[j], horizon, f"s{o}")
        end = model.new_int_var(release[j], horizon, f"e{o}")
        machines = [int(m) for m in np.flatnonzero(inst.eligible[o])]
        if len(machines) == 1:
            m = machines[0]
            per_machine[m].append(model.new_interval_var(start, ticks[o, m], end, f"i{o}"))
        else:
            literals = []
            for m in machines:
                lit = model.new_bool_var(f"x{o}_{m}")
                per_machine[m].append(
                    model.new_optional_interval_var(start, ticks[o, m], end, lit, f"i{o}_{m}")
                )
                chosen.setdefault(o, {})[m] = lit
                literals.append(lit)
            model.add_exactly_one(literals)
        starts.append(start)
        ends.append(end)
    for j in range(inst.n_jobs):
        first, stop = int(inst.job_offsets[j]), int(inst.job_offsets[j + 1])
        for o in range(first, stop - 1):
            model.add(starts[o + 1] >= ends[o])
    for intervals in per_machine:
        if len(intervals) > 1:
            model.add_no_overlap(intervals)
    makespan = model.new_int_var(0, horizon, "makespan")
    model.add_max_equality(makespan, [ends[int(o) - 1] for o in inst.job_offsets[1:]])
    model.minimize(makespan)
    if hint is not None:
        _add_hint(model, inst, hint, scale, starts, ends, chosen, ticks, makespan)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = n_workers
    solver.parameters.random_seed = RANDOM_SEED
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise CpSatError(
            f"CP-SAT found no schedule for {inst.name!r} within {time_limit_s:g} s "
            f"(status {solver.status_name(status)}); give it a longer time limit"
        )
    schedule = _read_schedule(inst, solver, starts, chosen, scale)
    validate_schedule(inst, schedule)
    return CpSatResult(
        makespan=float(max(e["end"] for e in schedule)),
        schedule=schedule,
        status="OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE",
        seconds=time.perf_counter() - started,
        workers=n_workers,
    )


def _add_hint(
    model: cp_model.CpModel,
    inst: Instance,
    hint: Sequence[Mapping[str, Any]],
    scale: int,
    starts: list[cp_model.IntVar],
    ends: list[cp_model.IntVar],
    chosen: dict[int, dict[int, cp_model.IntVar]],
    ticks: Mapping[tuple[int, int], int],
    makespan: cp_model.IntVar,
) -> None:
    """Hint start times and machine choices from a schedule; reject entries out of range.

    When the hint covers every operation, every variable is hinted (ends and the makespan
    too), so CP-SAT can load it whole as its first incumbent instead of repairing a
    partial hint; the search then only ever reports schedules at least as good. The
    hint's makespan is also added as an upper bound on the objective, which prunes the
    search to improving schedules. Both hold only if the hint is feasible in solver ticks:
    a schedule with fractional times rounded up may not be, so the bound is added only
    when the hint checks out (precedence and no overlap, in ticks).
    """
    n_ops_job = np.diff(inst.job_offsets)
    hinted: dict[int, tuple[int, int]] = {}
    for i, entry in enumerate(hint):
        try:
            j, k, m = int(entry["job"]), int(entry["index"]), int(entry["machine"])
            start = float(entry["start"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"CP-SAT hint entry {i} must have job, index, machine and start: {exc!r}"
            ) from None
        if not (0 <= j < inst.n_jobs and 0 <= k < n_ops_job[j] and 0 <= m < inst.n_machines):
            raise ValueError(
                f"CP-SAT hint entry {i} {dict(entry)} names an operation or machine that "
                f"{inst.name!r} does not have"
            )
        o = int(inst.job_offsets[j]) + k
        if not inst.eligible[o, m]:
            raise ValueError(
                f"CP-SAT hint entry {i} {dict(entry)} puts operation {k} of job {j} on "
                f"machine {m}, which cannot run it"
            )
        begin = _ticks(start, scale)
        hinted[o] = (begin, m)
        model.add_hint(starts[o], begin)
        for machine, lit in chosen.get(o, {}).items():
            model.add_hint(lit, machine == m)
    release = [_ticks(float(r), scale) for r in inst.release]
    if len(hinted) != inst.n_ops or not _feasible_in_ticks(inst, hinted, ticks, release):
        return
    finish = {o: begin + ticks[o, m] for o, (begin, m) in hinted.items()}
    for o, end in finish.items():
        model.add_hint(ends[o], end)
    bound = max(finish[int(o) - 1] for o in inst.job_offsets[1:])
    model.add_hint(makespan, bound)
    model.add(makespan <= bound)


def _feasible_in_ticks(
    inst: Instance,
    hinted: Mapping[int, tuple[int, int]],
    ticks: Mapping[tuple[int, int], int],
    release: Sequence[int],
) -> bool:
    """Whether a complete hint keeps release, route order and machine capacity in ticks."""
    finish = {o: begin + ticks[o, m] for o, (begin, m) in hinted.items()}
    for j in range(inst.n_jobs):
        first, stop = int(inst.job_offsets[j]), int(inst.job_offsets[j + 1])
        if hinted[first][0] < release[j]:
            return False
        if any(hinted[o + 1][0] < finish[o] for o in range(first, stop - 1)):
            return False
    by_machine: dict[int, list[tuple[int, int]]] = {}
    for o, (begin, m) in hinted.items():
        by_machine.setdefault(m, []).append((begin, finish[o]))
    for spans in by_machine.values():
        spans.sort()
        if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
            return False
    return True


def _read_schedule(
    inst: Instance,
    solver: cp_model.CpSolver,
    starts: list[cp_model.IntVar],
    chosen: dict[int, dict[int, cp_model.IntVar]],
    scale: int,
) -> list[dict[str, Any]]:
    """The solution as ``info["schedule"]`` entries, in real time units."""
    machine = np.argmax(inst.eligible, axis=1)
    for o, literals in chosen.items():
        machine[o] = next(m for m, lit in literals.items() if solver.boolean_value(lit))
    rows = []
    for o in range(inst.n_ops):
        m = int(machine[o])
        start = solver.value(starts[o]) / scale
        rows.append(
            {
                "job": int(inst.op_job[o]),
                "index": int(inst.op_index[o]),
                "machine": m,
                "start": _plain(start),
                "end": _plain(start + float(inst.durations[o, m])),
            }
        )
    rows.sort(key=lambda e: (e["start"], e["job"], e["index"]))
    return rows


def _plain(x: float) -> int | float:
    """Whole numbers as int, so schedules read and serialise like the environment's."""
    return int(x) if float(x).is_integer() else x
