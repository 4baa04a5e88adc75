"""Train SB3 policies on the autofab environments, rl-baselines3-zoo style.

Hyperparameters live in ``configs/train/<algo>.yml``, keyed by env id as in the zoo::

    autofab/JobShop-v0:
      n_envs: 4
      n_steps: 256
      learning_rate: 3.0e-4
      policy_kwargs:
        net_arch: [64, 64]
        activation_fn: tanh

and ``key:value`` overrides (the zoo's ``--hyperparams``) replace top-level keys. Nothing is
ever passed to ``eval``: values are read with ``yaml.safe_load``, ``activation_fn`` goes
through the :data:`ACTIVATIONS` whitelist, and every key and type is checked against the
algorithm's constructor, so a bad config names the key and what was expected.

:func:`train_one` runs one seed and writes its run folder
(``<log_folder>/<env>__<algo>__<seed>__<time>/``): ``config.yml``, ``model.zip``,
``vecnormalize.pkl`` if observations are normalised, ``evaluations.csv`` and
``policy.json`` (see :mod:`autofab.agents.policies.artifacts`). It takes and returns only
plain, picklable values, so a Ray task can call it as is.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import yaml
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize
from torch import nn

from autofab.agents.policies.artifacts import (
    ALGOS,
    DISPATCHER_FILE,
    MODEL_FILE,
    NORMALIZER_FILE,
    SELF_LABELING,
    LoadedPolicy,
    algo_class,
    dispatcher_spaces,
    write_policy_json,
)
from autofab.envs.plant import shipped_configs_dir

__all__ = [
    "ACTIVATIONS",
    "CONFIG_DIR",
    "EVALUATIONS_FILE",
    "EvaluationCallback",
    "TrainResult",
    "TrainSpec",
    "TrainingError",
    "ValidActionWrapper",
    "build_policy_kwargs",
    "check_hyperparams",
    "check_spec",
    "evaluate_policy",
    "load_hyperparams",
    "parse_env_kwargs",
    "parse_hyperparam_overrides",
    "run_folder_name",
    "spec_dict",
    "train_one",
]

#: The shipped hyperparameter files, one per algorithm.
CONFIG_DIR = shipped_configs_dir() / "train"
EVALUATIONS_FILE = "evaluations.csv"

#: ``policy_kwargs.activation_fn`` names -> torch classes; the only way a name becomes code.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

#: Keys of ``policy_kwargs`` that a config may set, and the check each value must pass.
_POLICY_KWARGS: dict[str, str] = {
    "net_arch": "a list of layer sizes, or a mapping of such lists (pi/vf or qf)",
    "activation_fn": f"one of {sorted(ACTIVATIONS)}",
    "ortho_init": "true or false",
    "share_features_extractor": "true or false",
    "log_std_init": "a number",
}

#: Keys the zoo's files carry that are not constructor arguments.
_RUN_KEYS: dict[str, str] = {
    "n_envs": "an integer >= 1",
    "n_timesteps": "an integer >= 1 (-n on the command line overrides it)",
    "normalize": "true or false (VecNormalize on observations and rewards)",
    "policy": "MlpPolicy",
}

#: Constructor arguments a config may not set: the trainer owns them.
_RESERVED = {
    "self",
    "env",
    "policy",
    "seed",
    "tensorboard_log",
    "verbose",
    "device",
    "_init_setup_model",
}


class TrainingError(ValueError):
    """Training cannot start: bad algo, env id, env kwargs or hyperparameters (one line)."""


# --------------------------------------------------------------------------- parsing


def parse_env_kwargs(text: str | None) -> dict[str, Any]:
    """``--env-kwargs`` JSON as a dict (``None`` or empty gives ``{}``)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingError(
            f"--env-kwargs is not valid JSON ({exc.msg} at char {exc.pos}): {text}"
        ) from exc
    if not isinstance(value, dict):
        raise TrainingError(
            f"--env-kwargs must be a JSON object, got {type(value).__name__}: {text}"
        )
    return value


def parse_hyperparam_overrides(items: Sequence[str]) -> dict[str, Any]:
    """The zoo's ``--hyperparams key:value ...`` as a dict, values read by ``yaml.safe_load``.

    So ``learning_rate:1e-3`` is a float, ``normalize:true`` a bool and
    ``policy_kwargs:{net_arch: [32, 32]}`` a mapping, while anything else stays a string
    (and is then refused by :func:`check_hyperparams` where a number is expected).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition(":")
        key = key.strip()
        if not sep or not key:
            raise TrainingError(f"--hyperparams item {item!r} must look like key:value")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise TrainingError(
                f"--hyperparams {key}: cannot read value {raw!r}: {problem}"
            ) from exc
    return out


def load_hyperparams(algo: str, env_id: str, conf_file: str | Path | None = None) -> dict[str, Any]:
    """The hyperparameters for ``env_id`` in ``conf_file`` (default: the shipped
    ``configs/train/<algo>.yml``), as a fresh dict."""
    path = Path(conf_file) if conf_file is not None else CONFIG_DIR / f"{algo}.yml"
    if not path.is_file():
        what = "--conf-file" if conf_file is not None else f"the hyperparameter file of {algo!r}"
        raise TrainingError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingError(f"cannot read {str(path)!r}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise TrainingError(f"{str(path)!r} must map env ids to hyperparameters")
    if env_id not in data:
        raise TrainingError(
            f"{str(path)!r} has no hyperparameters for {env_id!r}; it has {sorted(data)}"
        )
    params = data[env_id]
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise TrainingError(f"{str(path)!r}: {env_id!r} must map to hyperparameters")
    return dict(params)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _as_number(value: Any) -> Any:
    """``value``, or the number a string spells: YAML 1.1 reads ``1e-3`` (no dot) as a
    string, and zoo configs write learning rates that way. ``float()`` parses, never runs."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_net_arch(value: Any) -> bool:
    def layers(v: Any) -> bool:
        return isinstance(v, list) and all(_is_int(x) and x > 0 for x in v)

    if isinstance(value, dict):
        return bool(value) and set(value) <= {"pi", "vf", "qf"} and all(map(layers, value.values()))
    return layers(value)


def build_policy_kwargs(raw: Any) -> dict[str, Any]:
    """``policy_kwargs`` from a config mapping, with ``activation_fn`` a torch class."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TrainingError(f"hyperparameter 'policy_kwargs' must be a mapping, got {raw!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _POLICY_KWARGS:
            raise TrainingError(
                f"unknown policy_kwargs key {key!r}; known: {sorted(_POLICY_KWARGS)}"
            )
        ok = {
            "net_arch": _check_net_arch,
            "activation_fn": lambda v: isinstance(v, str) and v.lower() in ACTIVATIONS,
            "ortho_init": lambda v: isinstance(v, bool),
            "share_features_extractor": lambda v: isinstance(v, bool),
            "log_std_init": _is_number,
        }[key](value)
        if not ok:
            raise TrainingError(
                f"policy_kwargs {key!r} must be {_POLICY_KWARGS[key]}, got {value!r}"
            )
        out[key] = ACTIVATIONS[value.lower()] if key == "activation_fn" else value
    return out


def check_hyperparams(
    algo: str, params: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``params`` into run settings and constructor kwargs, checking every key.

    A key must be a run key (:data:`_RUN_KEYS`) or an argument of the algorithm's
    constructor; a value must have the type of that argument's default (a number where
    the default is a number, a bool where it is a bool). Returns ``(run, algo_kwargs)``
    with ``policy_kwargs`` built by :func:`build_policy_kwargs`.
    """
    cls = algo_class(algo)
    signature = inspect.signature(cls.__init__).parameters
    allowed = {
        name: p
        for name, p in signature.items()
        if name not in _RESERVED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    run: dict[str, Any] = {"n_envs": 1, "normalize": False, "policy": "MlpPolicy"}
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key in _RUN_KEYS:
            run[key] = value
            continue
        if key not in allowed:
            raise TrainingError(
                f"unknown hyperparameter {key!r} for {algo}; known: "
                f"{sorted(set(allowed) | set(_RUN_KEYS))}"
            )
        default = allowed[key].default
        if key == "policy_kwargs":
            kwargs[key] = build_policy_kwargs(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise TrainingError(f"hyperparameter {key!r} must be true or false, got {value!r}")
            kwargs[key] = value
        elif isinstance(default, int | float):
            value = _as_number(value)
            if not _is_number(value):
                raise TrainingError(f"hyperparameter {key!r} must be a number, got {value!r}")
            if isinstance(default, int):
                if not float(value).is_integer():
                    raise TrainingError(f"hyperparameter {key!r} must be an integer, got {value!r}")
                value = int(value)
            if key in _COUNTS and value < 1:
                raise TrainingError(f"hyperparameter {key!r} must be >= 1, got {value!r}")
            if value < 0 and key not in _MAY_BE_NEGATIVE:
                raise TrainingError(f"hyperparameter {key!r} must be >= 0, got {value!r}")
            kwargs[key] = value
        elif default is None and _is_number(value):
            kwargs[key] = value
        else:
            # Schedules, classes and tuples are not settable from a config: a string there
            # would be read as code or as a class name by some library.
            raise TrainingError(
                f"hyperparameter {key!r} cannot be set from a config (got {value!r})"
            )
    if not _is_int(run["n_envs"]) or run["n_envs"] < 1:
        raise TrainingError(
            f"hyperparameter 'n_envs' must be {_RUN_KEYS['n_envs']}, got {run['n_envs']!r}"
        )
    if not isinstance(run["normalize"], bool):
        raise TrainingError(
            f"hyperparameter 'normalize' must be true or false, got {run['normalize']!r}"
        )
    if run["policy"] != "MlpPolicy":
        raise TrainingError(f"hyperparameter 'policy' must be 'MlpPolicy', got {run['policy']!r}")
    if "n_timesteps" in run and (not _is_int(run["n_timesteps"]) or run["n_timesteps"] < 1):
        raise TrainingError(
            f"hyperparameter 'n_timesteps' must be {_RUN_KEYS['n_timesteps']}, "
            f"got {run['n_timesteps']!r}"
        )
    return run, kwargs


# --------------------------------------------------------------------------- the run


@dataclass
class TrainSpec:
    """Everything one training run needs, as plain values (picklable for a Ray task).

    ``n_timesteps`` None takes ``n_timesteps`` from the config. ``eval_freq`` counts
    environment steps over all sub-envs; 0 or less evaluates only once, at the end.
    ``command`` is the command line as words, recorded in ``policy.json``; ``conf_file``
    replaces the shipped ``configs/train/<algo>.yml``.
    """

    algo: str
    env_id: str
    seed: int = 0
    n_timesteps: int | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    hyperparams: dict[str, Any] = field(default_factory=dict)
    eval_freq: int = 10_000
    eval_episodes: int = 5
    log_folder: str = "runs"
    command: list[str] = field(default_factory=list)
    conf_file: str | None = None
    verbose: int = 0


@dataclass
class TrainResult:
    """What :func:`train_one` leaves: the run folder and the last evaluation."""

    run_dir: str
    seed: int
    timesteps: int
    mean_return: float
    mean_makespan: float | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """A checked :class:`TrainSpec`: the settings the run will use, nothing left to fail."""

    params: dict[str, Any]
    run: dict[str, Any]
    algo_kwargs: dict[str, Any]
    n_timesteps: int
    wrap_invalid: bool


class ValidActionWrapper(gym.Wrapper[Any, Any, Any, Any]):
    """Replaces an action the env's mask forbids with the first valid one.

    For algorithms without action masking (PPO, A2C, DQN) on a ``Discrete`` env that
    raises on invalid actions, such as ``JobShop-v0``: training would otherwise stop at
    the first invalid pick. The count goes to ``info["invalid_actions"]`` at episode end.
    Deployment needs no wrapper: :class:`~autofab.agents.policies.artifacts.LoadedPolicy`
    takes the best valid action when given the mask.
    """

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self._invalid = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._invalid = 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        mask = np.asarray(self.env.get_wrapper_attr("action_masks")(), dtype=bool)
        chosen = int(np.asarray(action).reshape(()))
        if not (0 <= chosen < len(mask) and mask[chosen]):
            self._invalid += 1
            chosen = int(np.flatnonzero(mask)[0])
        obs, reward, terminated, truncated, info = self.env.step(chosen)
        if terminated or truncated:
            info = {**info, "invalid_actions": self._invalid}
        return obs, reward, terminated, truncated, info


def run_folder_name(env_id: str, algo: str, seed: int, when: float | None = None) -> str:
    """``<env>__<algo>__<seed>__<unix time>`` (CleanRL's naming), env id made folder-safe."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", env_id).strip("-")
    return f"{slug}__{algo}__{seed}__{int(time.time() if when is None else when)}"


def _has_masks(env: gym.Env[Any, Any]) -> bool:
    try:
        return callable(env.get_wrapper_attr("action_masks"))
    except AttributeError:
        return False


#: Hyperparameters that count something: at least 1 (SB3 crashes deep inside otherwise).
_COUNTS = frozenset(
    {"n_steps", "batch_size", "n_epochs", "buffer_size", "train_freq", "target_update_interval"}
)
#: Numbers SB3 documents with a meaningful negative value (-1: as many steps as collected).
_MAY_BE_NEGATIVE = frozenset({"gradient_steps"})


def check_spec(spec: TrainSpec) -> _Plan:
    """Check ``spec`` end to end (algo, env id, kwargs, hyperparameters, spaces)."""
    if spec.algo not in ALGOS:
        raise TrainingError(f"unknown algo {spec.algo!r}; choose one of {sorted(ALGOS)}")
    if spec.env_id not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("autofab/"))
        raise TrainingError(f"unknown env id {spec.env_id!r}; autofab has {known}")
    if spec.algo == SELF_LABELING:
        return _check_self_labeling(spec)
    try:
        probe = gym.make(spec.env_id, **spec.env_kwargs)
    except (TypeError, ValueError, gym.error.Error) as exc:
        raise TrainingError(
            f"cannot make {spec.env_id} with --env-kwargs {json.dumps(spec.env_kwargs)}: {exc}"
        ) from exc
    try:
        masked = _has_masks(probe)
        action_space = probe.action_space
    finally:
        probe.close()
    if spec.algo == "dqn" and not isinstance(action_space, spaces.Discrete):
        raise TrainingError(
            f"dqn needs a Discrete action space; {spec.env_id} has {action_space}"
            " (use ppo, a2c or maskable_ppo)"
        )
    if spec.algo == "maskable_ppo" and not masked:
        raise TrainingError(
            f"maskable_ppo needs an env with action_masks(); {spec.env_id} has none (use ppo)"
        )
    params = load_hyperparams(spec.algo, spec.env_id, spec.conf_file)
    params.update(spec.hyperparams)
    run, algo_kwargs = check_hyperparams(spec.algo, params)
    n_timesteps = spec.n_timesteps if spec.n_timesteps is not None else run.get("n_timesteps")
    if not _is_int(n_timesteps) or n_timesteps < 1:
        raise TrainingError(
            f"number of timesteps must be an integer >= 1 (-n or n_timesteps), got {n_timesteps!r}"
        )
    if not _is_int(spec.eval_episodes) or spec.eval_episodes < 1:
        raise TrainingError(f"eval episodes must be >= 1, got {spec.eval_episodes!r}")
    wrap = masked and spec.algo != "maskable_ppo" and isinstance(action_space, spaces.Discrete)
    params["n_timesteps"] = int(n_timesteps)
    return _Plan(params, run, algo_kwargs, int(n_timesteps), wrap)


def _check_self_labeling(spec: TrainSpec) -> _Plan:
    """Settings for a self-labeling run: JobShop-v0 only, sizes from the config or kwargs."""
    from autofab.agents.policies import self_labeling

    if spec.env_id != self_labeling.ENV_ID:
        raise TrainingError(
            f"self_labeling trains the job-shop dispatcher: --env must be "
            f"{self_labeling.ENV_ID}, got {spec.env_id!r}"
        )
    params = load_hyperparams(spec.algo, spec.env_id, spec.conf_file)
    params.update(spec.hyperparams)
    params = {key: _as_number(value) for key, value in params.items()}
    if spec.n_timesteps is not None:
        params["n_timesteps"] = spec.n_timesteps
    try:
        settings = self_labeling.check_hyperparams(params)
        settings["sizes"] = self_labeling.sizes_from_env_kwargs(
            spec.env_kwargs, settings.get("sizes", [list(s) for s in self_labeling.DEFAULT_SIZES])
        )
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    # A bad init, or one that does not fit the network asked for, fails here, before any
    # folder exists: loading it into that network is the check training itself makes.
    init = _init_dispatcher(settings.get("init"))
    if init is not None:
        try:
            self_labeling.check_init(init, settings.get("hidden", 64), settings.get("features"))
        except ValueError as exc:
            raise TrainingError(f"self_labeling init {settings['init']!r}: {exc}") from None
    n_timesteps = settings.pop("n_timesteps", None)
    if n_timesteps is None:
        raise TrainingError("number of timesteps must be given (-n or n_timesteps)")
    params["n_timesteps"] = n_timesteps
    return _Plan(params, {}, settings, int(n_timesteps), wrap_invalid=False)


# --------------------------------------------------------------------------- evaluation


def evaluate_policy(
    policy: Callable[..., Any], env: gym.Env[Any, Any], seeds: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Returns and makespans of one deterministic episode per seed (masked when the env
    has ``action_masks``). Makespans come from ``info["makespan"]`` (JobShop-v0, time
    units of the instance) or ``info["kpis"]["makespan_s"]`` (Factory-v0, seconds) at
    the episode's end, when present."""
    masked = _has_masks(env)
    returns: list[float] = []
    makespans: list[float] = []
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            mask = env.get_wrapper_attr("action_masks")() if masked else None
            obs, reward, terminated, truncated, info = env.step(policy(obs, mask))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        makespan = info.get("makespan", info.get("kpis", {}).get("makespan_s"))
        if _is_number(makespan):
            makespans.append(float(makespan))
    return returns, makespans


class EvaluationCallback(BaseCallback):
    """Every ``eval_freq`` steps, evaluate on a separate env and append a row to a CSV.

    The policy acts through :class:`LoadedPolicy`, as it will when deployed (masked,
    deterministic, normalised with the training statistics). The rows (``timesteps,
    mean_return, std_return, mean_makespan``) also go to the logger as ``eval/*``.
    """

    COLUMNS = ("timesteps", "mean_return", "std_return", "mean_makespan")

    def __init__(
        self,
        env: gym.Env[Any, Any],
        algo: str,
        path: Path,
        eval_freq: int,
        seeds: Sequence[int],
        normalizer: VecNormalize | None = None,
        final_timesteps: int | None = None,
    ) -> None:
        super().__init__()
        self.final_timesteps = final_timesteps
        self.eval_env = env
        self.algo = algo
        self.path = path
        self.eval_freq = eval_freq
        self.seeds = list(seeds)
        self.normalizer = normalizer
        self.last_row: dict[str, Any] = {}
        self._last_eval = 0
        with path.open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(self.COLUMNS)

    def _on_step(self) -> bool:
        # The last evaluation runs after learn(): an on-policy model still updates once
        # after its last step, and the final row should describe the saved model.
        if self.final_timesteps is not None and self.num_timesteps >= self.final_timesteps:
            return True
        if self.eval_freq > 0 and self.num_timesteps - self._last_eval >= self.eval_freq:
            self.evaluate()
        return True

    def evaluate(self) -> dict[str, Any]:
        """Run the evaluation now and record it (also called once after training)."""
        self._last_eval = self.num_timesteps
        policy = LoadedPolicy(self.model, self.algo, self.normalizer)
        returns, makespans = evaluate_policy(policy, self.eval_env, self.seeds)
        row: dict[str, Any] = {
            "timesteps": self.num_timesteps,
            "mean_return": float(np.mean(returns)),
            "std_return": float(np.std(returns)),
            "mean_makespan": float(np.mean(makespans)) if makespans else None,
        }
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(["" if row[c] is None else row[c] for c in self.COLUMNS])
        self.logger.record("eval/mean_return", row["mean_return"])
        if row["mean_makespan"] is not None:
            self.logger.record("eval/mean_makespan", row["mean_makespan"])
        self.last_row = row
        return row


# --------------------------------------------------------------------------- train_one


def _env_factory(spec: TrainSpec, wrap_invalid: bool) -> Callable[[], gym.Env[Any, Any]]:
    """One monitored sub-env. Not SB3's ``make_vec_env``: it forces
    ``render_mode="rgb_array"``, which the autofab envs (ansi only) refuse."""

    def make() -> gym.Env[Any, Any]:
        env = gym.make(spec.env_id, **spec.env_kwargs)
        if wrap_invalid:
            env = ValidActionWrapper(env)
        return Monitor(env)

    return make


def _make_venv(spec: TrainSpec, plan: _Plan) -> VecEnv:
    """``n_envs`` sub-envs in one process (the model's ``seed`` seeds them in turn)."""
    venv: VecEnv = DummyVecEnv([_env_factory(spec, plan.wrap_invalid)] * plan.run["n_envs"])
    if plan.run["normalize"]:
        venv = VecNormalize(venv, gamma=float(plan.algo_kwargs.get("gamma", 0.99)))
    return venv


def _new_run_dir(spec: TrainSpec, plan: _Plan) -> Path:
    """Create the run folder (a fresh name) and write its ``config.yml``."""
    root = Path(spec.log_folder)
    run_dir = root / run_folder_name(spec.env_id, spec.algo, spec.seed)
    suffix = 0
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{run_folder_name(spec.env_id, spec.algo, spec.seed)}-{suffix}"
    run_dir.mkdir(parents=True)
    config = {
        "algo": spec.algo,
        "env_id": spec.env_id,
        "env_kwargs": spec.env_kwargs,
        "seed": spec.seed,
        "n_timesteps": plan.n_timesteps,
        "eval_freq": spec.eval_freq,
        "eval_episodes": spec.eval_episodes,
        "hyperparams": plan.params,
        "command": spec.command,
    }
    (run_dir / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return run_dir


def _tensorboard_dir(run_dir: Path, warnings: list[str]) -> str | None:
    if importlib.util.find_spec("tensorboard") is None:
        warnings.append(
            "tensorboard is not installed: no TensorBoard logs (pip install tensorboard)"
        )
        return None
    return str(run_dir / "tb")


def train_one(
    spec: TrainSpec,
    callbacks: Sequence[BaseCallback] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train one seed and write its run folder under ``spec.log_folder``.

    Every check runs before the folder is created, so bad input leaves nothing behind
    and raises :class:`TrainingError`. ``callbacks`` (a progress bar, say) are added to
    the evaluation callback of SB3 runs; a Ray task passes none. Self-labeling runs call
    ``on_progress(env_steps_done, env_steps_total)`` instead.
    """
    plan = check_spec(spec)
    run_dir = _new_run_dir(spec, plan)
    if spec.algo == SELF_LABELING:
        return _train_self_labeling(spec, plan, run_dir, on_progress)
    warnings: list[str] = []

    tensorboard_log = _tensorboard_dir(run_dir, warnings)
    venv = _make_venv(spec, plan)
    eval_env = gym.make(spec.env_id, **spec.env_kwargs)
    try:
        cls = algo_class(spec.algo)
        try:
            model = cls(
                plan.run["policy"],
                venv,
                seed=spec.seed,
                verbose=spec.verbose,
                tensorboard_log=tensorboard_log,
                device="cpu",
                **plan.algo_kwargs,
            )
        except (TypeError, ValueError, AssertionError) as exc:
            raise TrainingError(f"{spec.algo} rejected the hyperparameters: {exc}") from exc
        normalizer = venv if isinstance(venv, VecNormalize) else None
        seeds = [spec.seed + 10_000 + i for i in range(spec.eval_episodes)]
        evaluation = EvaluationCallback(
            eval_env,
            spec.algo,
            run_dir / EVALUATIONS_FILE,
            spec.eval_freq,
            seeds,
            normalizer,
            final_timesteps=plan.n_timesteps,
        )
        model.learn(plan.n_timesteps, callback=[evaluation, *callbacks], tb_log_name="tb")
        evaluation.evaluate()
        model.save(run_dir / MODEL_FILE)
        if normalizer is not None:
            normalizer.save(str(run_dir / NORMALIZER_FILE))
        write_policy_json(
            run_dir,
            algo=spec.algo,
            env_id=spec.env_id,
            env_kwargs=spec.env_kwargs,
            observation_space=eval_env.observation_space,
            action_space=eval_env.action_space,
            command=spec.command,
            seed=spec.seed,
            total_timesteps=int(model.num_timesteps),
            normalized=normalizer is not None,
        )
    finally:
        venv.close()
        eval_env.close()
    row = evaluation.last_row
    return TrainResult(
        run_dir=str(run_dir),
        seed=spec.seed,
        timesteps=int(model.num_timesteps),
        mean_return=float(row["mean_return"] or 0.0),
        mean_makespan=row["mean_makespan"],
        warnings=warnings,
    )


#: Columns of a self-labeling run's ``evaluations.csv``: one row per validation.
SELF_LABELING_COLUMNS = ("timesteps", "iteration", "validation", "best_validation")


def _train_self_labeling(
    spec: TrainSpec, plan: _Plan, run_dir: Path, on_progress: Callable[[int, int], None] | None
) -> TrainResult:
    """A self-labeling run: ``model.npz`` and the same ``policy.json`` contract as SB3's.

    ``evaluations.csv`` records the validation score (mean greedy makespan over the lower
    bound, on fixed random instances) each time it is measured; TensorBoard gets it too,
    with the loss and the sampled makespans.
    """
    from autofab.agents.policies import self_labeling
    from autofab.agents.policies.dispatcher import save_dispatcher

    warnings: list[str] = []
    settings = dict(plan.algo_kwargs)
    tb_dir = _tensorboard_dir(run_dir, warnings)
    writer: Any = None
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tb_dir)
    csv_path = run_dir / EVALUATIONS_FILE
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(SELF_LABELING_COLUMNS)

    def on_iteration(stats: self_labeling.TrainStats) -> None:
        if on_progress is not None:
            on_progress(min(stats.env_steps, plan.n_timesteps), plan.n_timesteps)
        if writer is not None:
            writer.add_scalar("train/loss", stats.loss, stats.env_steps)
            writer.add_scalar("train/best_sample_over_lb", stats.best_makespan, stats.env_steps)
            writer.add_scalar("train/mean_sample_over_lb", stats.mean_makespan, stats.env_steps)
        if stats.validation is not None:
            row = [stats.env_steps, stats.iteration + 1, stats.validation, stats.best_validation]
            with csv_path.open("a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(row)
            if writer is not None:
                writer.add_scalar("eval/validation_over_lb", stats.validation, stats.env_steps)

    def on_best(best: Any) -> None:
        # A checkpoint in the run's own file name: a stopped or failed run keeps its best
        # weights. The finished run overwrites it with the full provenance.
        save_dispatcher(best, run_dir / DISPATCHER_FILE, {"command": list(spec.command)})

    try:
        policy = self_labeling.train_self_labeling(
            iterations=2**62,
            samples=settings.get("samples", 64),
            batch=settings.get("batch", 4),
            sizes=[(int(j), int(m)) for j, m in settings["sizes"]],
            hidden=settings.get("hidden", 64),
            lr=settings.get("learning_rate", 5e-4),
            lr_final=settings.get("learning_rate_final"),
            loss_over=settings.get("loss_over", "machine"),
            features=settings.get("features"),
            delay=settings.get("delay"),
            imitation_instances=settings.get("imitation_instances", 20),
            validation_instances_per_size=settings.get("validation_instances_per_size", 8),
            validate_every=settings.get("validate_every", 25),
            seed=spec.seed,
            max_seconds=settings.get("max_seconds"),
            max_env_steps=plan.n_timesteps,
            init=_init_dispatcher(settings.get("init")),
            on_iteration=on_iteration,
            on_best=on_best,
        )
    finally:
        if writer is not None:
            writer.close()
    policy.meta["command"] = list(spec.command)
    save_dispatcher(policy, run_dir / DISPATCHER_FILE)
    observation, action = dispatcher_spaces()
    steps = int(policy.meta["env_steps"])
    write_policy_json(
        run_dir,
        algo=SELF_LABELING,
        env_id=spec.env_id,
        env_kwargs=spec.env_kwargs,
        observation_space=observation,
        action_space=action,
        command=spec.command,
        seed=spec.seed,
        total_timesteps=steps,
        normalized=False,
    )
    jobs, machines = settings["sizes"][-1]
    eval_env = gym.make(spec.env_id, instance={"jobs": jobs, "machines": machines})
    try:
        seeds = [spec.seed + 10_000 + i for i in range(spec.eval_episodes)]
        returns, makespans = evaluate_policy(policy, eval_env, seeds)
    finally:
        eval_env.close()
    return TrainResult(
        run_dir=str(run_dir),
        seed=spec.seed,
        timesteps=steps,
        mean_return=float(np.mean(returns)),
        mean_makespan=float(np.mean(makespans)) if makespans else None,
        warnings=warnings,
    )


def _init_dispatcher(source: str | None) -> Any:
    """The ``init`` hyperparameter: a dispatcher to fine-tune, through the one loader."""
    if source is None:
        return None
    from autofab.agents.policies.artifacts import (
        PolicyLoadError,
        load_policy,
        resolve_policy_path,
    )
    from autofab.agents.policies.dispatcher import DispatcherPolicy

    path = resolve_policy_path(source)
    try:
        policy = load_policy(path)
    except PolicyLoadError as exc:
        raise TrainingError(f"self_labeling init: {exc}") from None
    if not isinstance(policy, DispatcherPolicy):
        raise TrainingError(f"self_labeling init {source!r} is not a dispatcher")
    policy.meta["source"] = str(path)
    return policy


def spec_dict(spec: TrainSpec) -> dict[str, Any]:
    """``spec`` as a plain dict (for logs and for sending to a Ray task)."""
    return asdict(spec)
