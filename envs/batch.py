"""Many copies of one classic job shop, stepped in lockstep: fast rollouts for training.

Sampling-based training (self-labeling samples dozens of schedules per instance) spends
its time stepping environments. :class:`BatchJobShop` runs ``k`` copies of one classic
instance as ``(k, ...)`` numpy arrays, so one step of all copies costs about what one
step of a single :class:`~autofab.envs.jobshop.JobShopEnv` does. It keeps exactly the
environment's rules (non-delay dispatch at the earliest possible start, or with a
``delay`` the env's parameterised active schedules; speeds 1) and produces exactly its
observations and masks; ``tests/envs/test_batch.py`` replays random
trajectories through both and compares every observation.

Every copy of one instance needs ``n_ops`` decisions, so the copies never fall out of
step. Only classic shops (one machine per operation) are supported.

>>> sim = BatchJobShop(load_instance("ta01"), copies=32)
>>> while not sim.done:
...     obs, mask = sim.observe(), sim.mask
...     sim.step(pick(obs, mask))            # one job per copy
>>> sim.makespan                             # (32,)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from autofab.envs.instances import Instance
from autofab.envs.jobshop import (
    OBSERVATION_LAYOUT,
    observation_scale,
    op_time_to_work,
    route_lookahead,
)
from autofab.envs.model import check_delay, schedule_table

__all__ = ["BatchJobShop"]


class BatchJobShop:
    """``copies`` runs of one classic job shop, all at the same decision count.

    Attributes:
        mask: ``(copies, n_jobs)`` jobs that may be dispatched now, per copy.
        now: ``(copies,)`` each copy's current time.
        makespan: ``(copies,)`` latest end time so far; the makespan once :attr:`done`.
    """

    def __init__(self, instance: Instance, copies: int, delay: float | None = None) -> None:
        """``delay``: the schedule-generation scheme, as
        :class:`~autofab.envs.model.PlantModel`'s (None: non-delay)."""
        if instance.is_flexible:
            raise ValueError(
                f"BatchJobShop runs classic job shops only; {instance.name!r} has "
                "operations with a choice of machines (use JobShopEnv)"
            )
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        check_delay(delay, instance)
        self.delay = delay
        self.instance = instance
        self.copies = copies
        n_machines = instance.n_machines
        # Per operation, plus one sentinel operation (index n_ops) on the sentinel machine
        # (index n_machines, never free) with duration 0, for finished jobs.
        self._machine = np.append(np.argmax(instance.eligible, axis=1), n_machines)
        self._duration = np.append(instance.min_duration, 0.0)
        self._job_end = np.asarray(instance.job_offsets[1:], dtype=np.int64)
        # Per operation and the sentinel: the operation after it (the sentinel after a
        # job's last) and its machine + 1 (0 for the sentinel), for the lookahead blocks.
        self._after, self._machine_code = route_lookahead(instance)
        self._time_to_work = op_time_to_work(instance)
        self._scale = observation_scale(instance)
        self._rows = np.arange(copies)
        self.reset()

    @property
    def job_machine(self) -> NDArray[np.int64]:
        """``(copies, n_jobs)``: the machine of each job's next operation (``n_machines``
        once the job is done). Do not modify."""
        return self._job_machine

    @property
    def done(self) -> bool:
        """True once every operation of every copy has been dispatched."""
        return self.n_started == self.instance.n_ops

    def reset(self) -> None:
        """All copies back to time 0 with nothing started."""
        inst, k = self.instance, self.copies
        n_machines = inst.n_machines
        self.n_started = 0
        self.makespan = np.zeros(k)
        #: Next operation per job, or the sentinel operation once the job is done.
        self._next = np.tile(np.asarray(inst.job_offsets[:-1], dtype=np.int64), (k, 1))
        self._ready = np.tile(inst.release.astype(np.float64), (k, 1))
        self._work = np.tile(inst.job_total_work.astype(np.float64), (k, 1))
        self._ops = np.tile(np.diff(inst.job_offsets).astype(np.float64), (k, 1))
        self._free = np.zeros((k, n_machines + 1))
        self._free[:, n_machines] = np.inf
        load = np.bincount(self._machine[:-1], weights=self._duration[:-1], minlength=n_machines)
        self._machine_work = np.tile(np.append(load, 0.0), (k, 1))
        #: Start time of every operation per copy (NaN until started; one sentinel column).
        self._start = np.full((k, inst.n_ops + 1), np.nan)
        self._decide()

    def _decide(self) -> None:
        """Move each copy to its next decision: the earliest possible start, or with a
        ``delay`` the earliest start on the machine whose operation can end first."""
        self._job_machine = self._machine[self._next]
        self._machine_free = np.take_along_axis(self._free, self._job_machine, axis=1)
        starts = np.maximum(self._ready, self._machine_free)
        self._starts = starts
        if self.delay is None:
            self.now = starts.min(axis=1)
            self.mask = starts <= self.now[:, None]
            return
        ends = starts + self._duration[self._next]
        first = ends.argmin(axis=1)
        on = self._job_machine == self._job_machine[self._rows, first][:, None]
        t_min = np.min(starts, axis=1, where=on, initial=np.inf)
        limit = t_min + self.delay * (ends[self._rows, first] - t_min)
        self.now = t_min
        self.mask = on & ((starts < limit[:, None]) | (starts <= t_min[:, None]))

    def observe(self) -> NDArray[np.float32]:
        """``(copies, size)``: each copy's :class:`JobShopEnv` observation, bit for bit."""
        n_machines = self.instance.n_machines
        now = self.now[:, None]
        k = self.copies
        after = self._after[self._next]
        raw = {
            "job_next_op_time": self._duration[self._next],
            "job_work_left": self._work,
            "job_ops_left": self._ops,
            "job_wait": self._ready - now,
            "job_machine_wait": self._machine_free - now,
            "machine_wait": self._free[:, :n_machines] - now,
            "machine_work_left": self._machine_work[:, :n_machines],
            "job_can_start": self.mask,
            "job_next_machine": self._machine_code[self._next],
            "job_next2_op_time": self._duration[after],
            "job_next2_machine": self._machine_code[after],
            "progress": np.full((k, 1), self.n_started),
            "time": now,
            "op_time_to_work": np.full((k, 1), self._time_to_work),
        }
        obs = np.concatenate([raw[name] for name, _ in OBSERVATION_LAYOUT], axis=1)
        obs = (obs * self._scale).astype(np.float32)
        return np.clip(obs, 0.0, 1.0, out=obs)

    def step(self, jobs: NDArray[np.integer]) -> None:
        """Dispatch ``jobs[i]`` in copy ``i``, for every copy; it must be in ``mask``."""
        given = np.asarray(jobs)
        rows = self._rows
        in_range = (
            given.shape == (self.copies,)
            and given.dtype.kind in "iu"
            and bool(np.all((given >= 0) & (given < self.instance.n_jobs)))
        )
        if not in_range or not self.mask[rows, given].all():
            raise ValueError(
                f"step needs one valid job per copy ({self.copies}); got {given.tolist()}"
            )
        jobs = given.astype(np.int64)
        op = self._next[rows, jobs]
        machine = self._job_machine[rows, jobs]
        duration = self._duration[op]
        # The earliest start: now itself on a non-delay schedule.
        start = self._starts[rows, jobs]
        end = start + duration
        self._start[rows, op] = start
        self._ready[rows, jobs] = end
        self._free[rows, machine] = end
        self._work[rows, jobs] -= duration
        self._ops[rows, jobs] -= 1
        self._machine_work[rows, machine] -= duration
        following = op + 1
        self._next[rows, jobs] = np.where(
            following < self._job_end[jobs], following, self.instance.n_ops
        )
        np.maximum(self.makespan, end, out=self.makespan)
        self.n_started += 1
        if not self.done:
            self._decide()

    def schedule(self, copy: int) -> list[dict[str, Any]]:
        """Copy ``copy``'s operations started so far, in :class:`JobShopEnv`'s format."""
        n_ops = self.instance.n_ops
        start = self._start[copy, :n_ops]
        machine = np.where(np.isnan(start), -1, self._machine[:n_ops])
        return schedule_table(self.instance, machine, start, start + self._duration[:n_ops])
