"""The learned job-shop dispatcher at run time: features, the scoring network, its file.

A per-job MLP scores every job from the job's own observation blocks plus context pooled
over all jobs and machines; the valid job with the highest score is dispatched. The same
weights run on any instance size, because the network sees one job at a time and the
instance size follows from the observation (:func:`~autofab.envs.jobshop.observation_blocks`).

This module needs only numpy: deployment (``autofab evaluate``, the agents) does not need
torch. Training lives in :mod:`autofab.agents.policies.self_labeling`.

Three feature sets exist (:data:`FEATURE_SETS`), each extending the one before it
(:data:`FEATURE_PARENT`). ``basic`` reads each job's own blocks and pools the rest.
``routing`` adds what a job's choice does to the jobs it competes with: the jobs whose next
operation is on the same machine ("rivals"), the bound on their completion if this job goes
first, the delay it imposes on them, and where its route goes next
(:func:`routing_features`). ``queues`` adds the queues and loads of the machines a job
goes to now and next: whether its next-but-one machine would starve without it, and how
near each machine is to being the bottleneck (:func:`queue_features`).

The weights file is a plain ``.npz`` (no pickle): the layers, a format version, the
feature set, the observation layout the policy was trained on (a policy is refused on an
env that lacks a block it reads) and a JSON string of provenance (how it was trained).

>>> policy = load_dispatcher(DEFAULT_DISPATCHER)
>>> job = policy(obs, env.action_masks())
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from autofab.envs.batch import BatchJobShop
from autofab.envs.instances import Instance
from autofab.envs.jobshop import (
    N_JOB_BLOCKS,
    N_MACHINE_BLOCKS,
    N_PLANT_BLOCKS,
    OBSERVATION_LAYOUT,
    observation_blocks,
)
from autofab.envs.model import valid_delay

__all__ = [
    "DEFAULT_DISPATCHER",
    "FEATURE_PARENT",
    "FEATURE_SETS",
    "FORMAT_VERSION",
    "N_FEATURES",
    "N_QUEUE",
    "N_ROUTING",
    "DispatcherLoadError",
    "DispatcherPolicy",
    "Picker",
    "Rollout",
    "SampledSchedule",
    "check_layout",
    "feature_lineage",
    "greedy_picker",
    "job_features",
    "layout_names",
    "load_dispatcher",
    "n_features",
    "queue_features",
    "rollout",
    "routing_features",
    "sample_schedule",
    "sampling_picker",
    "save_dispatcher",
]

#: The blocks the ``basic`` features read, by kind. Named, not taken from the whole layout,
#: so that blocks added to ``JobShop-v0`` later do not change what a trained policy reads.
_JOB_BLOCKS = (
    "job_next_op_time",
    "job_work_left",
    "job_ops_left",
    "job_wait",
    "job_machine_wait",
    "job_can_start",
)
_MACHINE_BLOCKS = ("machine_wait", "machine_work_left")
_PLANT_BLOCKS = ("progress", "time")
#: The further blocks the ``routing`` features read.
_ROUTING_BLOCKS = ("job_next_machine", "job_next2_op_time", "job_next2_machine", "op_time_to_work")

#: ``basic`` features per job: its own job blocks, their mean and max over jobs, the
#: machine blocks' mean and max over machines, and the plant entries.
N_FEATURES = 3 * len(_JOB_BLOCKS) + 2 * len(_MACHINE_BLOCKS) + len(_PLANT_BLOCKS)
#: Per-job features :func:`routing_features` computes.
N_ROUTING = 9
#: Per-job features :func:`queue_features` computes.
N_QUEUE = 6
#: Feature set name -> the blocks it reads. ``routing`` features are the ``basic`` ones,
#: then the :data:`N_ROUTING` routing features, their mean and their max over jobs;
#: ``queues`` features are the ``routing`` ones, then the :data:`N_QUEUE` queue features.
_BASIC_BLOCKS = _JOB_BLOCKS + _MACHINE_BLOCKS + _PLANT_BLOCKS
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "basic": _BASIC_BLOCKS,
    "routing": _BASIC_BLOCKS + _ROUTING_BLOCKS,
    "queues": _BASIC_BLOCKS + _ROUTING_BLOCKS,  # no new blocks: read from the routing ones
}
#: Feature set -> the set whose features its own begin with (None: the first set). A
#: network for a set can start from weights trained on any set it extends: the inputs it
#: adds get zero weights (see ``self_labeling``).
FEATURE_PARENT: dict[str, str | None] = {"basic": None, "routing": "basic", "queues": "routing"}
#: Feature set -> the inputs per job it adds to its parent's.
_ADDED_FEATURES = {"basic": N_FEATURES, "routing": 3 * N_ROUTING, "queues": N_QUEUE}
#: The ``.npz`` layout written by :func:`save_dispatcher` (3 added the feature set, 4 the
#: schedule-generation ``delay``).
FORMAT_VERSION = 4
#: Older formats :func:`load_dispatcher` still reads (2: ``basic`` features only; 2 and 3:
#: non-delay).
_READABLE_FORMATS = (2, 3, 4)
#: The dispatcher shipped with autofab (see ``pretrained/README.md`` for how it was made).
DEFAULT_DISPATCHER = Path(__file__).resolve().parent / "pretrained" / "jobshop_dispatcher.npz"


class DispatcherLoadError(ValueError):
    """A dispatcher file cannot be used; the message names the file and why."""


def layout_names() -> list[str]:
    """The observation blocks this autofab's ``JobShop-v0`` produces, in order."""
    return [name for name, _ in OBSERVATION_LAYOUT]


def n_features(features: str = "basic") -> int:
    """Inputs per job of the feature set ``features`` (a key of :data:`FEATURE_SETS`)."""
    if features not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {features!r}; known: {sorted(FEATURE_SETS)}")
    return sum(_ADDED_FEATURES[name] for name in feature_lineage(features))


def feature_lineage(features: str) -> list[str]:
    """``features`` and every set it extends, the first set first."""
    lineage: list[str] = []
    name: str | None = features
    while name is not None:
        lineage.append(name)
        name = FEATURE_PARENT[name]
    return lineage[::-1]


def _blocks(obs: NDArray[np.float32], n_jobs: int) -> dict[str, NDArray[np.float32]]:
    """A batch ``(B, size)`` of observations split into named blocks."""
    n_machines = (obs.shape[-1] - N_JOB_BLOCKS * n_jobs - N_PLANT_BLOCKS) // N_MACHINE_BLOCKS
    return observation_blocks(obs, n_jobs, n_machines)


def job_features(
    obs: NDArray[np.float32], n_jobs: int, features: str = "basic"
) -> NDArray[np.float32]:
    """``(n_jobs, n_features(features))``: each job's own blocks next to pooled context.

    ``obs`` is one ``JobShop-v0`` observation ``(size,)`` or a batch ``(B, size)`` (then
    the result is ``(B, n_jobs, n_features)``); the machine count follows from the size.
    """
    x = np.asarray(obs, dtype=np.float32)
    single = x.ndim == 1
    if single:
        x = x[None]
    blocks = _blocks(x, n_jobs)
    jobs = np.stack([blocks[name] for name in _JOB_BLOCKS], axis=1)  # (B, blocks, jobs)
    machines = np.stack([blocks[name] for name in _MACHINE_BLOCKS], axis=1)
    context = np.concatenate(
        [
            jobs.mean(axis=2),
            jobs.max(axis=2),
            machines.mean(axis=2),
            machines.max(axis=2),
            *(blocks[name] for name in _PLANT_BLOCKS),
        ],
        axis=1,
    )
    out = np.empty((x.shape[0], n_jobs, n_features(features)), dtype=np.float32)
    out[:, :, : len(_JOB_BLOCKS)] = jobs.transpose(0, 2, 1)
    out[:, :, len(_JOB_BLOCKS) : N_FEATURES] = context[:, None, :]
    lineage = feature_lineage(features)
    if "routing" in lineage:
        own = routing_features(blocks)
        end = N_FEATURES + 3 * N_ROUTING
        out[:, :, N_FEATURES : N_FEATURES + N_ROUTING] = own
        out[:, :, N_FEATURES + N_ROUTING : N_FEATURES + 2 * N_ROUTING] = own.mean(axis=1)[:, None]
        out[:, :, N_FEATURES + 2 * N_ROUTING : end] = own.max(axis=1)[:, None]
        if "queues" in lineage:
            out[:, :, end:] = queue_features(blocks)
    return out[0] if single else out


def _machine_index(encoded: NDArray[np.float32], n_machines: int) -> NDArray[np.int64]:
    """Machine indices from a ``job_next_machine``-style block; -1 where there is none."""
    return np.rint(encoded * n_machines).astype(np.int64) - 1


def routing_features(blocks: Mapping[str, NDArray[np.float32]]) -> NDArray[np.float32]:
    """``(B, n_jobs, N_ROUTING)``: what each job's route and rivals look like.

    ``blocks`` is a batch of observations split by :func:`observation_blocks`. A job's
    *rivals* are the other unfinished jobs whose next operation is on the same machine.
    Times are in units of the longest operation ``T``; ``op_time_to_work`` turns the job
    work block (in units of the largest job's work ``W``) into ``T`` too. Per job:

    0. work still to come on its next machine (``machine_work_left`` of that machine, a
       fraction of the largest machine load);
    1. processing time of the operation after next;
    2. time until that operation's machine is free;
    3. work still to come on that machine (as 0);
    4. rivals, over ``n_jobs``;
    5. rivals that can start now, over ``n_jobs``;
    6. the rivals' completion bound if this job starts now: the largest
       ``max(rival ready, this job's end) + rival's work left``, over ``T + W``;
    7. how far that bound lies above the current bound of all jobs (``ready + work``),
       in ``T``, clipped to ``[-1, 1]``;
    8. the delay this job imposes on its rivals' readiness, summed, over ``4 T``.

    6 and 8 are clipped to ``[0, 1]``. Job waits come from ``job_wait``, which the
    observation clips at ``T``; a job's wait never exceeds its running operation (at most
    ``T``) unless its release lies further ahead.

    An empty maximum (no rivals) is 0, so a job without rivals, and a finished job, scores
    0 on 6 and ``-bound`` (clipped) on 7; finished jobs score 0 on all the others.
    """
    can_start = blocks["job_can_start"]
    b, n_jobs = can_start.shape
    n_machines = blocks["machine_wait"].shape[1]
    ratio = blocks["op_time_to_work"]  # (B, 1): T / W
    machine = _machine_index(blocks["job_next_machine"], n_machines)
    after_next = _machine_index(blocks["job_next2_machine"], n_machines)
    # Index -1 ("no machine") reads the zero column appended at the end.
    pad = np.zeros((b, 1), dtype=np.float32)
    work = np.concatenate([blocks["machine_work_left"], pad], axis=1)
    wait = np.concatenate([blocks["machine_wait"], pad], axis=1)
    done = machine < 0
    rival = machine[:, :, None] == machine[:, None, :]
    rival &= ~done[:, :, None]
    rival[:, np.arange(n_jobs), np.arange(n_jobs)] = False
    ready = blocks["job_wait"]  # (B, J), in T
    op_time = blocks["job_next_op_time"]
    job_work = blocks["job_work_left"] / np.maximum(ratio, 1e-12)  # in T
    # Rival k's bound if job j starts now: max(ready_k, end_j) + work_k. Every term is
    # >= 0, so zeroing the non-rivals leaves the maximum over rivals (0 if none).
    pair = np.maximum(ready[:, None, :], op_time[:, :, None])
    pair += job_work[:, None, :]
    pair *= rival
    rivals_bound = pair.max(axis=2)
    bound = (ready + job_work).max(axis=1, keepdims=True)
    np.subtract(op_time[:, :, None], ready[:, None, :], out=pair)
    np.maximum(pair, 0.0, out=pair)
    pair *= rival
    out = np.empty((b, n_jobs, N_ROUTING), dtype=np.float32)
    out[..., 0] = np.take_along_axis(work, machine, axis=1)
    out[..., 1] = blocks["job_next2_op_time"]
    out[..., 2] = np.take_along_axis(wait, after_next, axis=1)
    out[..., 3] = np.take_along_axis(work, after_next, axis=1)
    n_rivals = rival.sum(axis=2)
    out[..., 4] = n_rivals / n_jobs
    out[..., 5] = (rival & (can_start[:, None, :] > 0.5)).sum(axis=2) / n_jobs
    out[..., 6] = rivals_bound * (ratio / (1.0 + ratio))
    out[..., 7] = rivals_bound - bound
    out[..., 8] = pair.sum(axis=2) / 4.0
    np.clip(out[..., 6:], -1.0, 1.0, out=out[..., 6:])
    return out


def queue_features(blocks: Mapping[str, NDArray[np.float32]]) -> NDArray[np.float32]:
    """``(B, n_jobs, N_QUEUE)``: the queues and loads of each job's next two machines.

    ``blocks`` is a batch of observations split by :func:`observation_blocks`. A machine's
    *queue* is the unfinished jobs whose next operation is on it. Times are in units of the
    longest operation ``T``. Per job, with ``m1`` its next machine and ``m2`` the one after:

    0. the queue at ``m2``, over ``n_jobs``;
    1. the queue's next-operation time at ``m2``, summed, over ``4 T``;
    2. ``m2``'s idle time if this job goes next and nothing else is queued there: the job's
       arrival at ``m2`` (its wait plus its next operation) less ``m2``'s wait, clipped to
       ``[-1, 1]``, where the queue at ``m2`` is empty (0 otherwise: the queue feeds it);
    3. the work left on ``m1`` over the most work left on any machine (1: the bottleneck);
    4. the same for ``m2``;
    5. as 2, whatever the queue at ``m2``.

    A job without an ``m2`` (on its last operation) or finished scores 0 on 0-2, 4 and 5.
    """
    wait_now = blocks["job_wait"]
    b, n_jobs = wait_now.shape
    n_machines = blocks["machine_wait"].shape[1]
    # Index n_machines ("no machine") reads the zero column appended at the end.
    m1 = _machine_index(blocks["job_next_machine"], n_machines)
    m2 = _machine_index(blocks["job_next2_machine"], n_machines)
    m1[m1 < 0] = n_machines
    has_m2 = m2 >= 0
    m2[~has_m2] = n_machines
    # Per observation and machine: jobs queued there and their next-operation time.
    slot = (m1 + (n_machines + 1) * np.arange(b)[:, None]).ravel()
    size = b * (n_machines + 1)
    queue = np.bincount(slot, minlength=size).reshape(b, -1).astype(np.float32)
    queue_time = np.bincount(slot, blocks["job_next_op_time"].ravel(), size).reshape(b, -1)
    queue[:, n_machines] = queue_time[:, n_machines] = 0.0
    pad = np.zeros((b, 1), dtype=np.float32)
    work = blocks["machine_work_left"]
    share = np.concatenate([work / np.maximum(work.max(axis=1, keepdims=True), 1e-6), pad], 1)
    machine_wait = np.concatenate([blocks["machine_wait"], pad], axis=1)
    arrive = np.maximum(wait_now, 0.0) + blocks["job_next_op_time"]
    idle = np.clip(arrive - np.take_along_axis(machine_wait, m2, axis=1), -1.0, 1.0)
    idle *= has_m2
    out = np.empty((b, n_jobs, N_QUEUE), dtype=np.float32)
    out[..., 0] = np.take_along_axis(queue, m2, axis=1) / n_jobs
    out[..., 1] = np.take_along_axis(queue_time, m2, axis=1) / 4.0
    out[..., 2] = idle * (out[..., 0] == 0)
    out[..., 3] = np.take_along_axis(share, m1, axis=1)
    out[..., 4] = np.take_along_axis(share, m2, axis=1)
    out[..., 5] = idle
    return out


class DispatcherPolicy:
    """The scoring MLP as a callable ``policy(obs, mask) -> job``, in numpy.

    Greedy: the valid job with the highest score (ties to the lowest index), which is
    the :data:`~autofab.agents.policies.evaluation.PolicyFn` shape ``evaluate`` takes.
    ``meta`` is the provenance stored with the weights.
    """

    def __init__(
        self,
        layers: Sequence[tuple[NDArray[np.float32], NDArray[np.float32]]],
        meta: Mapping[str, Any] | None = None,
        features: str = "basic",
        delay: float | None = None,
    ) -> None:
        """``layers``: ``(weight (in, out), bias (out,))`` per layer, tanh between them;
        ``features``: the feature set (:data:`FEATURE_SETS`) the first layer reads;
        ``delay``: the schedule-generation scheme it was trained for, ``JobShop-v0``'s
        ``delay`` argument (None: non-delay). It runs on any env; this is the one it
        does best on, and the one ``autofab evaluate`` builds for it."""
        if not layers:
            raise ValueError("a dispatcher needs at least one layer")
        if not valid_delay(delay):
            raise ValueError(f"a dispatcher's delay is None or a number in [0, 1], got {delay!r}")
        self.delay = None if delay is None else float(delay)
        n_in = n_features(features)
        self.features = features
        self.layers = [
            (np.ascontiguousarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32))
            for w, b in layers
        ]
        if self.layers[0][0].shape[0] != n_in or self.layers[-1][0].shape[1] != 1:
            raise ValueError(
                f"a {features!r} dispatcher maps {n_in} features to 1 score; these layers map "
                f"{self.layers[0][0].shape[0]} to {self.layers[-1][0].shape[1]}"
            )
        for (w, b), (w_next, _) in zip(self.layers, self.layers[1:], strict=False):
            if b.shape != (w.shape[1],) or w_next.shape[0] != w.shape[1]:
                raise ValueError(f"layer shapes do not chain: {w.shape}, {b.shape}")
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def blocks(self) -> tuple[str, ...]:
        """The observation blocks this policy reads."""
        return FEATURE_SETS[self.features]

    def features_of(self, obs: NDArray[np.float32], n_jobs: int) -> NDArray[np.float32]:
        """This policy's inputs for one observation or a batch (see :func:`job_features`)."""
        return job_features(obs, n_jobs, self.features)

    def scores(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """Logits for ``(..., n_features)`` features."""
        return mlp_forward(self.layers, features)[..., 0]

    def __call__(self, obs: NDArray[np.float32], mask: NDArray[np.bool_]) -> int:
        mask = np.asarray(mask, dtype=bool)
        logits = self.scores(self.features_of(obs, mask.shape[0]))
        return int(np.argmax(np.where(mask, logits, -np.inf)))


# --------------------------------------------------------------------------- batched rollouts

#: Chooses one job per copy: ``(observations (k, size), masks (k, n_jobs)) -> (k,)`` jobs.
Picker = Callable[[NDArray[np.float32], NDArray[np.bool_]], NDArray[np.int64]]


@dataclass
class Rollout:
    """``k`` schedules of one instance, built in lockstep; the decisions if recorded."""

    sim: BatchJobShop
    makespans: NDArray[np.float64]  # (k,)
    obs: NDArray[np.float32] | None = None  # (k, n_ops, size)
    masks: NDArray[np.bool_] | None = None  # (k, n_ops, n_jobs)
    actions: NDArray[np.int64] | None = None  # (k, n_ops)
    #: The machine of each job's next operation at each decision.
    machines: NDArray[np.int64] | None = None  # (k, n_ops, n_jobs)
    step_seconds: NDArray[np.float64] | None = None  # (n_ops,): one lockstep decision each


def rollout(
    instance: Instance,
    copies: int,
    pick: Picker,
    record: bool = False,
    delay: float | None = None,
) -> Rollout:
    """Run ``copies`` schedules of a classic ``instance`` in lockstep, choosing with ``pick``.

    With ``record``, every observation, mask, action and job's next machine is kept (what
    training needs); otherwise only the makespans, the schedules (in ``sim``) and the time
    of each step. ``delay`` is the env's schedule-generation scheme (None: non-delay).
    """
    sim = BatchJobShop(instance, copies, delay)
    n_ops, n_jobs = instance.n_ops, instance.n_jobs
    obs = masks = actions = machines = None
    if record:
        size = sim.observe().shape[1]
        obs = np.empty((copies, n_ops, size), dtype=np.float32)
        masks = np.empty((copies, n_ops, n_jobs), dtype=bool)
        actions = np.empty((copies, n_ops), dtype=np.int64)
        machines = np.empty((copies, n_ops, n_jobs), dtype=np.int64)
    step_seconds = np.empty(n_ops)
    for t in range(n_ops):
        t0 = time.perf_counter()
        x = sim.observe()
        chosen = pick(x, sim.mask)
        step_seconds[t] = time.perf_counter() - t0
        if obs is not None and masks is not None and actions is not None:
            obs[:, t] = x
            masks[:, t] = sim.mask
            actions[:, t] = chosen
            machines[:, t] = sim.job_machine  # type: ignore[index]
        sim.step(chosen)
    return Rollout(sim, sim.makespan.copy(), obs, masks, actions, machines, step_seconds)


def greedy_picker(policy: DispatcherPolicy, n_jobs: int) -> Picker:
    """The policy's own choice in every copy: the valid job with the highest score."""

    def pick(obs: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.int64]:
        logits = policy.scores(policy.features_of(obs, n_jobs))
        return np.argmax(np.where(mask, logits, -np.inf), axis=1)

    return pick


def sampling_picker(
    policy: DispatcherPolicy, n_jobs: int, rng: np.random.Generator, greedy_copies: int = 0
) -> Picker:
    """Sample each copy's job from the softmax over valid jobs; the first
    ``greedy_copies`` copies take the greedy choice instead."""

    def pick(obs: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.int64]:
        raw = policy.scores(policy.features_of(obs, n_jobs))
        if not np.isfinite(raw[mask]).all():
            raise FloatingPointError(
                "the dispatcher's scores are not finite (diverged weights?); "
                "cannot sample a schedule"
            )
        scores = np.where(mask, raw, -np.inf)
        best = np.argmax(scores, axis=1)
        scores -= scores.max(axis=1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random((p.shape[0], 1))
        chosen = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), n_jobs - 1)
        # A draw past the last cumulative sum (it can round to just below 1) would land on
        # whatever job is last, valid or not: take the greedy one there instead.
        rows = np.arange(len(chosen))
        off = ~mask[rows, chosen]
        chosen[off] = best[off]
        chosen[:greedy_copies] = best[:greedy_copies]
        return chosen

    return pick


@dataclass(frozen=True)
class SampledSchedule:
    """The best of ``samples`` schedules the policy built (the greedy one among them)."""

    makespan: float
    schedule: list[dict[str, Any]]
    samples: int
    seconds: float
    #: p99 over decisions of one lockstep step (all samples decide at once), in ms.
    step_ms_p99: float


def sample_schedule(
    policy: DispatcherPolicy, instance: Instance, samples: int, seed: int = 0
) -> SampledSchedule:
    """Build ``samples`` schedules at once, the greedy one and ``samples - 1`` sampled from
    the policy's softmax, and keep the shortest (the greedy one on ties).

    The usual "sampling" decode of learned constructive schedulers: it plans a whole
    schedule in one go, so it suits planning ahead, not a decision that must come within
    a millisecond (the greedy policy is for that).

    Raises:
        ValueError: ``samples`` < 1, or a flexible instance (the lockstep simulator runs
            classic job shops only).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    run = rollout(
        instance, samples, sampling_picker(policy, instance.n_jobs, rng, 1), delay=policy.delay
    )
    best = int(np.argmin(run.makespans))
    assert run.step_seconds is not None
    return SampledSchedule(
        makespan=float(run.makespans[best]),
        schedule=run.sim.schedule(best),
        samples=samples,
        seconds=time.perf_counter() - started,
        step_ms_p99=float(np.percentile(run.step_seconds, 99)) * 1e3,
    )


# --- The .npz weight layers, shared by every numpy policy file ------------------------------

#: ``(weight (in, out), bias (out,))`` per layer.
Layers = Sequence[tuple[NDArray[Any], NDArray[Any]]]


def mlp_forward(layers: Layers, x: NDArray[Any]) -> NDArray[Any]:
    """``x @ w + b`` through every layer, tanh between them (not after the last)."""
    h = x
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < last:
            h = np.tanh(h)
    return h


def layer_arrays(layers: Layers) -> dict[str, NDArray[Any]]:
    """The layers as ``.npz`` entries ``w0, b0, w1, b1, ...`` (float32)."""
    out: dict[str, NDArray[Any]] = {}
    for i, (w, b) in enumerate(layers):
        out[f"w{i}"] = np.asarray(w, dtype=np.float32)
        out[f"b{i}"] = np.asarray(b, dtype=np.float32)
    return out


def read_layers(data: Any) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    """The layers of an open ``.npz`` written with :func:`layer_arrays` (KeyError if one
    is missing)."""
    n = sum(1 for key in data.files if key.startswith("w"))
    return [(data[f"w{i}"], data[f"b{i}"]) for i in range(n)]


def layers_finite(layers: Layers) -> bool:
    """Whether every weight and bias is finite."""
    return all(np.isfinite(w).all() and np.isfinite(b).all() for w, b in layers)


def save_dispatcher(
    policy: DispatcherPolicy, path: str | Path, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the weights, the feature set, the schedule ``delay``, the observation layout
    and ``meta`` (JSON)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "format_version": np.asarray(FORMAT_VERSION),
        "features": np.asarray(policy.features),
        # NaN: non-delay (None), which a float array cannot hold.
        "delay": np.asarray(np.nan if policy.delay is None else policy.delay),
        "layout": np.asarray(layout_names()),
        "meta": np.asarray(json.dumps({**policy.meta, **(meta or {})}, sort_keys=True)),
    }
    arrays.update(layer_arrays(policy.layers))
    with out.open("wb") as fh:
        np.savez(fh, **arrays)
    return out


def load_dispatcher(path: str | Path) -> DispatcherPolicy:
    """Read a dispatcher written by :func:`save_dispatcher` (this format or format 2).

    Raises:
        DispatcherLoadError: The file is missing, not an ``.npz``, of an unknown format
            version or feature set, needs an observation block this autofab's env lacks
            (or one its own layout lacked), or holds bad weights. The message names the
            file and the fault.
    """
    where = repr(str(path))
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            files = set(data.files)
            version = int(data["format_version"]) if "format_version" in files else None
            if version not in _READABLE_FORMATS:
                raise DispatcherLoadError(
                    f"{where} is not a dispatcher of format "
                    f"{' or '.join(map(str, _READABLE_FORMATS))} (found format {version})"
                )
            layout = [str(name) for name in data["layout"]]
            features = str(data["features"]) if "features" in files else "basic"
            delay = float(data["delay"]) if "delay" in files else math.nan
            meta = json.loads(str(data["meta"])) if "meta" in files else {}
            layers = read_layers(data)
    except DispatcherLoadError:
        raise
    except FileNotFoundError:
        raise DispatcherLoadError(f"{where} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DispatcherLoadError(f"{where} is not a readable dispatcher file: {exc}") from None
    if features not in FEATURE_SETS:
        raise DispatcherLoadError(
            f"{where} reads feature set {features!r}, which this autofab does not know "
            f"(known: {sorted(FEATURE_SETS)})"
        )
    check_layout(FEATURE_SETS[features], layout, where)
    if not layers_finite(layers):
        raise DispatcherLoadError(f"{where} holds non-finite weights")
    try:
        return DispatcherPolicy(layers, meta, features, None if math.isnan(delay) else delay)
    except ValueError as exc:
        raise DispatcherLoadError(f"{where}: {exc}") from None


def check_layout(blocks: Sequence[str], trained_on: Sequence[str], where: str) -> None:
    """Refuse a dispatcher unless every block it reads was in the layout it was trained on
    and is in this autofab's ``JobShop-v0`` layout (blocks are matched by name, so blocks
    added later, or moved, do not matter).

    Raises:
        DispatcherLoadError: naming the missing blocks and both layouts.
    """
    current = layout_names()
    for layout, whose in ((trained_on, "the layout it was trained on"), (current, "this env")):
        missing = [name for name in blocks if name not in layout]
        if missing:
            raise DispatcherLoadError(
                f"{where} reads observation block(s) {missing} that {whose} lacks: trained on "
                f"{list(trained_on)}, this autofab's JobShop-v0 has {current}"
            )
