"""The plant model core: a flexible job shop that moves through time, event by event.

:class:`PlantModel` holds the state of one run as numpy arrays (one slot per job, machine
or operation) and exposes the few moves a factory has:

* :meth:`PlantModel.dispatch` starts a job's next operation, now, on an idle machine;
* :meth:`PlantModel.advance` jumps the clock to the next event (an operation finishing or
  a job being released) and applies it.

There is no wall clock and no object per operation. The Gymnasium environments, the
dispatching rules and (later) the OPC UA plant twin all drive this same class, so a policy
trained here meets the same physics when deployed.

Dispatching is *non-delay*, as on a shop floor: an operation can only start at the current
time, on a machine that is idle now, once its job's previous operation has finished. The
processing time on machine ``m`` is ``durations[op, m] / speed[m]``; speeds are 1 unless a
caller sets them (the factory environment's speed setpoints).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from autofab.envs.instances import Instance

__all__ = ["InvalidActionError", "PlantModel", "check_delay", "schedule_table", "valid_delay"]

_INF = float("inf")


class InvalidActionError(ValueError):
    """An action that the current state does not allow, e.g. one outside the action mask."""


class PlantModel:
    """State and stepping of one run on one instance.

    State lives in a few contiguous blocks so that hot loops touch few arrays:

    ``job_state`` ``(4, n_jobs)``, with the row views
        ``job_op_time`` (processing time of the next operation on its fastest machine at
        current speeds, 0 when done), ``job_work_left`` (processing time, at speed 1 on the
        fastest machine, of operations not started yet), ``job_ops_left`` and ``job_ready``
        (when the job can start its next operation: its previous operation's end, or its
        release time).
    ``machine_state`` ``(2, n_machines + 1)``, with the row views
        ``machine_free_at`` (when the machine finishes its current operation) and
        ``machine_work_left`` (processing time still to come that only it can do). The
        extra column is a sentinel machine that is never free.

    Also: ``job_next`` (flat index of each job's next operation, ``job_end`` when done),
    ``job_machine`` (classic shops: the machine of that operation, the sentinel when done),
    ``speed`` (per-machine multiplier; processing time divides by it), and per operation
    ``op_time`` (processing time on its fastest eligible machine at current speeds, plus
    a last entry 0 for "no operation" at index ``n_ops``), ``op_start``, ``op_end`` (NaN
    until started) and ``op_machine`` (-1 until started).

    ``delay`` picks the schedule-generation scheme. ``None`` (the default, as on a shop
    floor) builds *non-delay* schedules: a decision comes whenever some job can start now
    on an idle machine, and the operation starts now. A number ``d`` in ``[0, 1]`` builds
    *parameterised active* schedules (Bierwirth and Mattfeld, 1999), on classic shops
    only. Each decision belongs to the machine ``m*`` of the operation that can complete
    first, at ``C*``; the valid jobs are those whose next operation is on ``m*`` and can
    start before ``t + d * (C* - t)``, where ``t`` is the earliest start on ``m*``, and
    ``now`` is ``t``. The chosen operation starts at its earliest start, so ``m*`` may wait
    for a better job that is about to arrive. ``d = 1`` gives Giffler and Thompson's
    active schedules (they include an optimal one); ``d = 0`` allows no waiting. ``now``
    may go back between decisions on different machines, and :meth:`advance` does not
    apply: a delay schedule is built, not simulated.
    """

    # Row indices of job_state and machine_state; the observation keeps this order.
    OP_TIME, WORK, OPS, READY = range(4)
    FREE, MWORK = range(2)

    def __init__(self, instance: Instance, delay: float | None = None) -> None:
        check_delay(delay, instance)
        self.instance = instance
        #: The schedule-generation scheme: ``None`` non-delay, else the allowed wait.
        self.delay = delay
        n_jobs, n_machines = instance.n_jobs, instance.n_machines
        self._durations = np.ascontiguousarray(instance.durations)
        self._eligible = np.ascontiguousarray(instance.eligible)
        # Work that can only go to one machine: the machine term of the lower bound.
        # (On a flexible shop, work with a choice of machines bounds nothing per machine.)
        exclusive = instance.eligible.sum(axis=1) == 1
        self._exclusive = self._durations * exclusive[:, None]
        self._min_duration = instance.min_duration
        #: One past each job's last operation, and each job's last operation.
        self.job_end = np.asarray(instance.job_offsets[1:], dtype=np.int64)
        self.last_op = self.job_end - 1
        #: True when every operation has exactly one eligible machine (a classic job
        #: shop); the hot paths then index ``fixed_machine`` instead of choosing.
        self.classic = not instance.is_flexible
        self.fixed_machine = np.argmax(instance.eligible, axis=1)
        self.sentinel = n_machines
        self.job_state = np.zeros((4, n_jobs))
        self.job_op_time, self.job_work_left, self.job_ops_left, self.job_ready = self.job_state
        self.machine_state = np.zeros((2, n_machines + 1))
        self._free_ext = self.machine_state[self.FREE]
        self.machine_free_at = self._free_ext[:n_machines]
        self.machine_work_left = self.machine_state[self.MWORK, :n_machines]
        # The makespan lower bound is max(lb_fixed), or now + max(lb_work):
        # lb_fixed = ready + work left (jobs), free_at + work to come (machines). Plain
        # lists: the hot path updates two entries and takes two maxima, where Python's
        # builtins beat numpy's per-call overhead on arrays this small.
        self._lb_fixed: list[float] = []
        self._lb_work: list[float] = []
        self.speed = np.ones(n_machines)
        self.op_time = np.zeros(instance.n_ops + 1)
        self._max_release = float(instance.release.max())
        self._set_op_time()
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Put the model back at time 0 with nothing started (speeds are kept)."""
        inst = self.instance
        self.now = 0.0
        self.job_next = np.asarray(inst.job_offsets[:-1], dtype=np.int64).copy()
        self.job_ready[:] = inst.release
        self.job_work_left[:] = inst.job_total_work
        self.job_ops_left[:] = np.diff(inst.job_offsets)
        self.machine_free_at[:] = 0.0
        self._free_ext[-1] = _INF
        self.machine_work_left[:] = self._exclusive.sum(axis=0)
        self.machine_op = np.full(inst.n_machines, -1, dtype=np.int64)
        self.op_start = np.full(inst.n_ops, np.nan)
        self.op_end = np.full(inst.n_ops, np.nan)
        self.op_machine = np.full(inst.n_ops, -1, dtype=np.int64)
        self.n_started = 0
        self.job_machine = self.fixed_machine[self.job_next].copy()
        self._refresh()

    def set_speed(self, machine: int, speed: float) -> None:
        """Set a machine's speed multiplier; operations started later run at it."""
        if not speed > 0:
            raise ValueError(f"machine {machine}: speed must be > 0, got {speed}")
        self.speed[machine] = speed
        self._set_op_time()
        self._refresh()

    def _set_op_time(self) -> None:
        """Recompute ``op_time`` for the current speeds."""
        ops = np.arange(self.instance.n_ops)
        if self.classic:
            m = self.fixed_machine
            self.op_time[:-1] = self._durations[ops, m] / self.speed[m]
        else:
            self.op_time[:-1] = self.processing_times(ops).min(axis=1)

    def _refresh(self) -> None:
        """Recompute the derived arrays from the primary state (after a bulk change)."""
        nxt = np.minimum(self.job_next, self.last_op)
        self.job_op_time[:] = np.where(self.job_next < self.job_end, self.op_time[nxt], 0.0)
        self._lb_fixed = np.concatenate(
            (self.job_ready + self.job_work_left, self.machine_free_at + self.machine_work_left)
        ).tolist()
        self._lb_work = np.concatenate((self.job_work_left, self.machine_work_left)).tolist()
        self._mask: NDArray[np.bool_] | None = None

    @property
    def n_jobs(self) -> int:
        return self.instance.n_jobs

    @property
    def all_started(self) -> bool:
        """True once every operation has been dispatched (nothing left to decide)."""
        return self.n_started == self.instance.n_ops

    @property
    def job_done(self) -> NDArray[np.bool_]:
        """Jobs with every operation started."""
        return self.job_next >= self.job_end

    def next_ops(self) -> NDArray[np.int64]:
        """Each job's next operation, clamped to its last one for finished jobs."""
        return np.minimum(self.job_next, self.last_op)

    def machine_idle(self) -> NDArray[np.bool_]:
        """Machines free at the current time."""
        return self.machine_free_at <= self.now

    def _earliest_starts(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per job: when a machine for its next operation is free, and when it can start.

        A job can start its next operation at ``max(ready, earliest free eligible
        machine)``; both only change at a dispatch, so this also gives the next decision
        time. Finished jobs get ``inf``.
        """
        if self.classic:
            machine_free = self._free_ext[self.job_machine]
        else:
            nxt = np.minimum(self.job_next, self.last_op)
            machine_free = np.where(self._eligible[nxt], self.machine_free_at, _INF).min(axis=1)
            machine_free[self.job_next >= self.job_end] = _INF
        return machine_free, np.maximum(self.job_ready, machine_free)

    def action_mask(self) -> NDArray[np.bool_]:
        """Jobs whose next operation can start now on some idle eligible machine.

        The array is cached until the state changes; callers must not modify it.
        """
        if self._mask is None:
            if self.delay is not None and self.n_started < self.instance.n_ops:
                self._decide_with_delay()
            else:
                self._job_machine_free, starts = self._earliest_starts()
                self._mask = starts <= self.now
        assert self._mask is not None
        return self._mask

    def _decide_with_delay(self) -> None:
        """The next decision of a parameterised active schedule (see the class notes):
        sets ``now`` to the earliest start on the machine ``m*`` whose operation can end
        first, and the mask to the jobs for ``m*`` that may start before the limit."""
        assert self.delay is not None
        machine_free, starts = self._earliest_starts()
        ends = starts + self.job_op_time
        first = int(np.argmin(ends))
        on = self.job_machine == self.job_machine[first]
        t_min = float(np.min(starts, where=on, initial=_INF))
        limit = t_min + self.delay * (float(ends[first]) - t_min)
        self._job_machine_free = machine_free
        self._mask = on & ((starts < limit) | (starts <= t_min))
        self.now = t_min

    def job_machine_free(self) -> NDArray[np.float64]:
        """When the earliest eligible machine for each job's next operation is free
        (inf for finished jobs). Cached with the action mask; do not modify."""
        self.action_mask()
        return self._job_machine_free

    def processing_times(self, ops: NDArray[np.int64]) -> NDArray[np.float64]:
        """``(len(ops), n_machines)`` processing times at current speeds; inf if ineligible."""
        t = self._durations[ops] / self.speed
        t[~self._eligible[ops]] = _INF
        return t

    def choose_machine(self, job: int) -> int:
        """The idle eligible machine that finishes the job's next operation soonest.

        Ties go to the lowest machine index. Raises if none is idle.
        """
        op = int(self.job_next[job])
        if self.classic:
            m = int(self.fixed_machine[op])
            if self.machine_free_at[m] > self.now:
                raise InvalidActionError(f"job {job}: machine {m} is busy")
            return m
        t = self._durations[op] / self.speed
        t = np.where(self._eligible[op] & (self.machine_free_at <= self.now), t, _INF)
        m = int(np.argmin(t))
        if t[m] == _INF:
            raise InvalidActionError(f"job {job}: no eligible machine is idle")
        return m

    # ------------------------------------------------------------------ moves

    def dispatch(self, job: int, machine: int | None = None) -> int:
        """Start ``job``'s next operation now; returns the operation's flat index.

        With ``machine=None`` the model picks :meth:`choose_machine`. A dispatch the state
        cannot take raises :class:`InvalidActionError` and changes nothing.
        """
        n_jobs, n_machines = self.instance.n_jobs, self.instance.n_machines
        if not 0 <= job < n_jobs:
            raise InvalidActionError(f"job {job} does not exist (jobs are 0..{n_jobs - 1})")
        if machine is not None and not 0 <= machine < n_machines:
            raise InvalidActionError(
                f"machine {machine} does not exist (machines are 0..{n_machines - 1})"
            )
        op = int(self.job_next[job])
        if op >= self.job_end[job]:
            raise InvalidActionError(f"job {job} has no operation left to dispatch")
        if self.delay is not None:  # a classic shop: the machine is fixed; it may wait
            if not self.action_mask()[job]:
                raise InvalidActionError(
                    f"job {job} is not among the jobs competing for the next decision's "
                    f"machine (valid: {np.flatnonzero(self.action_mask()).tolist()})"
                )
            fixed = int(self.job_machine[job])
            if machine is not None and machine != fixed:
                raise InvalidActionError(f"job {job}: machine {machine} cannot do operation {op}")
            return self.start(job, fixed)
        if self.job_ready[job] > self.now:
            raise InvalidActionError(
                f"job {job} is not ready until t={self.job_ready[job]:g} (now t={self.now:g})"
            )
        if machine is None:
            machine = self.choose_machine(job)
        elif not self._eligible[op, machine]:
            raise InvalidActionError(f"job {job}: machine {machine} cannot do operation {op}")
        elif self.machine_free_at[machine] > self.now:
            raise InvalidActionError(f"job {job}: machine {machine} is busy")
        return self.start(job, machine)

    def start(self, job: int, machine: int) -> int:
        """Start ``job``'s next operation on ``machine`` now, without checks.

        The fast path for callers that have already checked :meth:`action_mask` (a job in
        the mask has an idle eligible machine; on a classic shop it is ``job_machine``).
        With a ``delay`` it starts at its earliest start instead, which may be later.
        """
        op = int(self.job_next[job])
        now = self.now
        if self.delay is not None:
            now = max(now, float(self.job_ready[job]), float(self._free_ext[machine]))
        duration = self._durations[op, machine]
        end = now + duration / self.speed[machine]
        self.op_start[op] = now
        self.op_end[op] = end
        self.op_machine[op] = machine
        self.machine_free_at[machine] = end
        self.machine_op[machine] = op
        work = self._lb_work[job] - self._min_duration[op]
        self.job_ready[job] = end
        self.job_work_left[job] = work
        self.job_ops_left[job] -= 1
        self._lb_fixed[job] = end + work
        self._lb_work[job] = work
        nxt = op + 1
        self.job_next[job] = nxt
        if self.classic:
            k = len(self.job_ready) + machine
            mwork = self._lb_work[k] - duration
            self.machine_work_left[machine] = mwork
            self._lb_fixed[k] = end + mwork
            self._lb_work[k] = mwork
            if nxt < self.job_end[job]:
                self.job_machine[job] = self.fixed_machine[nxt]
                self.job_op_time[job] = self.op_time[nxt]
            else:
                self.job_machine[job] = self.sentinel
                self.job_op_time[job] = 0.0
        else:
            self.machine_work_left -= self._exclusive[op]
            n_jobs = len(self.job_ready)
            self._lb_fixed[n_jobs:] = (self.machine_free_at + self.machine_work_left).tolist()
            self._lb_work[n_jobs:] = self.machine_work_left.tolist()
            self.job_op_time[job] = self.op_time[nxt] if nxt < self.job_end[job] else 0.0
        self.n_started += 1
        self._mask = None
        return op

    def next_event_time(self) -> float:
        """Time of the next event after now: an operation ending or a job released; inf if none."""
        now = self.now
        free = self.machine_free_at
        t = float(np.min(free, where=free > now, initial=_INF))
        if now < self._max_release:
            ready = self.job_ready
            waiting = (ready > now) & (self.job_next < self.job_end)
            t = min(t, float(np.min(ready, where=waiting, initial=_INF)))
        return t

    def advance(self) -> float:
        """Jump to the next event and apply it; returns the new time.

        Raises :class:`InvalidActionError` when nothing is left to happen.
        """
        t = self.next_event_time()
        if t == _INF:
            raise InvalidActionError("no event left: every operation has finished")
        self.now = t
        self._mask = None
        return t

    def advance_to_decision(self) -> None:
        """Advance to the first time some job can be dispatched (now, if one can).

        Equivalent to calling :meth:`advance` until :meth:`action_mask` has a valid job,
        but done in one jump: nothing starts in between, so each job's earliest start
        stays fixed and the decision time is their minimum. Does nothing once every
        operation has started.
        """
        if self.n_started == self.instance.n_ops:
            return
        if self.delay is not None:
            self._decide_with_delay()
            return
        machine_free, starts = self._earliest_starts()
        t = float(np.minimum.reduce(starts))
        if t > self.now:
            self.now = t
        self._job_machine_free = machine_free
        self._mask = starts <= self.now

    # ------------------------------------------------------------------ results

    def lower_bound(self) -> float:
        """A cheap bound on the makespan of any completion of the current partial schedule.

        The larger of, over jobs, when the job can go on plus its work left, and over
        machines, when the machine is free plus the work that only it can do. It equals
        the makespan once everything has started, which makes ``-(change in bound)`` a
        dense reward whose sum is ``-(makespan - initial bound)``. Computed as
        ``max(max(ready + work), now + max(work))``, which needs no per-step rebuild. With
        a ``delay`` the ``now`` term is left out: operations may still start before now.
        """
        if self.delay is not None:
            return max(self._lb_fixed)
        return max(max(self._lb_fixed), self.now + max(self._lb_work))

    def makespan(self) -> float:
        """Completion time of the last operation started so far (the makespan at the end)."""
        return float(np.nanmax(self.op_end)) if self.n_started else 0.0

    def job_completion(self) -> NDArray[np.float64]:
        """Completion time of each job's last operation (NaN until it has started)."""
        return self.op_end[self.last_op]

    def tardiness(self) -> float:
        """Total tardiness, ``sum(max(0, completion - due))`` over finished jobs."""
        c = self.job_completion()
        done = ~np.isnan(c)
        return float(np.maximum(c[done] - self.instance.due[done], 0.0).sum())

    def schedule(self) -> list[dict[str, Any]]:
        """The operations started so far: job, index in its route, machine, start, end."""
        return schedule_table(self.instance, self.op_machine, self.op_start, self.op_end)


def valid_delay(delay: object) -> bool:
    """Whether ``delay`` is a schedule-generation scheme (see :class:`PlantModel`): None
    (non-delay) or a number in ``[0, 1]`` (not a bool, not NaN)."""
    return delay is None or (
        isinstance(delay, int | float) and not isinstance(delay, bool) and 0.0 <= delay <= 1.0
    )


def check_delay(delay: float | None, instance: Instance) -> None:
    """Refuse a ``delay`` (see :class:`PlantModel`) outside ``[0, 1]``, or on a flexible shop.

    Raises:
        ValueError: naming the value or the instance.
    """
    if delay is None:
        return
    if not valid_delay(delay):
        raise ValueError(
            f"delay must be a number in [0, 1] (or None for non-delay schedules), got {delay!r}"
        )
    if instance.is_flexible:
        raise ValueError(
            f"delay scheduling runs classic job shops only; {instance.name!r} has operations "
            "with a choice of machines (use delay=None)"
        )


def schedule_table(
    instance: Instance,
    op_machine: NDArray[np.int64],
    op_start: NDArray[np.float64],
    op_end: NDArray[np.float64],
) -> list[dict[str, Any]]:
    """Per-operation arrays (machine -1 = not started) as the schedule rows every tool
    reads: ``{job, index, machine, start, end}`` in order of start time."""
    ops = np.flatnonzero(op_machine >= 0)
    ops = ops[np.lexsort((ops, op_start[ops]))]
    columns = (
        instance.op_job[ops].tolist(),
        instance.op_index[ops].tolist(),
        op_machine[ops].tolist(),
        [_num(x) for x in op_start[ops].tolist()],
        [_num(x) for x in op_end[ops].tolist()],
    )
    keys = ("job", "index", "machine", "start", "end")
    return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]


def _num(x: float) -> int | float:
    """Whole numbers as int so schedules read and serialise cleanly."""
    return int(x) if x.is_integer() else x
