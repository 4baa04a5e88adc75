"""Train the job-shop dispatcher by self-labeling on random Taillard-style instances.

Self-labeling (Corsini et al., 2024, "Self-Labeling the Job Shop Scheduling Problem")
needs no reward shaping and no critic: for each training instance, sample ``K`` schedules
from the current policy, keep the one with the best makespan, and train the policy with
cross-entropy to repeat that schedule's decisions. The policy labels its own data, and the
labels get better as it does.

The network is :class:`~autofab.agents.policies.dispatcher.DispatcherPolicy`'s per-job
MLP. Rollouts run on :class:`~autofab.envs.batch.BatchJobShop`, which steps all ``K``
samples of one instance in lockstep and produces ``JobShop-v0``'s observations exactly,
so the trained policy meets in deployment the inputs it was trained on. Training never
sees a benchmark instance: it draws fresh random instances, and it keeps the weights that
do best on a fixed validation set of other random instances (greedy makespan over the
instance's lower bound).

>>> policy = train_self_labeling(iterations=2000, seed=0)
>>> save_dispatcher(policy, "runs/dispatcher.npz")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from numpy.typing import NDArray
from torch import nn

from autofab.agents.policies.dispatcher import (
    FEATURE_SETS,
    DispatcherPolicy,
    Picker,
    Rollout,
    feature_lineage,
    greedy_picker,
    job_features,
    n_features,
    rollout,
    sampling_picker,
)
from autofab.envs.instances import Instance, random_instance
from autofab.envs.jobshop import observation_blocks
from autofab.envs.model import valid_delay

__all__ = [
    "DEFAULT_SIZES",
    "ENV_ID",
    "HYPERPARAMS",
    "VALIDATION_SIZES",
    "TrainStats",
    "check_hyperparams",
    "check_init",
    "sizes_from_env_kwargs",
    "train_self_labeling",
    "validation_instances",
    "validation_score",
]

#: The environment whose observations the dispatcher reads.
ENV_ID = "autofab/JobShop-v0"
#: Instance sizes (jobs, machines) drawn during training, Taillard-style.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((10, 10), (15, 10), (15, 15), (20, 10), (20, 15))
#: Sizes of the fixed validation instances (``validation_instances`` of each).
VALIDATION_SIZES: tuple[tuple[int, int], ...] = ((15, 15), (20, 15))
#: Seed of the validation instances: the same set for every training seed.
VALIDATION_SEED = 12_345


class _Scorer(nn.Module):
    """The per-job MLP in torch, for training: ``(..., n_features) -> (...)`` logits."""

    def __init__(self, hidden: int, features: str = "basic", delay: float | None = None) -> None:
        super().__init__()
        self.features = features
        self.delay = delay
        self.net = nn.Sequential(
            nn.Linear(n_features(features), hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.net(x).squeeze(-1)

    def load(self, policy: DispatcherPolicy) -> None:
        """Copy ``policy``'s weights in (fine-tuning).

        A network with wider hidden layers than ``policy``'s is *widened* without changing
        its function (net2net style): the given weights fill the top-left corner, the new
        hidden units keep their random incoming weights, and their outgoing weights are
        zero, so they start silent and training decides what they learn. A policy of a
        feature set this network's set extends (``basic`` -> ``routing`` -> ``queues``)
        loads the same way: the added features come after its own and their input weights
        start at zero.
        """
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        shapes = [(m.in_features, m.out_features) for m in linears]
        given = [w.shape for w, _ in policy.layers]
        fits = len(given) == len(shapes) and all(
            gi <= si and go <= so for (gi, go), (si, so) in zip(given, shapes, strict=True)
        )
        lineage = feature_lineage(self.features)
        if policy.features not in lineage:
            raise ValueError(
                f"init weights read the {policy.features!r} features; this network reads "
                f"{self.features!r} (an init may read the same features or a set they "
                f"extend: {', '.join(repr(name) for name in lineage)})"
            )
        if not fits or given[-1][1] != shapes[-1][1]:
            raise ValueError(
                f"init weights have layers {given}; this network has {shapes} (the init "
                "may be as wide or narrower, never wider, with the same depth)"
            )
        with th.no_grad():
            for m, (w, b) in zip(linears, policy.layers, strict=True):
                n_in, n_out = w.shape
                m.weight[:, n_in:] = 0.0  # new inputs (new hidden units below) start silent
                m.weight[:n_out, :n_in] = th.from_numpy(w.T.copy())
                m.bias[:n_out] = th.from_numpy(b.copy())

    def snapshot(self) -> DispatcherPolicy:
        """A numpy copy of the current weights."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        return DispatcherPolicy(
            [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears],
            features=self.features,
            delay=self.delay,
        )


def _feature_set(features: str | None, init: DispatcherPolicy | None) -> str:
    """The feature set a run trains: ``features``, else the init's, else ``basic``."""
    if features is not None:
        return features
    return "basic" if init is None else init.features


def check_init(init: DispatcherPolicy, hidden: int, features: str | None = None) -> None:
    """Raise ValueError (saying why) unless ``init`` loads into a network of ``hidden``
    units reading ``features`` (``None``: the init's), as :func:`train_self_labeling`
    would load it."""
    _Scorer(hidden, _feature_set(features, init)).load(init)


@dataclass(frozen=True)
class TrainStats:
    """One training iteration, for progress logs."""

    iteration: int
    env_steps: int
    best_makespan: float
    mean_makespan: float
    loss: float
    seconds: float
    #: Mean greedy makespan / lower bound on the validation set, when measured this time.
    validation: float | None
    best_validation: float


def _mwkr(n_jobs: int, n_machines: int) -> Picker:
    """Most work remaining, read from the observation (the imitation warm start)."""

    def pick(obs: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.int64]:
        work = observation_blocks(obs, n_jobs, n_machines)["job_work_left"]
        return np.argmax(np.where(mask, work, -np.inf), axis=1)

    return pick


#: What a label's decision is scored against: "machine", the other jobs waiting for the same
#: machine (the default), or "all", every job that could start.
LOSS_OVER = ("machine", "all")


def _loss(
    module: _Scorer, run: Rollout, which: int, n_jobs: int, over: str = "machine"
) -> th.Tensor:
    """Cross-entropy of schedule ``which``'s decisions under the masked softmax.

    With ``over="machine"`` each decision's softmax covers only the valid jobs that wait for
    the chosen job's machine. In a non-delay schedule every idle machine with a waiting job
    gets one of them now, whatever order the machines are served in, so the schedule is
    fixed by which job each machine takes; the order across machines is sampling noise,
    and scoring a label against the other machines' jobs would teach it. Decisions with
    one job waiting for the machine teach nothing and are left out.
    """
    if run.obs is None or run.masks is None or run.actions is None or run.machines is None:
        raise ValueError("training needs a recorded rollout (rollout(..., record=True))")
    masks, actions = run.masks[which], run.actions[which]
    rows = np.arange(len(actions))
    obs = run.obs[which]
    if over == "machine":
        machines = run.machines[which]
        masks = masks & (machines == machines[rows, actions][:, None])
        keep = masks.sum(axis=1) > 1
        if not keep.any():
            return th.zeros((), requires_grad=True)
        obs, masks, actions = obs[keep], masks[keep], actions[keep]
    feats = job_features(obs, n_jobs, module.features)
    logits = module(th.from_numpy(feats)).masked_fill(~th.from_numpy(masks), -1e9)
    return nn.functional.cross_entropy(logits, th.from_numpy(actions))


def _lower_bound(instance: Instance) -> float:
    return max(float(instance.job_total_work.max()), float(instance.machine_load.max()))


def validation_instances(per_size: int) -> list[Instance]:
    """The fixed validation set: ``per_size`` random instances of each validation size."""
    rng = np.random.default_rng(VALIDATION_SEED)
    return [random_instance(j, m, rng) for j, m in VALIDATION_SIZES for _ in range(per_size)]


def validation_score(policy: DispatcherPolicy, instances: Sequence[Instance]) -> float:
    """Mean greedy makespan over the instance's lower bound (lower is better, >= 1), on
    schedules of the policy's own ``delay``."""
    ratios = [
        rollout(inst, 1, greedy_picker(policy, inst.n_jobs), delay=policy.delay).makespans[0]
        / _lower_bound(inst)
        for inst in instances
    ]
    return float(np.mean(ratios))


def train_self_labeling(
    iterations: int = 2000,
    *,
    samples: int = 64,
    batch: int = 4,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    hidden: int = 64,
    lr: float = 5e-4,
    imitation_instances: int = 20,
    validation_instances_per_size: int = 8,
    validate_every: int = 25,
    seed: int = 0,
    max_seconds: float | None = None,
    max_env_steps: int | None = None,
    init: DispatcherPolicy | None = None,
    lr_final: float | None = None,
    loss_over: str = "machine",
    features: str | None = None,
    delay: float | None = None,
    on_iteration: Callable[[TrainStats], None] | None = None,
    on_best: Callable[[DispatcherPolicy], None] | None = None,
) -> DispatcherPolicy:
    """Train a dispatcher by self-labeling on random Taillard-style instances.

    Args:
        iterations: Gradient steps; each one samples ``batch`` fresh random instances.
        samples: Schedules sampled per instance (``K``); the best one is the label.
        batch: Instances per gradient step.
        sizes: ``(jobs, machines)`` choices, drawn uniformly per instance.
        hidden: Width of the MLP's two hidden layers.
        lr: Adam learning rate.
        imitation_instances: Instances on which to imitate MWKR first (a warm start that
            saves the early iterations from learning what MWKR already knows); 0 starts
            from random weights.
        validation_instances_per_size: Validation instances per size in
            :data:`VALIDATION_SIZES`; 0 turns validation off (the last weights are kept).
        validate_every: Validate every this many iterations, and after the last one.
        seed: Seeds torch, the instance draws and the sampling.
        max_seconds: Stop once this much wall time has passed.
        max_env_steps: Stop once this many environment steps have been simulated.
        init: Start from these weights (fine-tuning) instead of random ones and the
            imitation warm start; its hidden width must be at most ``hidden`` (a wider
            network is widened from it without changing its function).
        lr_final: Anneal the learning rate from ``lr`` to this along a cosine, over the
            run's budget (whichever of ``iterations``, ``max_seconds`` and
            ``max_env_steps`` is closest to running out); ``None`` keeps ``lr``.
        loss_over: ``"machine"``: score each label decision against the jobs waiting for
            the same machine only (see :func:`_loss`); ``"all"``: against every valid job.
        features: The feature set the network reads (``"basic"``, ``"routing"`` or
            ``"queues"``, see :data:`~autofab.agents.policies.dispatcher.FEATURE_SETS`);
            ``None``: the ``init``'s, else ``"basic"``. An ``init`` of a set this one
            extends may start it (``basic`` -> ``routing`` -> ``queues``).
        delay: Build the schedules with ``JobShop-v0``'s ``delay`` (parameterised active
            schedules whose machines may wait for a job about to arrive; see
            :class:`~autofab.envs.model.PlantModel`); ``None``: the ``init``'s, else
            non-delay. The policy records it, and is evaluated with it.
        on_iteration: Called after every iteration (progress bars, logs).
        on_best: Called with the weights each time they reach a new best validation score
            (a checkpoint: a run that is stopped or fails keeps its best weights).

    Returns:
        The greedy policy with the best validation score; ``policy.meta`` records the
        settings, the iterations and environment steps done, and the validation score.
    """
    features = _feature_set(features, init)
    if delay is None and init is not None:
        delay = init.delay
    checks = {
        "iterations": iterations >= 0,
        "samples": samples >= 1,
        "batch": batch >= 1,
        "hidden": hidden >= 1,
        "lr": lr > 0,
        "lr_final": lr_final is None or 0 < lr_final <= lr,
        "loss_over": loss_over in LOSS_OVER,
        "features": features in FEATURE_SETS,
        "delay": valid_delay(delay),
        "validate_every": validate_every >= 1,
        "sizes": len(sizes) > 0 and all(j >= 1 and m >= 1 for j, m in sizes),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        values = {
            "iterations": iterations,
            "samples": samples,
            "batch": batch,
            "hidden": hidden,
            "lr": lr,
            "lr_final": lr_final,
            "loss_over": loss_over,
            "features": features,
            "delay": delay,
            "validate_every": validate_every,
            "sizes": list(sizes),
        }
        raise ValueError(
            "self-labeling needs iterations >= 0, samples, batch, hidden and validate_every "
            f">= 1, lr > 0, 0 < lr_final <= lr, loss_over in {LOSS_OVER}, features in "
            f"{sorted(FEATURE_SETS)}, delay null or in [0, 1] and at least one size; got "
            + ", ".join(f"{name}={values[name]}" for name in bad)
        )
    th.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = _Scorer(hidden, features, delay)
    if init is not None:
        module.load(init)
        imitation_instances = 0
    optimizer = th.optim.Adam(module.parameters(), lr=lr)
    started = time.perf_counter()

    def draw() -> Instance:
        jobs, machines = sizes[int(rng.integers(len(sizes)))]
        return random_instance(jobs, machines, rng)

    for _ in range(imitation_instances):
        inst = draw()
        run = rollout(inst, 1, _mwkr(inst.n_jobs, inst.n_machines), record=True, delay=delay)
        for _ in range(4):
            optimizer.zero_grad()
            _loss(module, run, 0, inst.n_jobs, loss_over).backward()
            optimizer.step()

    validation = validation_instances(validation_instances_per_size)
    best = module.snapshot()
    best_score = validation_score(best, validation) if validation else float("inf")
    env_steps = 0
    done = 0

    def progress(it: int) -> float:
        """How much of the budget is spent, in [0, 1]: the largest of the three shares."""
        shares = [it / iterations if iterations else 1.0]
        if max_seconds is not None:
            shares.append((time.perf_counter() - started) / max_seconds)
        if max_env_steps is not None:
            shares.append(env_steps / max(max_env_steps, 1))
        return min(max(shares), 1.0)

    for it in range(iterations):
        out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
        out_of_steps = max_env_steps is not None and env_steps >= max_env_steps
        if out_of_time or out_of_steps:
            break
        if lr_final is not None:
            cosine = 0.5 * (1.0 + np.cos(np.pi * progress(it)))
            for group in optimizer.param_groups:
                group["lr"] = lr_final + (lr - lr_final) * cosine
        t0 = time.perf_counter()
        actor = module.snapshot()
        optimizer.zero_grad()
        loss_sum, best_sum, mean_sum = 0.0, 0.0, 0.0
        for _ in range(batch):
            inst = draw()
            run = rollout(
                inst, samples, sampling_picker(actor, inst.n_jobs, rng), record=True, delay=delay
            )
            label = int(np.argmin(run.makespans))
            loss = _loss(module, run, label, inst.n_jobs, loss_over) / batch
            loss.backward()
            loss_sum += float(loss.detach())
            best_sum += float(run.makespans[label]) / _lower_bound(inst) / batch
            mean_sum += float(run.makespans.mean()) / _lower_bound(inst) / batch
            env_steps += samples * inst.n_ops
        optimizer.step()
        done = it + 1
        score = None
        if validation and done % validate_every == 0:
            candidate = module.snapshot()
            score = validation_score(candidate, validation)
            if score < best_score:
                best, best_score = candidate, score
                if on_best is not None:
                    on_best(
                        DispatcherPolicy(
                            best.layers, {"checkpoint_iteration": done}, features, delay
                        )
                    )
        if on_iteration is not None:
            on_iteration(
                TrainStats(
                    iteration=it,
                    env_steps=env_steps,
                    best_makespan=best_sum,
                    mean_makespan=mean_sum,
                    loss=loss_sum,
                    seconds=time.perf_counter() - t0,
                    validation=score,
                    best_validation=best_score,
                )
            )
    if validation and done % validate_every != 0:  # the last weights get their chance too
        candidate = module.snapshot()
        score = validation_score(candidate, validation)
        if score < best_score:
            best, best_score = candidate, score
    final = best if validation else module.snapshot()
    meta: dict[str, Any] = {
        "algo": "self_labeling",
        "env_id": ENV_ID,
        "seed": seed,
        "iterations": done,
        "env_steps": env_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "validation_makespan_over_lb": None if not validation else round(best_score, 4),
        "settings": {
            "samples": samples,
            "batch": batch,
            "sizes": [list(s) for s in sizes],
            "hidden": hidden,
            "lr": lr,
            "lr_final": lr_final,
            "loss_over": loss_over,
            "features": features,
            "delay": delay,
            "imitation_instances": imitation_instances,
            "init": None if init is None else init.meta.get("source", "given weights"),
            "validation_instances_per_size": validation_instances_per_size,
            "validate_every": validate_every,
        },
    }
    return DispatcherPolicy(final.layers, meta, features, delay)


# --------------------------------------------------------------------------- autofab train

#: Hyperparameters a ``configs/train/self_labeling.yml`` entry may set, and their checks.
HYPERPARAMS: dict[str, str] = {
    "n_timesteps": "an integer >= 1: environment steps to simulate (-n overrides it)",
    "samples": "an integer >= 1: schedules sampled per instance",
    "batch": "an integer >= 1: instances per gradient step",
    "hidden": "an integer >= 1: width of the two hidden layers",
    "learning_rate": "a number > 0",
    "loss_over": "'machine' (a label is scored against the jobs waiting for its machine) or 'all'",
    "features": "'basic', 'routing' or 'queues': the dispatcher's feature set, "
    "or null (the init's)",
    "delay": "a number in [0, 1]: build schedules whose machines may wait that much for a job "
    "(JobShop-v0's delay), or null (the init's, else non-delay)",
    "learning_rate_final": "a number > 0 (at most learning_rate): cosine-anneal to it, or null",
    "sizes": "a list of [jobs, machines] pairs to draw training instances from",
    "imitation_instances": "an integer >= 0: MWKR warm-start instances",
    "validation_instances_per_size": "an integer >= 0",
    "validate_every": "an integer >= 1: iterations between validations",
    "max_seconds": "a number > 0, or null for no time limit",
    "init": "a dispatcher to fine-tune: 'default', a .npz or a self_labeling run folder",
}


def _valid(key: str, value: Any) -> bool:
    def integer(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")

    if key in ("imitation_instances", "validation_instances_per_size"):
        return integer(value, 0)
    if key == "learning_rate":
        return number(value)
    if key in ("max_seconds", "learning_rate_final"):
        return value is None or number(value)
    if key == "init":
        return isinstance(value, str) and bool(value)
    if key == "loss_over":
        return value in LOSS_OVER
    if key == "features":
        return value is None or value in FEATURE_SETS
    if key == "delay":
        return valid_delay(value)
    if key == "sizes":
        return (
            isinstance(value, list)
            and len(value) > 0
            and all(
                isinstance(s, list) and len(s) == 2 and all(integer(x, 1) for x in s) for s in value
            )
        )
    return integer(value, 1)


def check_hyperparams(params: dict[str, Any]) -> dict[str, Any]:
    """Checked settings for :func:`train_self_labeling` from a config entry.

    Raises:
        ValueError: An unknown key, or a value of the wrong type or range; the message
            names the key and what it must be.
    """
    unknown = sorted(set(params) - set(HYPERPARAMS))
    if unknown:
        raise ValueError(
            f"self_labeling has no hyperparameter(s) {unknown}; known: {sorted(HYPERPARAMS)}"
        )
    for key, value in params.items():
        if not _valid(key, value):
            raise ValueError(
                f"self_labeling hyperparameter {key}={value!r}: must be {HYPERPARAMS[key]}"
            )
    final, start = params.get("learning_rate_final"), params.get("learning_rate")
    if final is not None and start is not None and final > start:
        raise ValueError(
            f"self_labeling hyperparameter learning_rate_final={final!r} is above "
            f"learning_rate={start!r}; the rate anneals down to it"
        )
    return dict(params)


def sizes_from_env_kwargs(env_kwargs: dict[str, Any], sizes: list[list[int]]) -> list[list[int]]:
    """Training sizes: ``{"instance": {"jobs": J, "machines": M}}`` narrows them to one.

    Raises:
        ValueError: ``env_kwargs`` names a fixed instance or another keyword; self-labeling
            trains on fresh random instances, never on one fixed (benchmark) instance.
    """
    if not env_kwargs:
        return sizes
    instance = env_kwargs.get("instance")
    extra = sorted(set(env_kwargs) - {"instance"})
    random_spec = (
        isinstance(instance, dict)
        and set(instance) <= {"jobs", "machines"}
        and all(isinstance(instance.get(k), int) and instance[k] >= 1 for k in ("jobs", "machines"))
    )
    if extra or not random_spec:
        raise ValueError(
            "self_labeling trains on fresh random instances: --env-kwargs may only be "
            '{"instance": {"jobs": J, "machines": M}} (or leave it out to use the sizes in '
            "configs/train/self_labeling.yml; delay schedules are --hyperparams delay:D); "
            f"got {env_kwargs}"
        )
    assert isinstance(instance, dict)
    return [[int(instance["jobs"]), int(instance["machines"])]]
