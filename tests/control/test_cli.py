"""The ``autofab`` command line: schedule, instances, version, and its error contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gymnasium as gym
import pytest
from typer.testing import CliRunner, Result

from autofab.control.cli import app
from autofab.envs.instances import load_instance, random_instance, save_instance
from autofab.envs.rules import RULES, RulePolicy, run_episode
from autofab.envs.validate import validate_schedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def plain(text: str) -> str:
    """Output without colour codes (rich adds them when the tests run in a terminal)."""
    return _ANSI.sub("", text)


def episode(instance: str, rule: str, seed: int = 0) -> dict:
    env = gym.make("autofab/JobShop-v0", instance=load_instance(instance))
    return run_episode(env, RulePolicy(rule), seed=seed)


# --------------------------------------------------------------------------- schedule


def test_schedule_reports_the_makespan_run_episode_gets():
    info = episode("ft06", "mwkr")
    result = invoke("schedule", "ft06", "--rule", "mwkr")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert f"makespan: {info['makespan']:g}" in out
    assert f"gap to best known: {info['gap'] * 100:+.2f}%" in out
    assert "best known 55, optimal" in out
    assert "mwkr" in out


def test_schedule_default_rule_is_mwkr():
    result = invoke("schedule", "ft06")
    assert result.exit_code == 0, result.output
    assert "rule: mwkr" in plain(result.stdout)


def test_rule_all_prints_one_row_per_rule_and_the_best():
    result = invoke("schedule", "ft06", "--rule", "all")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    makespans = {rule: episode("ft06", rule)["makespan"] for rule in RULES}
    for rule, makespan in makespans.items():
        assert re.search(rf"{rule}\s*│\s*{makespan:g}\s*│", out), (rule, out)
    best = min(makespans, key=makespans.__getitem__)
    assert f"best rule: {best}" in out
    assert f"makespan: {makespans[best]:g}" in out
    for header in ("Rule", "Makespan", "Gap", "Tardiness", "Seconds"):
        assert header in out


def test_rule_comma_list_is_case_insensitive_and_deduplicated(tmp_path: Path):
    out_json = tmp_path / "r.json"
    result = invoke("schedule", "ft06", "--rule", "SPT, edd,spt", "--json", str(out_json))
    assert result.exit_code == 0, result.output
    rules = [r["rule"] for r in json.loads(out_json.read_text())["results"]]
    assert rules == ["spt", "edd"]


def test_gantt_writes_a_png(tmp_path: Path):
    path = tmp_path / "ft06.png"
    result = invoke("schedule", "ft06", "--gantt", str(path))
    assert result.exit_code == 0, result.output
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    assert str(path) in plain(result.stdout).replace("\n", "")


def test_json_holds_the_result_and_a_valid_schedule(tmp_path: Path):
    path = tmp_path / "out.json"
    result = invoke("schedule", "ft06", "--rule", "mwkr,spt", "--json", str(path))
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text(encoding="utf-8"))
    best = min(("mwkr", "spt"), key=lambda r: episode("ft06", r)["makespan"])
    info = episode("ft06", best)
    assert data["instance"] == "ft06"
    assert data["rule"] == best
    assert data["makespan"] == info["makespan"]
    assert data["best_known"] == 55
    assert data["optimal"] is True
    assert data["gap"] == pytest.approx(info["makespan"] / 55 - 1)
    assert data["tardiness"] == pytest.approx(info["tardiness"])
    assert data["schedule"] == info["schedule"]
    assert {r["rule"] for r in data["results"]} == {"mwkr", "spt"}
    validate_schedule(load_instance("ft06"), data["schedule"])


def test_random_spec_with_seed():
    expected = run_episode(
        gym.make("autofab/JobShop-v0", instance=random_instance(5, 4, 3)), RulePolicy("mwkr"), 0
    )
    result = invoke("schedule", "random:5x4:3")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert "random-5x4-s3" in out
    assert "5 jobs x 4 machines" in out
    assert f"makespan: {expected['makespan']:g}" in out
    assert "gap to best known: n/a" in out


def test_random_spec_without_seed_uses_the_seed_option():
    result = invoke("schedule", "random:3x3", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "random-3x3-s7" in plain(result.stdout)


def test_schedule_a_json_instance_file(tmp_path: Path):
    path = save_instance(load_instance("ft06"), tmp_path / "cell.json")
    result = invoke("schedule", str(path))
    assert result.exit_code == 0, result.output
    assert f"makespan: {episode('ft06', 'mwkr')['makespan']:g}" in plain(result.stdout)


# --------------------------------------------------------------------------- instances


def test_instances_with_prefix():
    result = invoke("instances", "ft")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert set(rows) == {"ft06", "ft10", "ft20"}
    assert re.search(r"6 x 6\s*│\s*55\s*│\s*yes", rows["ft06"])
    assert re.search(r"20 x 5\s*│\s*1165\s*│\s*yes", rows["ft20"])


def test_instances_lists_every_family():
    result = invoke("instances")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    for name in ("abz5", "ft10", "la01", "orb01", "swv01", "ta80", "yn1"):
        assert name in out
    assert re.search(r"abz8\s*│.*│\s*no", out)  # best known is an upper bound


# --------------------------------------------------------------------------- version, help


def test_version_command_and_option():
    expected = f"autofab {metadata.version('autofab')}"
    for args in (["version"], ["--version"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected


def test_no_arguments_shows_help():
    result = invoke()
    out = plain(result.output)
    assert "Usage" in out
    assert "schedule" in out
    assert "instances" in out
    commands = set(re.findall(r"│ (\w+)\s", out))
    assert {"run", "train", "evaluate", "order", "plant", "policy", "supervisor"} <= commands


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["schedule", "nope"], "'nope'"),
        (["schedule", "ft06", "--rule", "bogus"], "'bogus'"),
        (["schedule", "ft06", "--rule", "spt,,mwkr"], "'spt,,mwkr'"),
        (["schedule", "random:15"], "'random:15'"),
        (["schedule", "random:15x15x3"], "'random:15x15x3'"),
        (["schedule", "random:0x5"], "0"),
        (["schedule", "{tmp}/missing.json"], "missing.json"),
        (["schedule", "ft06", "--json", "{tmp}/no/such/dir/out.json"], "out.json"),
        (["schedule", "ft06", "--json", "{tmp}"], "--json"),
        (["schedule", "ft06", "--gantt", "{tmp}/no/such/dir/g.png"], "g.png"),
        (["schedule", "ft06", "--gantt", "{tmp}/g.notaformat"], "notaformat"),
        (["instances", "zz"], "'zz'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], named: str):
    result = invoke(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = plain(result.stderr).strip()
    assert err.startswith("error: ")
    assert len(err.splitlines()) == 1, err
    assert named in err


def test_bad_json_instance_file_exits_2(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    result = invoke("schedule", str(path))
    assert result.exit_code == 2, result.output
    assert "not valid JSON" in result.stderr
    assert "broken.json" in result.stderr


# --------------------------------------------------------------------------- installed script


def _autofab_command() -> list[str]:
    """The console script of the interpreter running the tests, else ``python -m``."""
    script = Path(sys.executable).with_name("autofab")
    if script.is_file():
        return [str(script)]
    found = shutil.which("autofab")
    return [found] if found else [sys.executable, "-m", "autofab.control.cli"]


def test_console_script_help():
    proc = subprocess.run(
        [*_autofab_command(), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "multi-agent autonomous control for factories" in proc.stdout
    assert "schedule" in proc.stdout
    assert "instances" in proc.stdout


def test_module_entry_point_and_lazy_matplotlib():
    """``python -m`` works, and importing the CLI does not import matplotlib."""
    code = (
        "import sys, autofab.control.cli; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    proc = subprocess.run(
        [sys.executable, "-m", "autofab.control.cli", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"autofab {metadata.version('autofab')}"
