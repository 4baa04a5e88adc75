"""A learned dispatcher for ``autofab/JobShop-v0``, trained by self-labeling.

Self-labeling (Corsini et al., 2024, "Self-Labeling the Job Shop Scheduling Problem")
needs no reward shaping and no critic: for each training instance, sample ``K`` schedules
from the current policy, keep the one with the best makespan, and train the policy with
cross-entropy to repeat that schedule's decisions. The policy labels its own data, and the
labels get better as it does.

The network scores each job separately (one small MLP applied to every job), from the
job's own six observation features plus context pooled over all jobs and machines. The
same weights therefore run on any instance size: the number of jobs is the mask's length
and the number of machines follows from the observation's length (see
:data:`~autofab.envs.jobshop.OBSERVATION_LAYOUT`). Training uses torch; acting uses a
numpy copy of the weights, because for a network this small torch's per-call overhead
would dominate the dispatch latency.

>>> policy = train_self_labeling(iterations=200, seed=0)
>>> save(policy, "runs/slj.pt")
>>> evaluate(["ta01"], ["mwkr"], 10, policy=load("runs/slj.pt"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from numpy.typing import NDArray
from torch import nn

from autofab.envs.instances import Instance, random_instance
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.rules import RulePolicy

__all__ = [
    "N_FEATURES",
    "SelfLabelingPolicy",
    "TrainStats",
    "job_features",
    "load",
    "save",
    "train_self_labeling",
]

#: Per-job observation blocks (the first six of ``OBSERVATION_LAYOUT``).
N_JOB_BLOCKS = 6
#: Features per job the network sees: own 6, job mean 6, job max 6, machine mean/max 2x2,
#: plant 2.
N_FEATURES = 3 * N_JOB_BLOCKS + 4 + 2
#: Instance sizes (jobs, machines) drawn during training, Taillard-style.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((10, 10), (15, 10), (15, 15), (20, 10), (20, 15))
#: File format version written by :func:`save`.
FORMAT_VERSION = 1


def job_features(obs: NDArray[np.float32], n_jobs: int) -> NDArray[np.float32]:
    """``(n_jobs, N_FEATURES)``: each job's own features next to pooled context.

    Works on a single observation ``(size,)`` or a batch ``(B, size)`` (then returns
    ``(B, n_jobs, N_FEATURES)``); the machine count follows from the size.
    """
    x = np.asarray(obs, dtype=np.float32)
    single = x.ndim == 1
    if single:
        x = x[None]
    batch = x.shape[0]
    n_machines = (x.shape[1] - N_JOB_BLOCKS * n_jobs - 2) // 2
    per_job = N_JOB_BLOCKS - 1  # job blocks before the machine blocks; can_start follows
    a, b = per_job * n_jobs, per_job * n_jobs + 2 * n_machines
    jobs = np.concatenate([x[:, :a], x[:, b : b + n_jobs]], axis=1).reshape(
        batch, N_JOB_BLOCKS, n_jobs
    )
    machines = x[:, a:b].reshape(batch, 2, n_machines)
    context = np.concatenate(
        [
            jobs.mean(axis=2),
            jobs.max(axis=2),
            machines.mean(axis=2),
            machines.max(axis=2),
            x[:, -2:],
        ],
        axis=1,
    )
    out = np.empty((batch, n_jobs, N_FEATURES), dtype=np.float32)
    out[:, :, :N_JOB_BLOCKS] = jobs.transpose(0, 2, 1)
    out[:, :, N_JOB_BLOCKS:] = context[:, None, :]
    return out[0] if single else out


class _Scorer(nn.Module):
    """The per-job MLP: ``(..., N_FEATURES) -> (...)`` logits."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(N_FEATURES, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.net(x).squeeze(-1)


class SelfLabelingPolicy:
    """The trained scorer as a callable ``policy(obs, mask) -> job``, in numpy.

    Greedy: the valid job with the highest score (ties to the lowest index). That is the
    :data:`~autofab.agents.policies.evaluation.PolicyFn` shape ``evaluate`` takes.
    """

    def __init__(self, layers: Sequence[tuple[NDArray[np.float32], NDArray[np.float32]]]) -> None:
        """``layers``: ``(weight (in, out), bias (out,))`` per layer, tanh between them."""
        if not layers:
            raise ValueError("a self-labeling policy needs at least one layer")
        self.layers = [
            (np.ascontiguousarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32))
            for w, b in layers
        ]

    @classmethod
    def from_module(cls, module: _Scorer) -> SelfLabelingPolicy:
        """A numpy snapshot of the torch scorer's current weights."""
        linears = [m for m in module.net if isinstance(m, nn.Linear)]
        return cls([(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in linears])

    def scores(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """Logits for ``(..., N_FEATURES)`` features."""
        h = features
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < last:
                h = np.tanh(h)
        return h[..., 0]

    def __call__(self, obs: NDArray[np.float32], mask: NDArray[np.bool_]) -> int:
        mask = np.asarray(mask, dtype=bool)
        logits = self.scores(job_features(obs, mask.shape[0]))
        return int(np.argmax(np.where(mask, logits, -np.inf)))


@dataclass(frozen=True)
class TrainStats:
    """One training iteration, for progress logs: the instance and what sampling found."""

    iteration: int
    size: tuple[int, int]
    best_makespan: float
    mean_makespan: float
    loss: float
    seconds: float


def _rollout(
    instance: Instance,
    pick: Callable[[NDArray[np.float32], NDArray[np.bool_]], NDArray[np.int64]],
    k: int,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.int64], NDArray[np.float64]]:
    """Run ``k`` episodes on ``instance`` in lockstep; features, masks, actions, makespans.

    Every episode of one instance has ``n_ops`` decisions, so the ``k`` runs stay aligned
    and one network call scores all of them at each step. Arrays are ``(k, n_ops, ...)``.
    """
    envs = [JobShopEnv(instance) for _ in range(k)]
    obs = np.stack([env.reset(seed=0)[0] for env in envs])
    n_jobs, n_ops = instance.n_jobs, instance.n_ops
    feats = np.empty((k, n_ops, n_jobs, N_FEATURES), dtype=np.float32)
    masks = np.empty((k, n_ops, n_jobs), dtype=bool)
    actions = np.empty((k, n_ops), dtype=np.int64)
    makespans = np.empty(k)
    for t in range(n_ops):
        mask = np.stack([env.action_masks() for env in envs])
        feats[:, t] = job_features(obs, n_jobs)
        masks[:, t] = mask
        act = pick(feats[:, t], mask)
        actions[:, t] = act
        for i, env in enumerate(envs):
            o, _, terminated, _, info = env.step(int(act[i]))
            obs[i] = o
            if terminated:
                makespans[i] = info["makespan"]
    return feats, masks, actions, makespans


def _loss(
    module: _Scorer, feats: NDArray[np.float32], masks: NDArray[np.bool_], actions: NDArray[Any]
) -> th.Tensor:
    """Cross-entropy of ``actions`` under the masked softmax over jobs."""
    logits = module(th.from_numpy(feats))
    logits = logits.masked_fill(~th.from_numpy(masks), -1e9)
    return nn.functional.cross_entropy(logits, th.from_numpy(actions))


def train_self_labeling(
    iterations: int = 500,
    *,
    samples: int = 32,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    hidden: int = 64,
    lr: float = 1e-3,
    imitate: str | None = "mwkr",
    imitation_instances: int = 20,
    seed: int = 0,
    max_seconds: float | None = None,
    on_iteration: Callable[[TrainStats], None] | None = None,
) -> SelfLabelingPolicy:
    """Train a dispatcher by self-labeling on random Taillard-style instances.

    Args:
        iterations: Self-labeling iterations, one fresh random instance each.
        samples: Schedules sampled per instance (``K``); the best one is the label.
        sizes: ``(jobs, machines)`` choices, drawn uniformly per iteration.
        hidden: Width of the MLP's two hidden layers.
        lr: Adam learning rate.
        imitate: A rule from :data:`~autofab.envs.rules.RULES` to imitate first (a warm
            start that saves the early iterations from learning what MWKR already knows),
            or None to start from random weights.
        imitation_instances: Instances the imitation warm start is trained on.
        seed: Seeds torch, the instance draws and the sampling.
        max_seconds: Stop early once this much wall time has passed.
        on_iteration: Called after each self-labeling iteration (progress, logs).

    Returns:
        The greedy policy, ready for ``evaluate(..., policy=...)``.
    """
    if iterations < 0 or samples < 1 or not sizes:
        raise ValueError(
            f"need iterations >= 0, samples >= 1 and at least one size; got "
            f"iterations={iterations}, samples={samples}, sizes={list(sizes)}"
        )
    th.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = _Scorer(hidden)
    optimizer = th.optim.Adam(module.parameters(), lr=lr)
    started = time.perf_counter()

    def draw() -> Instance:
        jobs, machines = sizes[int(rng.integers(len(sizes)))]
        return random_instance(jobs, machines, rng)

    if imitate is not None:
        rule = RulePolicy(imitate)
        for _ in range(imitation_instances):
            inst = draw()
            env = JobShopEnv(inst)
            obs, _ = env.reset(seed=0)
            xs, ms, acts = [], [], []
            done = False
            while not done:
                xs.append(job_features(obs, inst.n_jobs))
                ms.append(env.action_masks())
                acts.append(rule(env))
                obs, _, done, _, _ = env.step(acts[-1])
            for _ in range(4):
                loss = _loss(module, np.stack(xs), np.stack(ms), np.asarray(acts))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    for it in range(iterations):
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
        t0 = time.perf_counter()
        inst = draw()
        actor = SelfLabelingPolicy.from_module(module)

        def sample(
            feats: NDArray[np.float32], mask: NDArray[np.bool_], actor: SelfLabelingPolicy = actor
        ) -> NDArray[np.int64]:
            logits = np.where(mask, actor.scores(feats), -np.inf)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            u = rng.random((p.shape[0], 1))
            return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), mask.shape[1] - 1)

        feats, masks, actions, makespans = _rollout(inst, sample, samples)
        best = int(np.argmin(makespans))
        loss = _loss(module, feats[best], masks[best], actions[best])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_iteration is not None:
            on_iteration(
                TrainStats(
                    iteration=it,
                    size=(inst.n_jobs, inst.n_machines),
                    best_makespan=float(makespans[best]),
                    mean_makespan=float(makespans.mean()),
                    loss=float(loss.detach()),
                    seconds=time.perf_counter() - t0,
                )
            )
    return SelfLabelingPolicy.from_module(module)


def save(policy: SelfLabelingPolicy, path: str | Path) -> Path:
    """Write the policy's weights (numpy arrays, no pickled code) to ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"format_version": np.asarray(FORMAT_VERSION)}
    for i, (w, b) in enumerate(policy.layers):
        arrays[f"w{i}"] = w
        arrays[f"b{i}"] = b
    with out.open("wb") as fh:
        np.savez(fh, **arrays)
    return out


def load(path: str | Path) -> SelfLabelingPolicy:
    """Read a policy written by :func:`save`.

    Raises:
        ValueError: The file is not a self-labeling policy of a known format version.
    """
    with np.load(Path(path), allow_pickle=False) as data:
        version = int(data["format_version"]) if "format_version" in data else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} is not a self-labeling policy of format {FORMAT_VERSION} "
                f"(found format {version})"
            )
        n = sum(1 for key in data.files if key.startswith("w"))
        layers = [(data[f"w{i}"], data[f"b{i}"]) for i in range(n)]
    if not all(np.isfinite(w).all() and np.isfinite(b).all() for w, b in layers):
        raise ValueError(f"{str(path)!r} holds non-finite weights")
    return SelfLabelingPolicy(layers)
