"""``autofab evaluate`` end to end: table, results.json, charts and the error contract."""

from __future__ import annotations

import json
import sys

import pytest
import typer
from typer.testing import CliRunner, Result

from autofab.agents.policies.dispatcher import DEFAULT_DISPATCHER, load_dispatcher
from autofab.control.evaluate_cmd import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

app = typer.Typer()
app.command("evaluate")(evaluate)


@app.command()
def noop() -> None:
    """A second command, so ``evaluate`` is a subcommand as in the real CLI."""


runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, ["evaluate", *args])


def test_evaluate_writes_results_and_charts(tmp_path):
    out = tmp_path / "results"
    result = invoke(
        "--instances",
        "ft06,la01",
        "--baselines",
        "spt,mwkr,cpsat",
        "--time-limit",
        "2",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "MEAN" in result.output
    assert "ft06" in result.output
    assert "la01" in result.output
    assert "+0.00%" in result.output
    assert "workers" in result.output
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["instances"]) == {"ft06", "la01"}
    ft06 = doc["instances"]["ft06"]
    assert ft06["best_known"] == 55
    assert set(ft06["methods"]) == {"spt", "mwkr", "cpsat"}
    assert ft06["methods"]["cpsat"]["makespan"] == 55
    assert doc["settings"]["time_limit_s"] == 2
    for name in ("gaps.png", "gantt_ft06.png", "gantt_la01.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instances", "ta10-ta01"], "reversed"),
        (["--instances", "ta01-ft10"], "mixes families"),
        (["--instances", "nope"], "unknown benchmark instance 'nope'"),
        (["--instances", "ft06", "--baselines", "foo"], "unknown baseline 'foo'"),
        (["--instances", "ft06", "--time-limit", "0"], "--time-limit"),
        (["--instances", "ft06", "--policy", "no/such/run"], "--policy"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = invoke(*args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_sb3_policy_without_the_rl_extra_is_a_clear_error(tmp_path, monkeypatch):
    """Deployment without torch/SB3: a dispatcher .npz loads, an SB3 run names the extra."""
    from autofab.agents.policies.artifacts import write_policy_json
    from autofab.envs.jobshop import JobShopEnv

    env = JobShopEnv("ft06")
    run = tmp_path / "run"
    run.mkdir()
    write_policy_json(
        run, algo="maskable_ppo", env_id="autofab/JobShop-v0", env_kwargs={"instance": "ft06"},
        observation_space=env.observation_space, action_space=env.action_space,
        command=["autofab", "train"], seed=0, total_timesteps=1, normalized=False,
    )  # fmt: skip
    (run / "model.zip").write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "sb3_contrib", None)
    result = invoke("--instances", "ft06", "--policy", str(run), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "needs the [rl] extra" in result.output


def test_unwritable_out_folder_is_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("--instances", "ft06", "--baselines", "mwkr", "--out", str(blocker / "sub"))
    assert result.exit_code == 2
    assert "cannot write to --out folder" in result.output


def test_instances_as_ray_tasks_match_the_sequential_run(tmp_path):
    ray = pytest.importorskip("ray")
    docs = {}
    for flag in ("--no-ray", "--ray"):
        out = tmp_path / flag
        args = ["--instances", "ft06,la01", "--baselines", "spt,mwkr", "--out", str(out)]
        result = invoke(*args, flag)
        assert result.exit_code == 0, result.output
        docs[flag] = json.loads((out / "results.json").read_text())
        assert (out / "gantt_la01.png").read_bytes().startswith(PNG_MAGIC)
    seq, par = docs["--no-ray"], docs["--ray"]
    assert list(par["instances"]) == ["ft06", "la01"], "input order"
    for name, entry in seq["instances"].items():
        for method, res in entry["methods"].items():
            assert par["instances"][name]["methods"][method]["makespan"] == res["makespan"]
    assert par["mean_gap"] == seq["mean_gap"]
    assert "ray" not in seq["settings"]
    ray_run = par["settings"]["ray"]
    assert ray_run["address"] == "local"
    assert ray_run["tasks"] == 2
    assert par["settings"]["cpsat_workers"] == ray_run["cpus_per_task"] >= 1
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray-address", "127.0.0.1:1", "--no-ray"], "contradict"),
        (["--ray-address", "127.0.0.1:1"], "cannot join the Ray cluster"),
        (["--cpus-per-task", "0"], "--cpus-per-task"),
    ],
)
def test_bad_ray_options_are_exit_2(tmp_path, args, message):
    pytest.importorskip("ray")
    result = invoke("--instances", "ft06,la01", "--baselines", "spt", *args, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_improve_and_the_shipped_dispatcher(tmp_path):
    result = invoke(
        "--policy", "default", "--instances", "ft06", "--baselines", "mwkr",
        "--time-limit", "1", "--improve", "1", "--no-ray", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    methods = json.loads((tmp_path / "results.json").read_text())["instances"]["ft06"]["methods"]
    assert set(methods) == {"policy", "mwkr", "improve"}
    seed_best = min(methods["policy"]["makespan"], methods["mwkr"]["makespan"])
    assert methods["improve"]["makespan"] <= seed_best
    assert methods["policy"]["decision_ms_p99"] < 5.0
    # The shipped dispatcher was trained on delay schedules, and runs on them.
    shipped = load_dispatcher(DEFAULT_DISPATCHER)
    assert shipped.delay is not None
    assert methods["policy"]["delay"] == shipped.delay
    assert f"delay={shipped.delay:g}" in result.output


def test_improve_must_be_positive(tmp_path):
    result = invoke("--instances", "ft06", "--improve", "0", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--improve" in result.output


def test_samples_report_the_best_of_k_and_seed_improve(tmp_path):
    result = invoke(
        "--policy", "default", "--instances", "ft06,la01", "--baselines", "mwkr",
        "--samples", "16", "--improve", "1", "--no-ray", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["settings"]["samples"] == 16
    for entry in doc["instances"].values():
        methods = entry["methods"]
        assert set(methods) == {"policy", "sampled", "mwkr", "improve"}
        assert methods["sampled"]["samples"] == 16
        assert methods["sampled"]["makespan"] <= methods["policy"]["makespan"]
        assert methods["improve"]["makespan"] <= methods["sampled"]["makespan"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "4"], "give --policy too"),
        (["--samples", "0", "--policy", "default"], "--samples must be at least 1"),
    ],
)
def test_bad_samples_are_exit_2(tmp_path, args, message):
    result = invoke("--instances", "ft06", *args, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert message in result.output
