"""Trained-policy artifacts: what a run folder holds, and the one loader that reads it.

A training run (:mod:`autofab.agents.policies.training`) leaves a folder with
``model.zip`` (the SB3 model), ``vecnormalize.pkl`` when observations were normalised,
``config.yml`` and ``policy.json``. ``policy.json`` is the contract between training and
deployment: it names the algorithm, the env id and version, and a *signature* of the
observation and action spaces. :func:`load_policy` checks that contract before it lets a
policy act, so a policy trained on ``ft06`` is refused on ``ta01`` with a message naming
the space that differs, instead of failing later with a shape error deep inside torch.

Every agent that deploys a learned policy goes through :func:`load_policy`, as do the
evaluation callbacks during training (via :class:`LoadedPolicy`), so a policy acts the
same way in training curves, in benchmarks and on the plant::

    policy = load_policy("runs/autofab-JobShop-v0__maskable_ppo__0__1700000000", env)
    action = policy(obs, env.action_masks())

A machine agent's learned bidding policy (:mod:`autofab.agents.policies.bidding_policy`,
an ``.npz`` whose ``kind`` is ``"bidding"``) loads here too, without an env: it bids on
calls for proposals rather than acting on observations::

    policy = load_policy("agents/policies/pretrained/bidding_gate.npz")  # LearnedBidding
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

from autofab.agents.policies.bidding_policy import (
    BiddingLoadError,
    LearnedBidding,
    is_bidding_file,
    read_bidding_file,
)
from autofab.agents.policies.dispatcher import (
    DEFAULT_DISPATCHER,
    DispatcherLoadError,
    DispatcherPolicy,
    check_layout,
    layout_names,
    load_dispatcher,
)

if TYPE_CHECKING:  # SB3 and torch load only when an SB3 model does (deployment may lack them)
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecNormalize

__all__ = [
    "ALGOS",
    "DEFAULT_POLICY_NAME",
    "DISPATCHER_FILE",
    "MODEL_FILE",
    "NORMALIZER_FILE",
    "POLICY_FILE",
    "SB3_ALGOS",
    "SCHEMA_VERSION",
    "SELF_LABELING",
    "LoadedPolicy",
    "PolicyLoadError",
    "algo_class",
    "dispatcher_spaces",
    "load_policy",
    "package_version",
    "read_policy_json",
    "resolve_policy_path",
    "space_signature",
    "write_policy_json",
]

#: Version of the ``policy.json`` layout; bumped when a field changes meaning.
SCHEMA_VERSION = 1
POLICY_FILE = "policy.json"
MODEL_FILE = "model.zip"
#: The observation normaliser's file name, as rl-baselines3-zoo names it.
NORMALIZER_FILE = "vecnormalize.pkl"

#: SB3 algorithm names (as on the command line and in ``policy.json``) -> their class.
SB3_ALGOS: dict[str, str] = {
    "a2c": "stable_baselines3:A2C",
    "dqn": "stable_baselines3:DQN",
    "maskable_ppo": "sb3_contrib:MaskablePPO",
    "ppo": "stable_baselines3:PPO",
}
#: The self-labeling dispatcher (:mod:`autofab.agents.policies.self_labeling`): a numpy
#: network that fits any JobShop-v0 instance size, stored as :data:`DISPATCHER_FILE`.
SELF_LABELING = "self_labeling"
DISPATCHER_FILE = "model.npz"
#: Every algorithm a run folder may hold.
ALGOS: tuple[str, ...] = (*sorted(SB3_ALGOS), SELF_LABELING)


def algo_class(algo: str) -> type[BaseAlgorithm]:
    """The SB3 class of an algorithm in :data:`SB3_ALGOS` (imported on first use)."""
    module, name = SB3_ALGOS[algo].split(":")
    cls: type[BaseAlgorithm] = getattr(importlib.import_module(module), name)
    return cls


_REQUIRED_FIELDS = ("schema_version", "algo", "env_id", "observation_space", "action_space")


class PolicyLoadError(ValueError):
    """A run folder cannot be loaded as a policy; the message names the file and why."""


def package_version() -> str:
    """The installed autofab version, recorded in ``policy.json`` for provenance."""
    try:
        return metadata.version("autofab")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- signatures


def _space_type(space: spaces.Space[Any]) -> str:
    """The Gymnasium class a space is, so ``MaskedDiscrete`` and ``Discrete`` match."""
    for cls in type(space).__mro__:
        if cls.__module__.startswith("gymnasium.spaces"):
            return cls.__name__
    return type(space).__name__


def _bound(value: float) -> float | str:
    """A JSON-safe bound: infinities as strings, since strict JSON has no ``Infinity``."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def space_signature(space: spaces.Space[Any]) -> dict[str, Any]:
    """A JSON-safe summary of ``space`` that two compatible spaces share.

    Type, shape and dtype always; ``n`` and ``start`` for ``Discrete``, ``nvec`` for
    ``MultiDiscrete``, and the min and max of the low and high bounds for ``Box`` (a summary,
    not every bound, so the file stays small for large observations).
    """
    sig: dict[str, Any] = {
        "type": _space_type(space),
        "shape": list(space.shape) if space.shape is not None else None,
        "dtype": str(space.dtype) if space.dtype is not None else None,
    }
    if isinstance(space, spaces.Discrete):
        sig["n"] = int(space.n)
        sig["start"] = int(space.start)
    elif isinstance(space, spaces.MultiDiscrete):
        sig["nvec"] = np.asarray(space.nvec).reshape(-1).astype(int).tolist()
    elif isinstance(space, spaces.MultiBinary):
        sig["n"] = np.asarray(space.n).reshape(-1).astype(int).tolist()
    elif isinstance(space, spaces.Box):
        low, high = np.asarray(space.low, float), np.asarray(space.high, float)
        sig["bounds"] = {
            "low_min": _bound(float(low.min())),
            "low_max": _bound(float(low.max())),
            "high_min": _bound(float(high.min())),
            "high_max": _bound(float(high.max())),
        }
    return sig


def _env_version(env_id: str) -> int | None:
    spec = gym.registry.get(env_id)
    return None if spec is None else spec.version


# --------------------------------------------------------------------------- policy.json


def write_policy_json(
    run_dir: str | Path,
    *,
    algo: str,
    env_id: str,
    env_kwargs: Mapping[str, Any],
    observation_space: spaces.Space[Any] | Mapping[str, Any],
    action_space: spaces.Space[Any] | Mapping[str, Any],
    command: Sequence[str],
    seed: int,
    total_timesteps: int,
    normalized: bool,
) -> Path:
    """Write ``policy.json`` into ``run_dir``; returns its path.

    Spaces are given as spaces or as ready signatures (a size-free dispatcher records
    :func:`dispatcher_spaces`). ``command`` is the training command line as a list of
    words, kept so a run can be reproduced; ``normalized`` says whether
    :data:`NORMALIZER_FILE` must be loaded too.
    """
    data = {
        "schema_version": SCHEMA_VERSION,
        "algo": algo,
        "env_id": env_id,
        "env_version": _env_version(env_id),
        "env_kwargs": dict(env_kwargs),
        "observation_space": _signature(observation_space),
        "action_space": _signature(action_space),
        "normalized": normalized,
        "seed": seed,
        "total_timesteps": total_timesteps,
        "command": list(command),
        "autofab_version": package_version(),
        "model_file": DISPATCHER_FILE if algo == SELF_LABELING else MODEL_FILE,
    }
    path = Path(run_dir) / POLICY_FILE
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def _signature(space: spaces.Space[Any] | Mapping[str, Any]) -> dict[str, Any]:
    return dict(space) if isinstance(space, Mapping) else space_signature(space)


def read_policy_json(run_dir: str | Path) -> dict[str, Any]:
    """``policy.json`` of ``run_dir``, checked for the fields the loader needs."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PolicyLoadError(f"run folder {str(folder)!r} does not exist or is not a folder")
    path = folder / POLICY_FILE
    if not path.is_file():
        raise PolicyLoadError(f"{str(path)!r} is missing; is {str(folder)!r} a training run?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyLoadError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyLoadError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    missing = [key for key in _REQUIRED_FIELDS if key not in data]
    if missing:
        raise PolicyLoadError(f"{str(path)!r} lacks field(s) {missing}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise PolicyLoadError(
            f"{str(path)!r} has schema_version {data['schema_version']!r}; this autofab "
            f"({package_version()}) reads version {SCHEMA_VERSION}"
        )
    if data["algo"] not in ALGOS:
        raise PolicyLoadError(f"{str(path)!r} names algo {data['algo']!r}; known: {sorted(ALGOS)}")
    return data


# --------------------------------------------------------------------------- the policy


@dataclass
class LoadedPolicy:
    """A trained model as a deterministic callable ``policy(obs, mask=None) -> action``.

    ``obs`` is one observation (not a batch). With ``mask`` (the env's ``action_masks()``),
    the action is always a valid one: ``MaskablePPO`` masks its distribution, and for
    PPO, A2C and DQN on a ``Discrete`` space the best *valid* action (by logit or Q-value)
    is taken. For other algorithms on ``MultiDiscrete`` spaces the mask is ignored. The
    normaliser, when the run used one, is applied to ``obs`` first.
    """

    model: BaseAlgorithm
    algo: str
    normalizer: VecNormalize | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self, obs: NDArray[Any], mask: NDArray[np.bool_] | None = None
    ) -> int | NDArray[np.int64]:
        x = np.asarray(obs, dtype=np.float32)
        if self.normalizer is not None:
            x = np.asarray(self.normalizer.normalize_obs(x), dtype=np.float32)
        from sb3_contrib import MaskablePPO

        space = self.model.action_space
        if isinstance(self.model, MaskablePPO):
            action, _ = self.model.predict(x, deterministic=True, action_masks=mask)
        elif mask is not None and isinstance(space, spaces.Discrete):
            return int(np.argmax(np.where(np.asarray(mask, bool), self._scores(x), -np.inf)))
        else:
            action, _ = self.model.predict(x, deterministic=True)
        if isinstance(space, spaces.Discrete):
            return int(np.asarray(action).reshape(()))
        return np.asarray(action, dtype=np.int64)

    def _scores(self, obs: NDArray[np.float32]) -> NDArray[np.float64]:
        """Per-action preference: Q-values (DQN) or logits (actor-critic)."""
        import torch as th
        from stable_baselines3 import DQN

        policy: Any = self.model.policy
        obs_t, _ = policy.obs_to_tensor(obs)
        with th.no_grad():
            if isinstance(self.model, DQN):
                scores = policy.q_net(obs_t)
            else:
                scores = policy.get_distribution(obs_t).distribution.logits
        return scores.cpu().numpy().reshape(-1).astype(np.float64)


def _check_space(
    which: str, recorded: Mapping[str, Any], space: spaces.Space[Any], source: str
) -> None:
    # A JSON round trip turns the found signature into the same types as the recorded one.
    found = json.loads(json.dumps(space_signature(space)))
    if dict(recorded) != found:
        diff = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
        raise PolicyLoadError(
            f"{which} space of {source} does not match policy.json "
            f"(differs in {', '.join(diff)}): expected {json.dumps(dict(recorded))}, "
            f"found {json.dumps(found)}"
        )


def _load_normalizer(path: Path) -> VecNormalize:
    """The saved ``VecNormalize`` without its venv: only its running statistics are used."""
    from stable_baselines3.common.vec_env import VecNormalize

    if not path.is_file():
        raise PolicyLoadError(f"{str(path)!r} is missing, but policy.json says the run used it")
    try:
        with path.open("rb") as fh:
            normalizer = pickle.load(fh)
    except Exception as exc:  # pickle raises many unrelated types on a corrupt file
        raise PolicyLoadError(f"{str(path)!r} is corrupt: {type(exc).__name__}: {exc}") from exc
    if not isinstance(normalizer, VecNormalize):
        raise PolicyLoadError(f"{str(path)!r} does not hold a VecNormalize")
    normalizer.training = False
    return normalizer


#: The name that stands for the dispatcher shipped with autofab (``--policy default``).
DEFAULT_POLICY_NAME = "default"


def resolve_policy_path(policy: str | Path) -> Path:
    """``default`` (the shipped dispatcher, unless a file of that name exists), or the path."""
    path = Path(policy)
    if str(policy) == DEFAULT_POLICY_NAME and not path.exists():
        return DEFAULT_DISPATCHER
    return path


@overload
def load_policy(run_dir: str | Path, env: gym.Env[Any, Any]) -> LoadedPolicy | DispatcherPolicy: ...


@overload
def load_policy(
    run_dir: str | Path, env: None = None
) -> LoadedPolicy | DispatcherPolicy | LearnedBidding: ...


def load_policy(
    run_dir: str | Path, env: gym.Env[Any, Any] | None = None
) -> LoadedPolicy | DispatcherPolicy | LearnedBidding:
    """Load a training run folder, a dispatcher ``.npz``, or ``default`` (the shipped
    dispatcher) as a callable policy, or a bidding ``.npz`` as a machine agent's
    :class:`~autofab.agents.policies.bidding_policy.LearnedBidding` (only without
    ``env``: a bidding policy does not act on an env, and is refused with one).

    With ``env``, its observation and action spaces must match the signatures recorded in
    ``policy.json``; otherwise the load is refused naming the space, expected and found.
    A self-labeling dispatcher fits any ``JobShop-v0`` size, so for it the env's
    observation *layout* is checked instead of its shape. Every failure (missing folder
    or file, corrupt JSON, zip, pickle or npz, wrong schema) is a :class:`PolicyLoadError`
    naming the file, never an exception from inside torch.
    """
    path = resolve_policy_path(run_dir)
    if path.suffix == ".npz":
        if is_bidding_file(path):
            return _load_bidding_file(path, env)
        return _load_dispatcher_file(path, env)
    meta = read_policy_json(path)
    if meta["algo"] == SELF_LABELING:
        trained_on = meta["observation_space"].get("layout")
        if not isinstance(trained_on, list):
            raise PolicyLoadError(
                f"{str(path / POLICY_FILE)!r}: observation_space has no layout list"
            )
        return _load_dispatcher_file(
            path / str(meta.get("model_file", DISPATCHER_FILE)), env, [str(n) for n in trained_on]
        )
    if env is not None:
        where = f"the env (policy {str(path)!r})"
        _check_space("observation", meta["observation_space"], env.observation_space, where)
        _check_space("action", meta["action_space"], env.action_space, where)
    model_path = path / str(meta.get("model_file", MODEL_FILE))
    if not model_path.is_file():
        raise PolicyLoadError(f"{str(model_path)!r} is missing")
    try:
        cls = algo_class(meta["algo"])
    except ImportError as exc:
        raise PolicyLoadError(
            f"{str(model_path)!r} is a {meta['algo']} model, which needs the [rl] extra "
            f"(pip install 'autofab[rl]'): {exc}"
        ) from None
    try:
        model = cls.load(model_path, device="cpu")
    except Exception as exc:  # zipfile, torch, pickle and json all raise their own types
        raise PolicyLoadError(
            f"{str(model_path)!r} cannot be loaded as a {meta['algo']} model: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    where = repr(str(model_path))
    _check_space("observation", meta["observation_space"], model.observation_space, where)
    _check_space("action", meta["action_space"], model.action_space, where)
    normalizer = _load_normalizer(path / NORMALIZER_FILE) if meta.get("normalized") else None
    return LoadedPolicy(model=model, algo=meta["algo"], normalizer=normalizer, meta=meta)


def dispatcher_spaces() -> tuple[dict[str, Any], dict[str, Any]]:
    """The size-free space signatures a self-labeling run records in ``policy.json``."""
    observation = {"type": "Box", "dtype": "float32", "layout": layout_names()}
    return observation, {"type": "Discrete", "n": "n_jobs"}


def _check_dispatcher_env(
    policy: DispatcherPolicy, trained_on: Sequence[str], env: gym.Env[Any, Any], where: str
) -> None:
    """A dispatcher needs a JobShop-v0 env that has every block it reads."""
    from autofab.envs.jobshop import JobShopEnv

    if not isinstance(env.unwrapped, JobShopEnv):
        raise PolicyLoadError(
            f"observation space of {where} does not fit: a self-labeling dispatcher acts on "
            f"autofab/JobShop-v0, found {type(env.unwrapped).__name__}"
        )
    try:
        check_layout(policy.blocks, trained_on, where)
    except DispatcherLoadError as exc:
        raise PolicyLoadError(f"observation space of {exc} (differs in layout)") from None


def _load_dispatcher_file(
    path: Path, env: gym.Env[Any, Any] | None, trained_on: Sequence[str] | None = None
) -> DispatcherPolicy:
    """The dispatcher in ``path``; with ``env``, checked against it. ``trained_on``: the
    layout a run's ``policy.json`` recorded (the file's own layout is checked on load)."""
    try:
        policy = load_dispatcher(path)
    except DispatcherLoadError as exc:
        raise PolicyLoadError(str(exc)) from None
    if env is not None:
        layout = layout_names() if trained_on is None else trained_on
        _check_dispatcher_env(policy, layout, env, repr(str(path)))
    return policy


def _load_bidding_file(path: Path, env: gym.Env[Any, Any] | None) -> LearnedBidding:
    if env is not None:
        raise PolicyLoadError(
            f"{str(path)!r} is a machine bidding policy: it bids on calls for proposals and "
            f"does not act on an env (expected no env, found {type(env.unwrapped).__name__})"
        )
    try:
        return read_bidding_file(path)
    except BiddingLoadError as exc:
        raise PolicyLoadError(str(exc)) from None
