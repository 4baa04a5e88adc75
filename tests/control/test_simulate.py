"""``autofab simulate``: a shift of a plant under a baseline policy, end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from autofab.control.cli import app
from autofab.envs.baselines import run_policy
from autofab.envs.plant import compile_plant, load_plant

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def plain(text: str) -> str:
    return _ANSI.sub("", text)


@pytest.fixture(scope="module")
def two_hours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    """One run of the demo plant for 2 h, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "demo-run"
    result = invoke(
        "simulate",
        "demo",
        "--policy",
        "rule:mwkr+cbm+tariff",
        "--seed",
        "1",
        "--horizon",
        "2h",
        "--out",
        str(out),
    )
    return result, out


def test_simulate_prints_the_kpi_table(two_hours: tuple[Result, Path]):
    result, out = two_hours
    assert result.exit_code == 0, result.output
    text = plain(result.stdout)
    assert "demo: rule:mwkr+cbm+tariff, seed 1, 2h" in text
    expected = run_policy(load_plant("demo"), "rule:mwkr+cbm+tariff", seed=1, horizon_s=7200)
    rows = {
        cells[0]: cells[1]
        for line in text.splitlines()
        if line.count("│") == 4
        for cells in [[c.strip() for c in line.split("│")[1:-1]]]
    }
    assert rows["parts good"] == str(expected["parts_good"])
    assert rows["energy cost"] == f"{expected['energy_cost']:.2f}"
    assert rows["cap violations"] == "0"
    assert rows["breakdowns"] == str(expected["breakdowns"])
    assert f"wrote report to {out / 'report.json'}" in text.replace("\n", "")


def test_simulate_writes_the_report(two_hours: tuple[Result, Path]):
    result, out = two_hours
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report) >= {
        "schema",
        "plant",
        "policy",
        "seed",
        "horizon_s",
        "shift_start_hour",
        "currency",
        "kpis",
        "machines",
        "attempts",
        "events",
        "power_trace",
    }
    assert report["plant"] == "demo"
    assert report["policy"] == "rule:mwkr+cbm+tariff"
    assert report["seed"] == 1
    assert report["horizon_s"] == 7200
    expected = run_policy(load_plant("demo"), "rule:mwkr+cbm+tariff", seed=1, horizon_s=7200)
    kpis = report["kpis"]
    assert kpis["parts_good"] == expected["parts_good"]
    assert kpis["energy_cost"] == pytest.approx(expected["energy_cost"])
    assert kpis["decisions"] == expected["decisions"]
    assert kpis["oee"] == pytest.approx(expected["oee"])
    names = list(compile_plant(load_plant("demo")).machine_names)
    assert [m["name"] for m in report["machines"]] == names
    assert sum(m["parts_good"] for m in report["machines"]) >= kpis["parts_good"]
    assert report["attempts"]
    assert {"job", "machine", "start", "end", "speed", "defective"} <= set(report["attempts"][0])
    times = report["power_trace"]["time_s"]
    assert times == sorted(times)
    assert max(report["power_trace"]["kw"]) <= kpis["cap_kw"] + 1e-9
    config = yaml.safe_load((out / "config.yml").read_text(encoding="utf-8"))
    assert load_plant(config) == load_plant("demo")


def test_simulate_draws_the_chart(two_hours: tuple[Result, Path]):
    result, out = two_hours
    assert result.exit_code == 0, result.output
    data = (out / "shift.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_simulate_defaults_to_mwkr_and_the_configs_horizon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    result = invoke("simulate", "demo")
    assert result.exit_code == 0, result.output
    assert "demo: rule:mwkr, seed 0, 8h" in plain(result.stdout)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("demo__rule-mwkr__0__")
    assert json.loads((folder / "report.json").read_text())["horizon_s"] == 8 * 3600


def test_simulate_a_config_file(tmp_path: Path):
    data = load_plant("demo").model_dump(mode="json")
    data["name"] = "tiny"
    data["orders"]["initial"] = 3
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = invoke("simulate", str(path), "--horizon", "30m", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "tiny: rule:mwkr, seed 0, 30m" in plain(result.stdout)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["simulate", "nope"], "'nope'"),
        (["simulate", "{tmp}/missing.yaml"], "missing.yaml"),
        (["simulate", "demo", "--horizon", "8x"], "'8x'"),
        (["simulate", "demo", "--horizon", "0"], "--horizon"),
        (["simulate", "demo", "--policy", "rule:bogus"], "'bogus'"),
        (["simulate", "demo", "--policy", "rule:mwkr+warp"], "'warp'"),
        (["simulate", "demo", "--policy", "cbm"], "rule:NAME"),
        (["simulate", "demo", "--horizon", "1h", "--out", "{tmp}/file.txt"], "--out"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], named: str):
    (tmp_path / "file.txt").write_text("not a folder", encoding="utf-8")
    result = invoke(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = plain(result.stderr).strip()
    assert err.startswith("error: ")
    assert len(err.splitlines()) == 1, err
    assert named in err


def test_invalid_config_prints_the_config_error_as_is(tmp_path: Path):
    data = load_plant("demo").model_dump(mode="json")
    data["energy"]["peak_cap_kw"] = -5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = invoke("simulate", str(path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = plain(result.stderr)
    assert err.startswith(f"error: invalid plant config {path}")
    assert "energy.peak_cap_kw" in err


def test_report_module_imports_matplotlib_lazily():
    code = (
        "import sys, autofab.control.report; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
