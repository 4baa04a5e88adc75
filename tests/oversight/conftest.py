"""Fixtures for the oversight tests: the Prometheus tools, the shipped configs, and a PromQL
metric-name extractor shared by the rule and dashboard lints.

Tests marked ``promtool`` need ``promtool`` and ``prometheus`` from Debian's
``prometheus`` package. Where they are missing those tests fail (never skip), with the
install line, so CI cannot pass without running them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "configs" / "prometheus"
DASHBOARDS_DIR = ROOT / "dashboards"
INSTALL_HINT = (
    "install it with: apt-get update && apt-get install -y --no-install-recommends prometheus "
    "(Debian's package ships both promtool and prometheus)"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "promtool: needs promtool and prometheus from Debian's prometheus package "
        "(fails, does not skip, where they are missing)",
    )


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH; {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _tool("prometheus")


# --------------------------------------------------------------------------- PromQL names

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[\w$]+")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*$", re.S)
# A whole identifier (not part of a number or a longer name) that is not a function call.
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan", "Inf", "NaN"}
)


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression (or a Grafana ``label_values(...)`` query) refers to."""
    if m := _LABEL_VALUES.match(expr):
        expr = m.group(1)
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING, _OFFSET, _VARIABLE):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENT.findall(expr) if name not in _KEYWORDS}


@pytest.fixture(scope="session")
def promql_names() -> Callable[[str], set[str]]:
    return metric_names_in
