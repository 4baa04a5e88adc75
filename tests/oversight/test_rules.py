"""configs/prometheus: the scrape config, recording and alerting rules, checked by promtool
and unit-tested with ``promtool test rules``; every name they use is a defined metric."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from autofab.control.metrics import FILE_SD_DIR, metric_names

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "configs" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
#: Series Prometheus makes itself, which rules may use.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
RECORD_NAME = re.compile(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+")


def rules(kind: str) -> list[dict[str, Any]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [rule for rule in group["rules"] if kind in rule]
    return out


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules("record")}


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_rule_files_and_tests_exist():
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert len(RULE_TESTS) >= 2


def test_recording_rules_are_named_level_metric_operations():
    for name in recorded_names():
        assert RECORD_NAME.fullmatch(name), name
        level, metric, _ = name.split(":")
        assert metric.startswith("autofab_"), name
        assert not metric.endswith("_total"), f"{name}: drop _total after rate()"
        assert set(level.split("_")) <= {"plant", "line", "machine"}, name
    assert {
        "plant:autofab_oee:ratio_rate5m",
        "plant_line:autofab_oee:ratio_rate5m",
        "plant:autofab_oee_availability:ratio_rate5m",
        "plant:autofab_oee_performance:ratio_rate5m",
        "plant:autofab_oee_quality:ratio_rate5m",
    } <= recorded_names()


def test_oee_is_computed_from_summed_counters_not_averaged():
    for rule in rules("record"):
        assert "avg" not in rule["expr"], rule["record"]
        if ":autofab_oee" in rule["record"]:
            assert "rate(" not in rule["expr"], "OEE ratios divide the recorded sums"


def test_rules_use_only_defined_metrics(promql_names: Callable[[str], set[str]]):
    known = metric_names() | recorded_names() | PROMETHEUS_SERIES
    for rule in rules("record") + rules("alert"):
        used = promql_names(rule["expr"])
        assert used, rule
        assert used <= known, f"{rule.get('record') or rule['alert']}: {used - known}"


def test_every_alert_has_summary_description_severity_and_a_runbook_section():
    runbook = (PROMETHEUS_DIR / "RUNBOOK.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, re.M)}
    alerts = rules("alert")
    names = {a["alert"] for a in alerts}
    assert {
        "AutofabMachineDown",
        "AutofabOEEBelowTarget",
        "AutofabSafetyRejectionsSpiking",
        "AutofabWatchdogTripped",
        "AutofabNegotiationFailing",
        "AutofabNatsDisconnected",
        "AutofabOpcuaDisconnected",
        "AutofabPowerNearCap",
    } <= names
    for alert in alerts:
        annotations = alert["annotations"]
        assert annotations["summary"], alert["alert"]
        assert annotations["description"], alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}
        url = annotations["runbook_url"]
        assert url.endswith(f"configs/prometheus/RUNBOOK.md#{alert['alert'].lower()}"), url
        assert alert["alert"].lower() in anchors, f"RUNBOOK.md lacks ## {alert['alert']}"


def test_every_alert_is_unit_tested():
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", [])}
    assert len(tested) >= 3
    untested = {a["alert"] for a in rules("alert")} - tested - {"AutofabExporterDown"}
    assert not untested


def test_scrape_config_reads_the_file_sd_folder_the_run_writes():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "autofab"]
    assert job["honor_labels"] is True
    [sd] = job["file_sd_configs"]
    [pattern] = sd["files"]
    assert (PROMETHEUS_DIR / pattern).resolve().parent == (ROOT / FILE_SD_DIR).resolve()
    assert Path(pattern).name == "*.json"
    assert {Path(p).name for p in config["rule_files"]} == {p.name for p in RULE_FILES}


@pytest.mark.promtool
def test_promtool_checks_config_and_rules(promtool: str):
    output = run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert "SUCCESS" in output
    for path in RULE_FILES:
        assert "SUCCESS" in run([promtool, "check", "rules", str(path)])


@pytest.mark.promtool
@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(promtool: str, path: Path):
    assert "SUCCESS" in run([promtool, "test", "rules", str(path)])
