"""``autofab train`` end to end, registered on its own Typer app (as cli.py will do)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from autofab.control.train_cmd import parse_seeds, train

app = typer.Typer()
app.command("train")(train)


@app.command("noop")
def _noop() -> None:
    """A second command, so Typer keeps ``train`` as a subcommand."""


runner = CliRunner()

TINY = [
    "--env-kwargs",
    '{"instance": "ft06"}',
    "-n",
    "128",
    "--eval-freq",
    "64",
    "--eval-episodes",
    "1",
    "--hyperparams",
    "n_envs:2",
    "--hyperparams",
    "n_steps:32",
    "-params",
    "batch_size:32",
    "--hyperparams",
    "policy_kwargs:{net_arch: [16, 16], activation_fn: relu}",
]


def test_train_writes_a_run_folder(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            "--algo",
            "maskable_ppo",
            "--env",
            "autofab/JobShop-v0",
            *TINY,
            "-f",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    assert f"run folder: {folder}" in result.output
    assert folder.name.startswith("autofab-JobShop-v0__maskable_ppo__0__")
    assert {"config.yml", "model.zip", "policy.json", "evaluations.csv"} <= {
        p.name for p in folder.iterdir()
    }
    meta = json.loads((folder / "policy.json").read_text())
    assert meta["command"][:4] == ["autofab", "train", "--algo", "maskable_ppo"]
    assert "policy_kwargs:{net_arch: [16, 16], activation_fn: relu}" in meta["command"]


def test_train_self_labeling_writes_a_dispatcher_run(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train", "--algo", "self_labeling", "--env", "autofab/JobShop-v0",
            "--env-kwargs", '{"instance": {"jobs": 4, "machines": 3}}', "-n", "300",
            "--eval-episodes", "1", "--hyperparams", "samples:4", "--hyperparams", "batch:1",
            "--hyperparams", "learning_rate:1e-3", "--hyperparams", "imitation_instances:1",
            "--hyperparams", "validation_instances_per_size:1", "-f", str(tmp_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("autofab-JobShop-v0__self_labeling__0__")
    assert {"config.yml", "model.npz", "policy.json", "evaluations.csv"} <= {
        p.name for p in folder.iterdir()
    }
    meta = json.loads((folder / "policy.json").read_text())
    assert meta["algo"] == "self_labeling"
    assert "learning_rate:1e-3" in meta["command"]


def test_several_seeds_run_one_after_another_with_no_ray(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", *TINY, "--seeds", "0,1", "--no-ray", "-f", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "in parallel" not in result.output
    assert sorted(p.name.split("__")[2] for p in tmp_path.iterdir()) == ["0", "1"]


def test_several_seeds_train_in_parallel_as_ray_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *TINY, "--seeds", "0,1", "-f", "runs"])
    assert result.exit_code == 0, result.output
    assert "in parallel on a local Ray" in result.output
    assert "[2/2] seed" in result.output
    folders = sorted((tmp_path / "runs").iterdir())
    assert sorted(p.name.split("__")[2] for p in folders) == ["0", "1"]
    for folder in folders:
        assert {"model.zip", "policy.json", "evaluations.csv"} <= {p.name for p in folder.iterdir()}
        assert f"run folder: {folder}" in result.output
    assert not ray.is_initialized(), "the local Ray that train started is shut down"


def test_bad_input_with_several_seeds_fails_before_ray_starts(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    args = ["--hyperparams", "learning_rate:x", "--seeds", "0,1", "-f", str(tmp_path)]
    result = runner.invoke(app, ["train", *TINY, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "'learning_rate' must be a number" in lines[0]
    assert "in parallel" not in result.output
    assert not ray.is_initialized()
    assert not list(tmp_path.iterdir())


def test_an_unreachable_ray_address_is_exit_2(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    result = runner.invoke(
        app,
        ["train", *TINY, "--seeds", "0,1", "--ray-address", "127.0.0.1:1", "-f", str(tmp_path)],
    )
    assert result.exit_code == 2, result.output
    assert "cannot join the Ray cluster at --ray-address '127.0.0.1:1'" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--algo", "sac"], "unknown algo 'sac'"),
        (["--env", "autofab/Nope-v0"], "unknown env id"),
        (["--env-kwargs", "{bad json"], "--env-kwargs is not valid JSON"),
        (["--env-kwargs", '{"instance": "nope"}'], "unknown benchmark instance 'nope'"),
        (["--hyperparams", "n_stepz:64"], "unknown hyperparameter 'n_stepz'"),
        (["--hyperparams", "learning_rate:__import__('os')"], "'learning_rate' must be a number"),
        (["--algo", "dqn", "--env", "autofab/Factory-v0"], "dqn needs a Discrete action space"),
        (["--algo", "maskable_ppo", "--env", "CartPole-v1"], "needs an env with action_masks()"),
        (["--seeds", "0,x"], "--seeds must be a comma list"),
        (["--conf-file", "missing.yml"], "--conf-file 'missing.yml' does not exist"),
    ],
)
def test_bad_input_is_one_red_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["train", "-n", "64", "-f", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_parse_seeds_keeps_order_and_drops_repeats() -> None:
    assert parse_seeds("2, 0,2,1") == [2, 0, 1]


def test_an_sb3_run_on_delay_schedules_is_evaluated_on_them(tmp_path: Path) -> None:
    from autofab.agents.policies.artifacts import load_policy
    from autofab.agents.policies.evaluation import evaluate, policy_delay
    from autofab.envs.instances import load_instance
    from autofab.envs.jobshop import JobShopEnv

    tiny = [*TINY]
    tiny[1] = '{"instance": "ft06", "delay": 0.3}'
    args = ["train", "--algo", "maskable_ppo", "--env", "autofab/JobShop-v0", *tiny]
    result = runner.invoke(app, [*args, "-f", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    policy = load_policy(folder, JobShopEnv("ft06"))
    assert policy_delay(policy, load_instance("ft06")) == 0.3
    doc = evaluate(["ft06"], [], 1.0, policy=policy)
    assert doc["instances"]["ft06"]["methods"]["policy"]["delay"] == 0.3
