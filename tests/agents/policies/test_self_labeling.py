"""The learned dispatcher: features, a tiny self-labeling run, its file, and its loading."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import yaml

import autofab.envs  # noqa: F401  (registers the env ids)
from autofab.agents.policies import self_labeling
from autofab.agents.policies.artifacts import PolicyLoadError, load_policy
from autofab.agents.policies.dispatcher import (
    DEFAULT_DISPATCHER,
    N_FEATURES,
    DispatcherLoadError,
    DispatcherPolicy,
    job_features,
    load_dispatcher,
    rollout,
    sampling_picker,
    save_dispatcher,
)
from autofab.agents.policies.evaluation import evaluate
from autofab.agents.policies.training import CONFIG_DIR, TrainingError, TrainSpec, train_one
from autofab.envs.instances import random_instance
from autofab.envs.jobshop import OBSERVATION_LAYOUT, JobShopEnv, observation_blocks


def _tiny_training(**changes: Any) -> DispatcherPolicy:
    """Seconds of self-labeling on tiny instances, validating every iteration."""
    settings: dict[str, Any] = {
        "iterations": 2,
        "samples": 3,
        "batch": 2,
        "sizes": [(4, 3)],
        "imitation_instances": 1,
        "validation_instances_per_size": 1,
        "validate_every": 1,
        "seed": 0,
    }
    return self_labeling.train_self_labeling(**{**settings, **changes})


@pytest.fixture(scope="module")
def policy() -> DispatcherPolicy:
    return _tiny_training()


def test_features_are_each_jobs_blocks_beside_pooled_context() -> None:
    env = JobShopEnv({"jobs": 5, "machines": 3})
    obs, _ = env.reset(seed=1)
    feats = job_features(obs, 5)
    assert feats.shape == (5, N_FEATURES)
    blocks = observation_blocks(obs, 5, 3)
    np.testing.assert_array_equal(feats[:, 1], blocks["job_work_left"])
    can_start = [n for n, kind in OBSERVATION_LAYOUT if kind == "job"].index("job_can_start")
    np.testing.assert_array_equal(feats[:, can_start], env.action_masks().astype(np.float32))
    own = 6  # the basic features' own job blocks come first, then their means
    np.testing.assert_allclose(feats[:, own + 1], blocks["job_work_left"].mean())
    assert job_features(np.stack([obs, obs]), 5).shape == (2, 5, N_FEATURES)


@pytest.mark.parametrize("instance", ["ft06", {"jobs": 7, "machines": 4}, "la21"])
def test_actions_are_valid_on_any_size(policy: DispatcherPolicy, instance: object) -> None:
    env = JobShopEnv(instance)  # type: ignore[arg-type]
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        mask = env.action_masks()
        action = policy(obs, mask)
        assert mask[action]
        obs, _, done, _, _ = env.step(action)


def test_training_records_what_it_did(policy: DispatcherPolicy) -> None:
    meta = policy.meta
    assert meta["algo"] == "self_labeling"
    assert meta["iterations"] == 2
    # Two iterations of two 4x3 instances, three samples each.
    assert meta["env_steps"] == 2 * 2 * 3 * 12
    assert meta["validation_makespan_over_lb"] >= 1.0


def test_validation_keeps_the_best_weights() -> None:
    """With validation on, the returned weights score best of everything it measured."""
    seen: list[float] = []
    trained = _tiny_training(
        iterations=4,
        batch=1,
        sizes=[(5, 4)],
        imitation_instances=0,
        on_iteration=lambda s: seen.append(s.validation) if s.validation else None,
    )
    again = self_labeling.validation_score(trained, self_labeling.validation_instances(1))
    assert again == pytest.approx(trained.meta["validation_makespan_over_lb"], abs=1e-4)
    assert again <= min(seen) + 1e-4


def test_save_and_load_round_trip(policy: DispatcherPolicy, tmp_path: Path) -> None:
    path = save_dispatcher(policy, tmp_path / "d.npz")
    again = load_dispatcher(path)
    env = JobShopEnv("ft06")
    obs, _ = env.reset(seed=0)
    feats = job_features(obs, 6)
    np.testing.assert_allclose(again.scores(feats), policy.scores(feats))
    assert again.meta["env_steps"] == policy.meta["env_steps"]


def test_bad_files_are_refused_by_name(policy: DispatcherPolicy, tmp_path: Path) -> None:
    with pytest.raises(DispatcherLoadError, match="does not exist"):
        load_dispatcher(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(DispatcherLoadError, match="not a readable dispatcher"):
        load_dispatcher(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, w0=np.zeros((2, 2)))
    with pytest.raises(DispatcherLoadError, match="found format None"):
        load_dispatcher(other)
    path = save_dispatcher(policy, tmp_path / "d.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["layout"] = np.asarray([name for name in arrays["layout"] if name != "time"])
    np.savez(tmp_path / "old_layout.npz", **arrays)
    with pytest.raises(DispatcherLoadError, match=r"reads observation block\(s\) \['time'\]"):
        load_dispatcher(tmp_path / "old_layout.npz")
    arrays = dict(np.load(path))
    arrays["w0"] = np.full_like(arrays["w0"], np.nan)
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(DispatcherLoadError, match="non-finite"):
        load_dispatcher(tmp_path / "nan.npz")
    arrays = dict(np.load(path))
    arrays["w0"] = arrays["w0"][:5]
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(DispatcherLoadError, match=f"maps {N_FEATURES} features"):
        load_dispatcher(tmp_path / "shape.npz")


def test_the_one_loader_takes_npz_files_and_refuses_other_envs(
    policy: DispatcherPolicy, tmp_path: Path
) -> None:
    path = save_dispatcher(policy, tmp_path / "d.npz")
    env = JobShopEnv("ft06")
    assert isinstance(load_policy(path, env), DispatcherPolicy)
    factory = gym.make("autofab/Factory-v0")
    with pytest.raises(PolicyLoadError, match="acts on autofab/JobShop-v0, found FactoryEnv"):
        load_policy(path, factory)
    with pytest.raises(PolicyLoadError, match="does not exist"):
        load_policy(tmp_path / "nope.npz", env)


def test_evaluate_runs_it_as_a_policy(policy: DispatcherPolicy) -> None:
    doc = evaluate(["ft06"], [], 1.0, policy=policy)
    assert doc["instances"]["ft06"]["methods"]["policy"]["makespan"] >= 55


def test_bad_arguments_name_the_fault() -> None:
    with pytest.raises(ValueError, match="samples=0"):
        self_labeling.train_self_labeling(iterations=1, samples=0)
    with pytest.raises(ValueError, match=r"lr=-1.*sizes=\[\]"):
        self_labeling.train_self_labeling(iterations=1, lr=-1, sizes=[])


# --------------------------------------------------------------------------- autofab train


def _spec(tmp_path: Path, **changes: object) -> TrainSpec:
    base: dict[str, object] = {
        "algo": "self_labeling",
        "env_id": "autofab/JobShop-v0",
        "n_timesteps": 200,
        "env_kwargs": {"instance": {"jobs": 4, "machines": 3}},
        "hyperparams": {
            "samples": 4,
            "batch": 1,
            "imitation_instances": 1,
            "validation_instances_per_size": 1,
            "validate_every": 2,
        },
        "eval_episodes": 1,
        "log_folder": str(tmp_path / "runs"),
        "command": ["autofab", "train", "--algo", "self_labeling"],
    }
    base.update(changes)
    return TrainSpec(**base)  # type: ignore[arg-type]


def test_a_self_labeling_run_leaves_a_loadable_run_folder(tmp_path: Path) -> None:
    moves: list[tuple[int, int]] = []
    result = train_one(_spec(tmp_path), on_progress=lambda done, total: moves.append((done, total)))
    run = Path(result.run_dir)
    assert run.name.startswith("autofab-JobShop-v0__self_labeling__0__")
    assert {"config.yml", "model.npz", "policy.json", "evaluations.csv"} <= {
        p.name for p in run.iterdir()
    }
    meta = json.loads((run / "policy.json").read_text())
    assert meta["algo"] == "self_labeling"
    assert meta["observation_space"]["layout"][0] == "job_next_op_time"
    assert meta["command"] == ["autofab", "train", "--algo", "self_labeling"]
    assert result.timesteps >= 200
    assert moves[-1] == (200, 200)
    rows = (run / "evaluations.csv").read_text().splitlines()
    assert rows[0] == "timesteps,iteration,validation,best_validation"
    assert len(rows) >= 2
    assert result.mean_makespan is not None
    loaded = load_policy(run, JobShopEnv("ta01"))  # any size
    assert isinstance(loaded, DispatcherPolicy)
    with pytest.raises(PolicyLoadError, match="acts on autofab/JobShop-v0"):
        load_policy(run, gym.make("autofab/Factory-v0"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"env_kwargs": {"instance": "ta01"}}, "fresh random instances"),
        ({"env_id": "autofab/Factory-v0"}, "--env must be autofab/JobShop-v0"),
        ({"hyperparams": {"samples": 0}}, "samples=0: must be an integer >= 1"),
        ({"hyperparams": {"gamma": 0.9}}, "no hyperparameter(s) ['gamma']"),
        ({"hyperparams": {"sizes": [[3]]}}, "list of [jobs, machines] pairs"),
        ({"hyperparams": {"init": "nope.npz"}}, "self_labeling init: 'nope.npz' does not exist"),
    ],
)
def test_bad_self_labeling_input_is_refused_before_a_folder_exists(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(TrainingError, match=re.escape(message)):
        train_one(_spec(tmp_path, **changes))
    assert not (tmp_path / "runs").exists()


def test_fine_tuning_starts_from_the_given_weights(tmp_path: Path) -> None:
    shipped = load_policy(DEFAULT_DISPATCHER)
    assert isinstance(shipped, DispatcherPolicy)
    same = self_labeling.train_self_labeling(
        iterations=0, init=shipped, validation_instances_per_size=0
    )
    for (w, b), (w2, b2) in zip(shipped.layers, same.layers, strict=True):
        np.testing.assert_allclose(w, w2, rtol=1e-6)
        np.testing.assert_allclose(b, b2, rtol=1e-6)
    with pytest.raises(ValueError, match="init weights have layers"):
        self_labeling.train_self_labeling(iterations=0, init=shipped, hidden=8)
    for bad, why in (({"features": "basic"}, "reads 'basic'"), ({"hidden": 8}, "layers")):
        with pytest.raises(TrainingError, match=why):
            train_one(_spec(tmp_path / "bad", hyperparams={"init": "default", **bad}))
        assert not (tmp_path / "bad").exists()  # refused before a run folder was made
    result = train_one(_spec(tmp_path, hyperparams={"init": "default", "samples": 2}))
    tuned = load_dispatcher(Path(result.run_dir) / "model.npz")
    assert tuned.meta["settings"]["init"] == str(DEFAULT_DISPATCHER)


def test_a_wider_network_starts_as_the_given_weights_and_then_learns() -> None:
    """Widening (64 -> 96 hidden units) keeps the function exactly, and training moves it."""
    shipped = load_policy(DEFAULT_DISPATCHER)
    assert isinstance(shipped, DispatcherPolicy)
    wide = self_labeling.train_self_labeling(
        iterations=0, init=shipped, hidden=96, validation_instances_per_size=0
    )
    n_in = shipped.layers[0][0].shape[0]
    assert [w.shape for w, _ in wide.layers] == [(n_in, 96), (96, 96), (96, 1)]
    x = np.random.default_rng(0).random((40, n_in)).astype(np.float32)
    np.testing.assert_allclose(wide.scores(x), shipped.scores(x), atol=1e-5)
    trained = self_labeling.train_self_labeling(
        iterations=2,
        init=shipped,
        hidden=96,
        samples=3,
        batch=1,
        sizes=[(4, 3)],
        validation_instances_per_size=0,
    )
    assert np.abs(trained.scores(x) - shipped.scores(x)).max() > 1e-4


def test_the_learning_rate_anneals_to_its_final_value(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizers: list[Any] = []
    real_adam = self_labeling.th.optim.Adam

    def adam(*args: Any, **kwargs: Any) -> Any:
        optimizers.append(real_adam(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(self_labeling.th.optim, "Adam", adam)
    rates: list[float] = []
    _tiny_training(
        iterations=5,
        lr=1e-3,
        lr_final=1e-4,
        on_iteration=lambda _: rates.append(optimizers[-1].param_groups[0]["lr"]),
    )
    assert rates[0] == pytest.approx(1e-3)
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * 4 / 5)))
    with pytest.raises(ValueError, match=re.escape("lr_final=0.01")):
        self_labeling.train_self_labeling(iterations=1, lr=1e-3, lr_final=1e-2)
    with pytest.raises(ValueError, match=re.escape("learning_rate_final=0.01 is above")):
        self_labeling.check_hyperparams({"learning_rate": 1e-3, "learning_rate_final": 1e-2})


def test_each_new_best_is_handed_out_as_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that dies keeps its best weights: model.npz is written at every new best."""
    bests: list[DispatcherPolicy] = []
    final = _tiny_training(iterations=4, on_best=bests.append)
    scores = [
        self_labeling.validation_score(b, self_labeling.validation_instances(1)) for b in bests
    ]
    assert scores == sorted(scores, reverse=True)
    if bests:  # the last checkpoint is the weights the run returns
        np.testing.assert_array_equal(bests[-1].layers[0][0], final.layers[0][0])

    calls: list[int] = []
    real = self_labeling.validation_score

    def failing_validation(policy: DispatcherPolicy, instances: Any) -> float:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("the run dies here")
        return real(policy, instances) - len(calls)  # each validation is a new best

    monkeypatch.setattr(self_labeling, "validation_score", failing_validation)
    with pytest.raises(RuntimeError, match="the run dies here"):
        train_one(_spec(tmp_path, hyperparams={"samples": 2, "validate_every": 1}))
    (run,) = (tmp_path / "runs").iterdir()
    kept = load_dispatcher(run / "model.npz")
    assert kept.meta["checkpoint_iteration"] == 1
    assert kept.meta["command"] == ["autofab", "train", "--algo", "self_labeling"]


def test_a_label_is_scored_against_the_jobs_waiting_for_its_machine() -> None:
    """The machine loss is the cross-entropy over each decision's machine group, by hand;
    the order in which machines are served (sampling noise) does not change it."""
    inst = random_instance(6, 4, 1)
    shipped = load_dispatcher(DEFAULT_DISPATCHER)
    run = rollout(inst, 2, sampling_picker(shipped, 6, np.random.default_rng(0)), record=True)
    assert run.machines is not None
    assert run.masks is not None
    assert run.actions is not None
    assert run.obs is not None
    module = self_labeling._Scorer(64, shipped.features)
    module.load(shipped)
    terms = []
    for t, job in enumerate(run.actions[1]):
        group = run.masks[1, t] & (run.machines[1, t] == run.machines[1, t, job])
        if group.sum() < 2:
            continue
        scores = shipped.scores(shipped.features_of(run.obs[1, t], 6)).astype(np.float64)
        scores = np.where(group, scores, -np.inf)
        terms.append(np.log(np.exp(scores - scores.max()).sum()) + scores.max() - scores[job])
    assert terms  # a 6x4 shop has machines with several jobs waiting
    got = float(self_labeling._loss(module, run, 1, 6, "machine").detach())
    assert got == pytest.approx(np.mean(terms), rel=1e-4)
    everything = float(self_labeling._loss(module, run, 1, 6, "all").detach())
    assert everything != pytest.approx(got)


def test_the_shipped_config_is_valid() -> None:
    data = yaml.safe_load((CONFIG_DIR / "self_labeling.yml").read_text())
    settings = self_labeling.check_hyperparams(data["autofab/JobShop-v0"])
    assert settings["n_timesteps"] > 0


def test_the_shipped_dispatcher_loads_and_fits_the_env() -> None:
    shipped = load_policy(DEFAULT_DISPATCHER, JobShopEnv("ta01"))
    assert isinstance(shipped, DispatcherPolicy)
    assert shipped.meta["algo"] == "self_labeling"


def test_sampling_keeps_the_best_schedule_and_never_loses_to_greedy(
    policy: DispatcherPolicy,
) -> None:
    from autofab.agents.policies.dispatcher import sample_schedule
    from autofab.envs.instances import load_instance
    from autofab.envs.validate import validate_schedule

    inst = load_instance("la01")
    env = JobShopEnv(inst)
    obs, _ = env.reset(seed=0)
    done, info = False, {}
    while not done:
        obs, _, done, _, info = env.step(policy(obs, env.action_masks()))
    one = sample_schedule(policy, inst, 1)
    assert one.makespan == info["makespan"]
    assert one.schedule == info["schedule"]
    many = sample_schedule(policy, inst, 32, seed=3)
    validate_schedule(inst, many.schedule)
    assert many.makespan <= one.makespan
    assert max(row["end"] for row in many.schedule) == many.makespan
    assert many.step_ms_p99 > 0
    with pytest.raises(ValueError, match="samples must be >= 1"):
        sample_schedule(policy, inst, 0)


def test_sampling_never_picks_a_masked_job_even_at_the_top_of_the_draw() -> None:
    """A draw just below 1 can pass the last cumulative sum (which rounds to just below
    1): the picker must still choose a valid job (a training run once died on this)."""
    from autofab.agents.policies.dispatcher import rollout, sampling_picker
    from autofab.envs.instances import random_instance

    class TopOfTheDraw:
        def random(self, shape: tuple[int, int]) -> np.ndarray:
            return np.full(shape, np.nextafter(1.0, 0.0))

    policy = load_dispatcher(DEFAULT_DISPATCHER)
    for seed in range(20):
        inst = random_instance(7, 5, seed=seed)
        pick = sampling_picker(policy, inst.n_jobs, TopOfTheDraw())  # type: ignore[arg-type]
        run = rollout(inst, 16, pick)
        assert np.isfinite(run.makespans).all()


def test_sampling_refuses_non_finite_scores() -> None:
    from autofab.agents.policies.dispatcher import rollout, sampling_picker
    from autofab.envs.instances import random_instance

    policy = load_dispatcher(DEFAULT_DISPATCHER)
    broken = DispatcherPolicy(
        [(np.full_like(w, np.nan), b) for w, b in policy.layers], policy.meta, policy.features
    )
    inst = random_instance(4, 3, seed=0)
    with pytest.raises(FloatingPointError, match="not finite"):
        rollout(inst, 2, sampling_picker(broken, inst.n_jobs, np.random.default_rng(0)))
