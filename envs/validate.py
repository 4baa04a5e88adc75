"""Schedule validation: the hard invariants every schedule must satisfy.

:func:`schedule_violations` lists every broken invariant; :func:`validate_schedule` raises
:class:`ScheduleError` with all of them. The checks:

* completeness: every operation of every job appears exactly once;
* eligibility: each operation runs on a machine that can do it;
* processing time: ``end - start`` equals the operation's time on that machine (divided by
  the machine's speed, where speeds are given);
* release: no job starts before its release time;
* precedence: an operation starts no earlier than its predecessor in the route ends;
* no overlap: a machine runs at most one operation at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from autofab.envs.instances import Instance

__all__ = ["ScheduleError", "schedule_violations", "validate_schedule"]

_TOL = 1e-6


class ScheduleError(ValueError):
    """A schedule breaks one or more hard invariants; ``violations`` lists them."""

    def __init__(self, violations: list[str]) -> None:
        self.violations = violations
        shown = "\n  ".join(violations[:20])
        more = f"\n  ... and {len(violations) - 20} more" if len(violations) > 20 else ""
        super().__init__(f"{len(violations)} schedule violation(s):\n  {shown}{more}")


def schedule_violations(
    instance: Instance,
    schedule: Sequence[Mapping[str, Any]],
    speeds: NDArray[np.float64] | Sequence[float] | None = None,
    *,
    complete: bool = True,
    exact_times: bool = True,
) -> list[str]:
    """Every invariant ``schedule`` breaks on ``instance``; empty when it is valid.

    Args:
        instance: The instance the schedule is for.
        schedule: Entries with keys ``job``, ``index``, ``machine``, ``start``, ``end``.
        speeds: Per-machine speed multipliers the schedule ran at (default all 1). With
            ``exact_times=False``, the machines' maximum speeds.
        complete: Require every operation to appear (False checks a partial schedule).
        exact_times: Require ``end - start`` to equal the processing time. False only
            requires it to be at least the time at maximum speed: for factory runs, where
            speeds change and breakdowns interrupt operations.
    """
    problems: list[str] = []
    n = len(schedule)
    try:
        job = np.fromiter((e["job"] for e in schedule), dtype=np.int64, count=n)
        idx = np.fromiter((e["index"] for e in schedule), dtype=np.int64, count=n)
        mach = np.fromiter((e["machine"] for e in schedule), dtype=np.int64, count=n)
        start = np.fromiter((e["start"] for e in schedule), dtype=np.float64, count=n)
        end = np.fromiter((e["end"] for e in schedule), dtype=np.float64, count=n)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"malformed schedule entry (need job, index, machine, start, end): {exc!r}"]
    n_ops_job = np.diff(instance.job_offsets)
    bad = (
        (job < 0)
        | (job >= instance.n_jobs)
        | (mach < 0)
        | (mach >= instance.n_machines)
        | ~np.isfinite(start)
        | ~np.isfinite(end)
    )
    bad |= (idx < 0) | (idx >= n_ops_job[np.clip(job, 0, instance.n_jobs - 1)])
    for i in np.flatnonzero(bad):
        problems.append(f"entry {i} {dict(schedule[i])} is out of range or not finite")
    if problems:
        return problems
    op = instance.job_offsets[job] + idx
    counts = np.bincount(op, minlength=instance.n_ops)
    for o in np.flatnonzero(counts > 1):
        problems.append(f"{_name(instance, o)} is scheduled {counts[o]} times")
    if complete:
        for o in np.flatnonzero(counts == 0):
            problems.append(f"{_name(instance, o)} is missing")
    for i in np.flatnonzero(~instance.eligible[op, mach]):
        problems.append(f"{_name(instance, op[i])} runs on machine {mach[i]}, which cannot do it")
    speed = np.ones(instance.n_machines) if speeds is None else np.asarray(speeds, np.float64)
    expected = instance.durations[op, mach] / speed[mach]
    took = end - start
    tol = _TOL * np.maximum(1, expected)
    wrong = np.abs(took - expected) > tol if exact_times else took < expected - tol
    for i in np.flatnonzero(wrong):
        problems.append(
            f"{_name(instance, op[i])} on machine {mach[i]} takes {took[i]:g}, expected "
            f"{'' if exact_times else 'at least '}{expected[i]:g}"
        )
    for i in np.flatnonzero(start < instance.release[job] - _TOL):
        problems.append(
            f"{_name(instance, op[i])} starts at {start[i]:g}, before the job's release "
            f"{instance.release[job[i]]:g}"
        )
    # Precedence: order entries by operation; consecutive operations of one job.
    order = np.argsort(op, kind="stable")
    o_sorted = op[order]
    same_job_next = (np.diff(o_sorted) == 1) & (
        instance.op_job[o_sorted[1:]] == instance.op_job[o_sorted[:-1]]
    )
    prev_end = end[order][:-1]
    next_start = start[order][1:]
    for k in np.flatnonzero(same_job_next & (next_start < prev_end - _TOL)):
        problems.append(
            f"{_name(instance, o_sorted[k + 1])} starts at {next_start[k]:g}, before its "
            f"predecessor ends at {prev_end[k]:g}"
        )
    # Overlap: sort by machine then start; an entry must start after the previous ends.
    order = np.lexsort((end, start, mach))
    m_sorted, s_sorted, e_sorted = mach[order], start[order], end[order]
    same_machine = m_sorted[1:] == m_sorted[:-1]
    for k in np.flatnonzero(same_machine & (s_sorted[1:] < e_sorted[:-1] - _TOL)):
        a, b = op[order[k]], op[order[k + 1]]
        problems.append(
            f"machine {m_sorted[k]}: {_name(instance, a)} [{s_sorted[k]:g}, {e_sorted[k]:g}) "
            f"overlaps {_name(instance, b)} [{s_sorted[k + 1]:g}, {e_sorted[k + 1]:g})"
        )
    return problems


def validate_schedule(
    instance: Instance,
    schedule: Sequence[Mapping[str, Any]],
    speeds: NDArray[np.float64] | Sequence[float] | None = None,
    *,
    complete: bool = True,
    exact_times: bool = True,
) -> None:
    """Raise :class:`ScheduleError` listing every violation, if there is any."""
    problems = schedule_violations(
        instance, schedule, speeds, complete=complete, exact_times=exact_times
    )
    if problems:
        raise ScheduleError(problems)


def _name(instance: Instance, op: int | np.integer[Any]) -> str:
    return f"job {int(instance.op_job[op])} operation {int(instance.op_index[op])}"
