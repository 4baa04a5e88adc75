"""Dispatching-rule baselines: SPT, LPT, MWKR, MOPNR, FIFO and EDD.

Each rule scores the jobs from the plant model's state; the policy picks the best-scoring
job among the valid ones (the action mask), ties going to the lowest job index. Rules act
on the same environment a learned policy does, so their results compare directly.

>>> env = gymnasium.make("autofab/JobShop-v0", instance="ft06")
>>> info = run_episode(env, RulePolicy("mwkr"), seed=0)
>>> info["makespan"]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from autofab.envs.model import PlantModel

__all__ = ["RULES", "RULE_DESCRIPTIONS", "MaskedPolicy", "RulePolicy", "rule_names", "run_episode"]

Scores = NDArray[np.float64]


def _next_op_time(model: PlantModel) -> Scores:
    """Fastest processing time of each job's next operation at current speeds."""
    nxt = model.next_ops()
    if model.classic:
        return model.instance.min_duration[nxt] / model.speed[model.fixed_machine[nxt]]
    return model.processing_times(nxt).min(axis=1)


def _spt(model: PlantModel) -> Scores:
    return _next_op_time(model)


def _lpt(model: PlantModel) -> Scores:
    return -_next_op_time(model)


def _mwkr(model: PlantModel) -> Scores:
    return -model.job_work_left


def _mopnr(model: PlantModel) -> Scores:
    return -model.job_ops_left.astype(np.float64)


def _fifo(model: PlantModel) -> Scores:
    return model.job_ready


def _edd(model: PlantModel) -> Scores:
    return model.instance.due


#: Rule name -> scoring function (lower score dispatches first).
RULES: dict[str, Callable[[PlantModel], Scores]] = {
    "spt": _spt,
    "lpt": _lpt,
    "mwkr": _mwkr,
    "mopnr": _mopnr,
    "fifo": _fifo,
    "edd": _edd,
}

RULE_DESCRIPTIONS: dict[str, str] = {
    "spt": "shortest processing time of the next operation",
    "lpt": "longest processing time of the next operation",
    "mwkr": "most work remaining in the job",
    "mopnr": "most operations remaining in the job",
    "fifo": "first in, first out: the job that has waited longest",
    "edd": "earliest due date",
}


def rule_names() -> list[str]:
    return list(RULES)


class MaskedPolicy(Protocol):
    """Anything that picks a valid action from an environment's current state."""

    def __call__(self, env: gym.Env[Any, Any]) -> int: ...


class RulePolicy:
    """A dispatching rule as a policy on ``JobShop-v0`` (or any env exposing ``model``)."""

    def __init__(self, name: str) -> None:
        key = name.lower()
        if key not in RULES:
            raise ValueError(f"unknown dispatching rule {name!r}; choose one of {rule_names()}")
        self.name = key
        self._score = RULES[key]

    def __call__(self, env: gym.Env[Any, Any]) -> int:
        model: PlantModel = env.unwrapped.model  # type: ignore[attr-defined]
        mask = model.action_mask()
        scores = np.where(mask, self._score(model), np.inf)
        return int(np.argmin(scores))

    def __repr__(self) -> str:
        return f"RulePolicy({self.name!r})"


def run_episode(
    env: gym.Env[Any, Any], policy: MaskedPolicy, seed: int | None = None
) -> dict[str, Any]:
    """Run one episode with ``policy``; returns the final ``info`` (makespan, schedule...)."""
    env.reset(seed=seed)
    while True:
        _, _, terminated, truncated, info = env.step(policy(env))
        if terminated or truncated:
            return info
