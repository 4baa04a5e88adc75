"""``autofab/JobShop-v0``: dispatch jobs in a (flexible) job shop to minimise makespan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

from autofab.envs.instances import Instance, InstanceError, load_instance, random_instance
from autofab.envs.model import InvalidActionError, PlantModel

__all__ = [
    "N_JOB_BLOCKS",
    "N_MACHINE_BLOCKS",
    "OBSERVATION_LAYOUT",
    "JobShopEnv",
    "MaskedDiscrete",
    "observation_blocks",
    "observation_scale",
    "op_time_to_work",
    "route_lookahead",
]

#: The observation's blocks, in order: (name, one value per "job" | "machine" | "plant").
OBSERVATION_LAYOUT = (
    ("job_next_op_time", "job"),
    ("job_work_left", "job"),
    ("job_ops_left", "job"),
    ("job_wait", "job"),
    ("job_machine_wait", "job"),
    ("machine_wait", "machine"),
    ("machine_work_left", "machine"),
    ("job_can_start", "job"),
    ("job_next_machine", "job"),
    ("job_next2_op_time", "job"),
    ("job_next2_machine", "job"),
    ("progress", "plant"),
    ("time", "plant"),
    ("op_time_to_work", "plant"),
)
#: Blocks per job and per machine in :data:`OBSERVATION_LAYOUT`.
N_JOB_BLOCKS = sum(kind == "job" for _, kind in OBSERVATION_LAYOUT)
N_MACHINE_BLOCKS = sum(kind == "machine" for _, kind in OBSERVATION_LAYOUT)
#: Plant entries (one value each) in :data:`OBSERVATION_LAYOUT`.
N_PLANT_BLOCKS = sum(kind == "plant" for _, kind in OBSERVATION_LAYOUT)

InstanceSpec = str | Path | Mapping[str, Any] | Instance


class MaskedDiscrete(spaces.Discrete):
    """A ``Discrete`` space whose ``sample()`` draws only actions valid right now.

    It reads the environment's live action mask, so random agents (and Gymnasium's env
    checker) never pick an action the environment would refuse. Passing ``mask=`` or
    ``probability=`` explicitly behaves exactly as in ``Discrete``.
    """

    def __init__(self, n: int, seed: int | None = None) -> None:
        super().__init__(n, seed=seed)
        #: The environment's current mask (boolean), replaced at every step.
        self.live_mask: NDArray[np.bool_] | None = None

    def sample(
        self, mask: NDArray[np.int8] | None = None, probability: NDArray[np.float64] | None = None
    ) -> np.int64:
        live = self.live_mask
        if mask is None and probability is None and live is not None and live.any():
            mask = live.astype(np.int8)
        return super().sample(mask=mask, probability=probability)


class JobShopEnv(gym.Env[NDArray[np.float32], np.int64]):
    """Dispatch jobs in a job shop, one decision at a time, to minimise the makespan.

    ## Description

    The plant model (:class:`~autofab.envs.model.PlantModel`) runs a flexible job shop in
    event time. Whenever at least one job's next operation could start now on an idle
    machine, the agent picks which job goes next. The operation starts at once on the
    eligible idle machine that finishes it soonest. When no job can start, time jumps to
    the next operation completion. Schedules are therefore *non-delay*, as on a shop floor.

    With ``delay=d`` (classic shops) the env builds *parameterised active* schedules
    instead: each decision belongs to the machine whose next operation can end first, the
    valid jobs are those for that machine that can start within ``d`` of the way from its
    earliest start to that end, and the chosen operation starts as soon as its job and the
    machine are free, so the machine may wait for a better job about to arrive (see
    :class:`~autofab.envs.model.PlantModel`). ``d = 1`` gives Giffler and Thompson's
    active schedules, which include an optimal one. The clock then reads the decision's
    earliest start and may go back between machines.

    ## Action Space

    ``Discrete(n_jobs)``: the job whose next operation to dispatch. Only jobs flagged by
    :meth:`action_masks` are valid; any other action raises
    :class:`~autofab.envs.model.InvalidActionError` naming the valid ones. The action
    space's ``sample()`` draws from the current mask. The mask makes sb3-contrib's
    ``MaskablePPO`` work as is.

    ## Observation Space

    ``Box(0, 1, (n_jobs * 9 + n_machines * 2 + 3,), float32)``, a fixed size for a given
    instance size, made of the blocks in :data:`OBSERVATION_LAYOUT`. Per job: the next
    operation's processing time, work left, operations left, time until the job is ready,
    time until a machine for its next operation is free (1 once the job is done), and
    whether it can start now; then the next operation's machine, and the processing time
    and machine of the operation after it. Per machine: time until free and work still to
    come. For the plant: fraction of operations started, the current time, and
    ``op_time_to_work``. Times are divided by the instance's longest operation ``T``, work
    by the largest job or machine load, and the clock by the total work, then clipped to
    ``[0, 1]``. :func:`observation_blocks` splits an observation (or a batch) back into
    named blocks.

    A machine reads ``(index + 1) / n_machines``, and 0 where there is no operation (the
    job is finished, or has fewer than two operations left); ``round(value * n_machines)
    - 1`` recovers the index exactly (-1 = none). On a classic shop an operation's
    machine is its only one. On a flexible shop it is the eligible machine free soonest
    (every idle machine counts as free now; ties to the lowest index), the one
    ``job_machine_wait`` measures. That is a machine the operation can start on soonest,
    not necessarily the one a dispatch picks: among several idle machines, a dispatch takes
    the one that finishes it soonest. The processing time of the operation after next is
    then its shortest over eligible machines at current speeds, as for the next operation.
    ``op_time_to_work`` is the instance constant ``T / max(job total work)``: a time block
    times it is in the unit of ``job_work_left``. It lies in ``(0, 1]`` on classic shops;
    on a flexible shop whose longest duration (on a slow machine) exceeds every job's work
    it clips to 1.

    ## Rewards

    Dense: ``-(LB_after - LB_before) / reward_scale``, where ``LB`` is the model's cheap
    makespan lower bound (:meth:`~autofab.envs.model.PlantModel.lower_bound`). It telescopes,
    so an episode's return is ``-(makespan - LB_initial) / reward_scale``: maximising it
    minimises the makespan. ``reward_scale`` defaults to the longest operation.

    ## Starting State

    Time 0, nothing started. With ``instance={"jobs": J, "machines": M}`` a new
    Taillard-style instance is drawn from the env's RNG at every ``reset(seed=...)``.

    ## Episode End

    Terminated when every operation has been dispatched; ``info["makespan"]``,
    ``info["tardiness"]`` and ``info["schedule"]`` (a list of ``{job, index, machine,
    start, end}``) are then set. There is no truncation; wrap with ``TimeLimit`` if needed.

    ## Arguments

    * ``instance``: a benchmark name (``"ta01"``), a JSON path, a JSON-form dict, an
      :class:`~autofab.envs.instances.Instance`, or ``{"jobs": J, "machines": M}`` (plus
      optional ``"low"``, ``"high"`` processing-time bounds) for random instances.
    * ``reward_scale``: divisor of the reward, default the longest operation.
    * ``delay``: ``None`` (default) for non-delay schedules, or a number in ``[0, 1]`` for
      parameterised active ones (classic shops only).

    ## Version History

    * v0: initial version.
    * v0, lookahead: the observation gained ``job_next_machine``, ``job_next2_op_time``,
      ``job_next2_machine`` (after ``job_can_start``) and ``op_time_to_work`` (last). The
      id stayed ``v0`` but the observation grew by ``3 * n_jobs + 1``, so SB3 models
      trained before no longer fit it and the policy loader's space check refuses them.
    * v0, delay: the optional ``delay`` argument; without it nothing changed.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        instance: InstanceSpec = "ft06",
        reward_scale: float | None = None,
        render_mode: str | None = None,
        delay: float | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode {render_mode!r} is not supported; use one of "
                f"{self.metadata['render_modes']} or None"
            )
        self.render_mode = render_mode
        self._random_size: tuple[int, int, int, int] | None = None
        if isinstance(instance, Mapping) and not isinstance(instance.get("jobs"), list):
            self._random_size = _random_spec(instance)
            jobs, machines, low, high = self._random_size
            first = random_instance(jobs, machines, 0, low=low, high=high)
        else:
            first = load_instance(instance)
        if reward_scale is not None and not reward_scale > 0:
            raise ValueError(f"reward_scale must be > 0, got {reward_scale}")
        self._reward_scale_arg = reward_scale
        self.delay = delay
        self._set_instance(first)
        self.action_space = MaskedDiscrete(first.n_jobs)
        size = len(self._scale)
        self.observation_space = spaces.Box(0.0, 1.0, (size,), dtype=np.float32)
        self._lb: float | None = None  # None until the first reset()

    # ------------------------------------------------------------------ setup

    def _set_instance(self, inst: Instance) -> None:
        self.instance = inst
        self.model = PlantModel(inst, self.delay)
        self._scale = observation_scale(inst)
        self._op_after, self._op_machine_code = route_lookahead(inst)
        # job_next_machine from the model's job_machine (the sentinel reads 0).
        self._machine_code = np.append(np.arange(1, inst.n_machines + 1), 0).astype(np.float32)
        self._time_to_work = op_time_to_work(inst)
        self.reward_scale = self._reward_scale_arg or max(inst.max_duration, 1.0)

    # ------------------------------------------------------------------ API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed, options=options)
        if self._random_size is not None:
            jobs, machines, low, high = self._random_size
            self._set_instance(random_instance(jobs, machines, self.np_random, low=low, high=high))
        else:
            self.model.reset()
        self.model.advance_to_decision()
        self._lb = self.model.lower_bound()
        self._sync_mask()
        return self._observation(), {"instance": self.instance.name}

    def step(
        self, action: int | np.integer[Any] | NDArray[np.integer[Any]]
    ) -> tuple[NDArray[np.float32], SupportsFloat, bool, bool, dict[str, Any]]:
        model = self.model
        job = self._check_action(action)
        if model.classic:
            model.start(job, int(model.job_machine[job]))
        else:
            model.dispatch(job)
        model.advance_to_decision()
        lb = model.lower_bound()
        reward = (self._lb - lb) / self.reward_scale  # type: ignore[operator]
        self._lb = lb
        self._sync_mask()
        terminated = model.all_started
        info: dict[str, Any] = {}
        if terminated:
            info = self.episode_info()
        return self._observation(), reward, terminated, False, info

    def action_masks(self) -> NDArray[np.bool_]:
        """Valid actions now (``True`` = may dispatch this job). A fresh copy."""
        return self.model.action_mask().copy()

    def episode_info(self) -> dict[str, Any]:
        """Results of the run so far: makespan, tardiness, schedule, and the gap if known."""
        model = self.model
        makespan = model.makespan()
        info: dict[str, Any] = {
            "instance": self.instance.name,
            "makespan": makespan,
            "tardiness": model.tardiness(),
            "schedule": model.schedule(),
        }
        if self.instance.best_known:
            info["best_known"] = self.instance.best_known
            info["gap"] = makespan / self.instance.best_known - 1.0
        return info

    def render(self) -> str | None:  # type: ignore[override]
        if self.render_mode != "ansi":
            return None
        m = self.model
        busy = ", ".join(
            f"M{i}:j{int(self.instance.op_job[op])}"
            for i, op in enumerate(m.machine_op)
            if m.machine_free_at[i] > m.now
        )
        return (
            f"t={m.now:g} started={m.n_started}/{self.instance.n_ops} "
            f"valid={np.flatnonzero(m.action_mask()).tolist()} busy=[{busy}]"
        )

    # ------------------------------------------------------------------ internals

    def _check_action(self, action: Any) -> int:
        """The job index ``action`` names, or InvalidActionError naming the valid ones."""
        if self._lb is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        mask = self.model.action_mask()
        n = self.instance.n_jobs
        if isinstance(action, int | np.integer) and not isinstance(action, bool | np.bool_):
            job = int(action)
        else:
            arr = np.asarray(action) if isinstance(action, np.ndarray | list | tuple) else None
            if arr is None or arr.size != 1 or arr.dtype.kind not in "iu":
                raise InvalidActionError(
                    f"action {action!r} is not an integer job index in [0, {n}); "
                    f"valid actions: {np.flatnonzero(mask).tolist()}"
                )
            job = int(arr.reshape(()))
        if not (0 <= job < n) or not mask[job]:
            model = self.model
            if model.all_started:
                why = "the episode is over; call reset()"
            elif not 0 <= job < n:
                why = f"there are only {n} jobs"
            elif model.delay is not None:
                first = int(np.flatnonzero(mask)[0])
                why = (
                    f"with delay={model.delay:g} only jobs for machine "
                    f"{int(model.job_machine[first])}, the next to decide, may go now"
                )
            elif model.job_next[job] >= model.job_end[job]:
                why = f"job {job} has no operation left"
            elif model.job_ready[job] > model.now:
                why = f"job {job} is still busy until t={model.job_ready[job]:g}"
            else:
                why = f"no machine for job {job}'s next operation is idle"
            raise InvalidActionError(
                f"action {job} is not valid now ({why}); valid actions: "
                f"{np.flatnonzero(mask).tolist()}"
            )
        return job

    def _sync_mask(self) -> None:
        self.action_space.live_mask = self.model.action_mask()

    def _observation(self) -> NDArray[np.float32]:
        # The blocks follow OBSERVATION_LAYOUT, arranged so that each numpy call covers
        # several: the model's job_state rows (op time, work, ops, ready) copy in one go,
        # and the three time blocks (job ready, job's machine free, machine free) sit side
        # by side so one subtraction turns them into waits.
        m = self.model
        now = m.now
        n_jobs, n_machines = self.instance.n_jobs, self.instance.n_machines
        obs = np.empty(self.observation_space.shape, dtype=np.float32)
        a, b, c = 4 * n_jobs, 5 * n_jobs, 5 * n_jobs + 2 * n_machines
        d, e = c + n_jobs, c + 2 * n_jobs
        obs[:a].reshape(4, n_jobs)[:] = m.job_state
        # Finished jobs' machine is free at +inf: their wait reads 1 after clipping.
        obs[a:b] = m.job_machine_free()
        obs[b:c].reshape(2, n_machines)[:] = m.machine_state[:, :n_machines]
        obs[3 * n_jobs : b + n_machines] -= now
        obs[c:d] = m.action_mask()
        # A finished job's next operation clamps to its last, after which comes none.
        after = self._op_after[np.minimum(m.job_next, m.last_op)]
        obs[e : e + n_jobs] = m.op_time[after]
        if m.classic:
            obs[d:e] = self._machine_code[m.job_machine]
            obs[e + n_jobs : -3] = self._op_machine_code[after]
        else:
            obs[d:e] = self._soonest_free_code(m.job_next, m.job_done)
            obs[e + n_jobs : -3] = self._soonest_free_code(after, after == self.instance.n_ops)
        obs[-3] = m.n_started
        obs[-2] = now
        obs[-1] = self._time_to_work
        obs *= self._scale
        np.maximum(obs, 0.0, out=obs)
        np.minimum(obs, 1.0, out=obs)
        return obs

    def _soonest_free_code(
        self, ops: NDArray[np.int64], none: NDArray[np.bool_]
    ) -> NDArray[np.float64]:
        """``job_next_machine`` codes of ``ops`` on a flexible shop: the eligible machine
        free soonest (idle machines count as free now; ties to the lowest index), plus one;
        0 where ``none``."""
        eligible = self.instance.eligible[np.minimum(ops, self.instance.n_ops - 1)]
        free_at = np.maximum(self.model.machine_free_at, self.model.now)
        free = np.where(eligible, free_at, np.inf)
        return np.where(none, 0.0, free.argmin(axis=1) + 1.0)


def route_lookahead(inst: Instance) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Per operation, and for a sentinel ``n_ops`` that stands for "no operation": the
    operation after it in its job's route (``n_ops`` after a job's last one and after the
    sentinel), and its ``job_next_machine`` code, ``machine + 1`` (0 for the sentinel).

    The code is the machine of a classic shop; on a flexible shop it names only the first
    eligible machine, so callers choose among eligible machines themselves.
    """
    n_ops = inst.n_ops
    ops = np.arange(n_ops + 1)
    last = np.zeros(n_ops + 1, dtype=np.bool_)
    last[np.asarray(inst.job_offsets[1:]) - 1] = True
    last[n_ops] = True
    after = np.where(last, n_ops, ops + 1)
    code = np.append(np.argmax(inst.eligible, axis=1) + 1, 0).astype(np.float32)
    return after, code


def op_time_to_work(inst: Instance) -> float:
    """The ``op_time_to_work`` block: the longest operation over the largest job's work.

    Time blocks are divided by the former and ``job_work_left`` by the latter, so a time
    block times this is in ``job_work_left``'s unit. The same guards against zero as in
    :func:`observation_scale` (an instance of only zero durations gives 1).
    """
    return max(inst.max_duration, 1e-12) / max(float(inst.job_total_work.max()), 1e-12)


def _random_spec(spec: Mapping[str, Any]) -> tuple[int, int, int, int]:
    unknown = set(spec) - {"jobs", "machines", "low", "high"}
    if unknown:
        raise InstanceError(
            f"random instance spec: unknown key(s) {sorted(unknown)}; "
            "expected 'jobs', 'machines' and optionally 'low', 'high'"
        )
    missing = {"jobs", "machines"} - set(spec)
    if missing:
        raise InstanceError(
            f"random instance spec: missing key(s) {sorted(missing)}; "
            'write it as {"jobs": 15, "machines": 15}'
        )
    values = (spec["jobs"], spec["machines"], spec.get("low", 1), spec.get("high", 99))
    for key, v in zip(("jobs", "machines", "low", "high"), values, strict=True):
        if not isinstance(v, int) or isinstance(v, bool):
            raise InstanceError(f"random instance spec: {key!r} must be an integer, got {v!r}")
    jobs, machines, low, high = values
    if jobs < 1 or machines < 1:
        raise InstanceError(
            f"random instance spec: 'jobs' and 'machines' must be >= 1, got {jobs}x{machines}"
        )
    if not 0 <= low <= high:
        raise InstanceError(f"random instance spec: need 0 <= low <= high, got {low}, {high}")
    return jobs, machines, low, high


def observation_scale(inst: Instance) -> NDArray[np.float32]:
    """One multiplier per observation entry, in :data:`OBSERVATION_LAYOUT` order.

    Times divide by the longest operation, job and machine work by the largest job and
    machine load, the clock by the total work (plus the last release), counts by their
    maximum. Machines, raw ``index + 1`` (0 for none), divide by ``n_machines``;
    ``op_time_to_work`` is not scaled (it is in ``(0, 1]`` on classic shops). Raw model
    values times this, clipped to ``[0, 1]``, are the observation.
    """
    t_norm = 1.0 / max(inst.max_duration, 1e-12)
    norms = {
        "job_next_op_time": t_norm,
        "job_work_left": 1.0 / max(float(inst.job_total_work.max()), 1e-12),
        "job_ops_left": 1.0 / inst.max_ops_per_job,
        "job_wait": t_norm,
        "job_machine_wait": t_norm,
        "machine_wait": t_norm,
        "machine_work_left": 1.0 / max(float(inst.machine_load.max()), 1e-12),
        "job_can_start": 1.0,
        "job_next_machine": 1.0 / inst.n_machines,
        "job_next2_op_time": t_norm,
        "job_next2_machine": 1.0 / inst.n_machines,
        "progress": 1.0 / inst.n_ops,
        "time": 1.0 / max(float(inst.min_duration.sum() + inst.release.max()), 1e-12),
        "op_time_to_work": 1.0,
    }
    counts = {"job": inst.n_jobs, "machine": inst.n_machines, "plant": 1}
    return np.concatenate(
        [np.full(counts[kind], norms[name]) for name, kind in OBSERVATION_LAYOUT]
    ).astype(np.float32)


def observation_blocks(
    obs: NDArray[np.float32], n_jobs: int, n_machines: int
) -> dict[str, NDArray[np.float32]]:
    """Split observations into the named blocks of :data:`OBSERVATION_LAYOUT` (views).

    ``obs`` is one observation ``(size,)`` or a batch ``(..., size)``; each block comes
    back as ``(..., count)`` with ``count`` jobs, machines or 1.
    """
    counts = {"job": n_jobs, "machine": n_machines, "plant": 1}
    expected = sum(counts[kind] for _, kind in OBSERVATION_LAYOUT)
    if obs.shape[-1] != expected:
        raise ValueError(
            f"observation has {obs.shape[-1]} entries; {n_jobs} jobs and {n_machines} "
            f"machines give {expected}"
        )
    out: dict[str, NDArray[np.float32]] = {}
    start = 0
    for name, kind in OBSERVATION_LAYOUT:
        out[name] = obs[..., start : start + counts[kind]]
        start += counts[kind]
    return out
