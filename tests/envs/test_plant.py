"""Plant configs: every shipped YAML validates, durations parse and print, and each kind of
bad input is refused with a :class:`PlantConfigError` that names the key path and the value.

The error tests start from the shipped demo plant and break one thing at a time, so each
test says exactly which mistake it is about and the rest of the config stays valid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from autofab.envs.plant import (
    PlantConfig,
    PlantConfigError,
    compile_plant,
    format_duration,
    load_plant,
    parse_duration,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: Every plant YAML shipped at the top of configs/ (load_plant("<name>") resolves these).
SHIPPED = sorted(CONFIGS.glob("*.yaml"))

#: pydantic appends links like this to its own messages; a user should never see them.
PYDANTIC_URL = "errors.pydantic.dev"


@pytest.fixture
def demo() -> dict[str, Any]:
    """The demo plant as plain data, ready to be broken one key at a time."""
    return yaml.safe_load((CONFIGS / "demo.yaml").read_text(encoding="utf-8"))


def config_error(data: Any) -> str:
    """The message of the PlantConfigError that loading ``data`` must raise."""
    with pytest.raises(PlantConfigError) as info:
        load_plant(data)
    message = str(info.value)
    assert PYDANTIC_URL not in message, message
    assert "Traceback" not in message
    return message


# --------------------------------------------------------------------------- shipped


def test_shipped_configs_exist() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"demo", "plant100"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_validates(path: Path) -> None:
    by_name = load_plant(path.stem)
    by_path = load_plant(path)
    assert by_name == by_path
    assert by_name.name == path.stem, "a plant's name should match its file name"
    arrays = compile_plant(by_name)
    assert arrays.n_machines == len(set(arrays.machine_names))
    assert np.all(arrays.speed_min <= arrays.speed_nominal)
    assert np.all(arrays.speed_nominal <= arrays.speed_max)
    assert by_name.horizon_seconds > 0


def test_plant100_shape() -> None:
    """The large plant is what its name promises: 100 machines on several lines."""
    plant = compile_plant(load_plant("plant100"))
    assert plant.n_machines == 100
    assert len(plant.line_names) >= 4
    assert len(plant.config.products) >= 5
    assert len(plant.material_names) >= 3
    # Every product's every step has at least two machines, so a breakdown never stalls it.
    for product in plant.config.products:
        for step in product.route:
            capable = sum(step.capability in caps for caps in plant.machine_capabilities)
            assert capable >= 2, (product.name, step.capability)


def test_load_plant_accepts_mapping_and_config(demo: dict[str, Any]) -> None:
    config = load_plant(demo)
    assert isinstance(config, PlantConfig)
    assert load_plant(config) is config
    assert config == load_plant("demo")


def test_config_is_frozen() -> None:
    config = load_plant("demo")
    with pytest.raises(ValueError, match="frozen"):
        config.name = "other"  # type: ignore[misc]


def test_machine_count_pattern_expands(demo: dict[str, Any]) -> None:
    arrays = compile_plant(load_plant(demo))
    assert arrays.machine_names[:4] == ("mill-1", "mill-2", "lathe-1", "lathe-2")
    assert arrays.machine_line.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_compile_converts_to_si_units(demo: dict[str, Any]) -> None:
    arrays = compile_plant(load_plant(demo))
    mill = arrays.machine_names.index("mill-1")
    assert arrays.idle_w[mill] == pytest.approx(1500.0)  # 1.5 kW
    assert arrays.load_w[mill] == pytest.approx(11000.0)
    assert arrays.wear_per_s[mill] == pytest.approx(0.05 / 3600)
    assert arrays.repair_mean_s[mill] == pytest.approx(2.5 * 3600)
    assert arrays.maintenance_s[mill] == pytest.approx(1800.0)
    assert arrays.temp_tau_s[mill] == pytest.approx(12 * 60)
    assert arrays.tariff_per_j[8] == pytest.approx(0.34 / 3.6e6)
    steel = arrays.material_names.index("steel-bar")
    assert arrays.material_lead_s[steel] == pytest.approx(7200.0)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("8h", 28800.0),
        ("30m", 1800.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("45", 45.0),
        ("1d", 86400.0),
        ("10min", 600.0),
        ("3hr", 10800.0),
        ("2sec", 2.0),
        (" 2 H ", 7200.0),
        (45, 45.0),
        (1.5, 1.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "-1h", "0", "0h", "1e3", "8 weeks", "1,5h", True, 0, -5, math.nan, math.inf]
)
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(28800, "8h"), (5400, "90m"), (1800, "30m"), (45, "45s"), (0.5, "0.5s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_duration_docstring_examples() -> None:
    """The docstring promises ``90 -> 90s``."""
    assert format_duration(28800) == "8h"
    assert format_duration(5400) == "90m"
    assert format_duration(90) == "90s"


@given(st.integers(min_value=1, max_value=10**7))
def test_format_parse_round_trip_whole_seconds(seconds: int) -> None:
    """What format_duration prints, parse_duration reads back exactly (up to ~4 months)."""
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- bad input


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``data[a][b]...[z] = value`` for the dotted ``path``."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _rename(path: str, new: str) -> Callable[[dict[str, Any]], None]:
    """A mutation that renames the key at dotted ``path`` (a typo)."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[new] = node.pop(last)

    return mutate


# (test id, mutation, fragments the message must contain: the path and the value)
BAD_INPUT: list[tuple[str, Callable[[dict[str, Any]], None], tuple[str, ...]]] = [
    ("typo-key", _rename("machine_types.mill.speed", "sped"), ("machine_types.mill.sped",)),
    (
        "typo-top-level-key",
        _rename("orders", "order"),
        ("order", "unknown key"),
    ),
    (
        "wrong-type-number",
        _set("machine_types.mill.speed.max", "fast"),
        ("machine_types.mill.speed.max", "'fast'"),
    ),
    (
        "wrong-type-section",
        _set("machine_types.mill.speed", "fast"),
        ("machine_types.mill.speed", "'fast'"),
    ),
    (
        "negative-power",
        _set("machine_types.mill.power.idle_kw", -1.5),
        ("machine_types.mill.power.idle_kw", "-1.5"),
    ),
    (
        "speed-min-above-max",
        _set("machine_types.mill.speed.min", 1.4),
        ("machine_types.mill.speed", "1.4", "1.3"),
    ),
    (
        "unknown-machine-type",
        _set("lines.1.machines.0.type", "drll"),
        ("lines[1].machines[0].type", "'drll'"),
    ),
    (
        "duplicate-machine-name",
        _set("lines.1.machines.1.name", "mill-1"),
        ("lines[1].machines[1].name", "'mill-1'"),
    ),
    (
        "unknown-capability-in-route",
        _set("products.0.route.1.capability", "drll"),
        ("products[0].route[1].capability", "'drll'"),
    ),
    (
        "unknown-material",
        _set("products.0.route.0.material", "steel-rod"),
        ("products[0].route[0].material", "'steel-rod'"),
    ),
    (
        "tariff-23-values",
        _set("energy.tariff_per_kwh", [0.2] * 23),
        ("energy.tariff_per_kwh", "23"),
    ),
    (
        "negative-tariff",
        _set("energy.tariff_per_kwh", [0.2] * 23 + [-0.1]),
        ("energy.tariff_per_kwh", ">= 0"),
    ),
    ("bad-horizon", _set("horizon", "8 weeks"), ("horizon", "'8 weeks'")),
    ("bad-on-defect", _set("on_defect", "recycle"), ("on_defect", "'recycle'")),
    (
        "fractional-count",
        _set("lines.0.machines.0.count", 2.5),
        ("lines[0].machines[0].count", "2.5"),
    ),
    ("missing-energy", lambda d: d.pop("energy"), ("energy", "required")),
    (
        "pattern-without-i",
        _set("lines.0.machines.0.name", "mill"),
        ("lines[0].machines[0]", "'mill'", "{i}"),
    ),
    (
        "probability-above-one",
        _set("materials.0.disruption_probability", 1.5),
        ("materials[0].disruption_probability", "1.5"),
    ),
]


@pytest.mark.parametrize(
    ("mutate", "fragments"), [(m, f) for _, m, f in BAD_INPUT], ids=[i for i, _, _ in BAD_INPUT]
)
def test_bad_input_names_key_and_value(
    demo: dict[str, Any], mutate: Callable[[dict[str, Any]], None], fragments: tuple[str, ...]
) -> None:
    data = copy.deepcopy(demo)
    mutate(data)
    message = config_error(data)
    assert message.startswith("invalid plant config")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_every_error_is_listed(demo: dict[str, Any]) -> None:
    """Two independent mistakes are both reported, not just the first."""
    data = copy.deepcopy(demo)
    data["machine_types"]["mill"]["power"]["idle_kw"] = -1
    data["machine_types"]["lathe"]["wear"]["rate_per_hour"] = "lots"
    message = config_error(data)
    assert "machine_types.mill.power.idle_kw" in message
    assert "machine_types.lathe.wear.rate_per_hour" in message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("machine_types.mill.power.idle_kw", True),  # YAML `yes` / `on` / `true`
        ("machine_types.mill.power.down_kw", False),  # YAML `no` / `off` / `false`
    ],
)
def test_boolean_is_not_a_number(demo: dict[str, Any], path: str, value: bool) -> None:
    """YAML 1.1 reads ``yes``/``no``/``on``/``off`` as booleans; a power of ``on`` is a
    mistake to name, not 1 kW."""
    data = copy.deepcopy(demo)
    _set(path, value)(data)
    assert path in config_error(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("machine_types.mill.power.load_kw", math.inf),  # YAML `.inf`
        ("machine_types.mill.sensors.ambient_c", math.nan),  # YAML `.nan`
        ("energy.peak_cap_kw", math.inf),
    ],
)
def test_non_finite_numbers_are_refused(demo: dict[str, Any], path: str, value: float) -> None:
    """An infinite load or a NaN temperature poisons every energy figure downstream."""
    data = copy.deepcopy(demo)
    _set(path, value)(data)
    assert path in config_error(data)


# --------------------------------------------------------------------------- files


def test_invalid_yaml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nlines: [a, b\n", encoding="utf-8")
    message = config_error(path)
    assert str(path) in message
    assert "not valid YAML" in message
    assert "line" in message


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nowhere.yaml")
    assert "nowhere.yaml" in message
    assert "not found" in message


def test_unknown_shipped_name() -> None:
    message = config_error("no-such-plant")
    assert "'no-such-plant'" in message
    assert "not found" in message


def test_yaml_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: demo\n- name: other\n", encoding="utf-8")
    message = config_error(path)
    assert str(path) in message
    assert "mapping" in message
    assert "list" in message


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert "mapping" in config_error(path)


def test_file_errors_name_the_file(tmp_path: Path, demo: dict[str, Any]) -> None:
    data = copy.deepcopy(demo)
    data["machine_types"]["mill"]["speed"]["max"] = "fast"
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    message = config_error(path)
    assert str(path) in message
    assert "machine_types.mill.speed.max" in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A file saved in Latin-1 (a plant named 'Müller') must not end in a traceback."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: M\xfcller\n".encode("latin-1"))
    message = config_error(path)
    assert str(path) in message
