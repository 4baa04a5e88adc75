"""The plant configuration: machines, lines, products, orders, materials, energy.

A plant is described in YAML (see ``configs/demo.yaml``) and validated here with pydantic
models that forbid unknown keys, so a typo or a bad value is named in a clear
:class:`PlantConfigError` (``lines[0].machines[1].speed.max: must be >= speed.min``), never
a traceback. :func:`compile_plant` turns a valid config into :class:`PlantArrays`, the
flat numpy arrays the factory model steps on.

Units are in the field names: ``_kw``, ``_hours``, ``_minutes``, ``_c`` (deg C),
``_per_hour``, ``_mm_s``. Internally the model works in seconds, watts and joules.

pydantic lives here, at the edge of the pure plant model, because ``Factory-v0`` takes a
plant YAML directly; it does no I/O beyond reading the file it is given.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "PlantArrays",
    "PlantConfig",
    "PlantConfigError",
    "compile_plant",
    "format_duration",
    "load_plant",
    "parse_duration",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


class PlantConfigError(ValueError):
    """A plant config is invalid; the message names each bad key and value."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration written like ``8h``, ``30m``, ``90s``, ``1.5h`` or ``45`` (s)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ValueError(
                f"duration {text!r} is not understood; write it like 8h, 30m, 90s or 1.5h"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} must be finite")
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact form that :func:`parse_duration` reads back:
    ``28800`` -> ``8h``, ``5400`` -> ``90m``, ``90`` -> ``90s``, ``1.5`` -> ``1.5s``."""
    if float(seconds).is_integer():
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds!r}s"


class _Strict(BaseModel):
    # strict: no coercion (YAML's `yes` is not 1.0, "3" is not 3); no inf or nan anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Positive = Field(gt=0)
NonNegative = Field(ge=0)
Fraction = Field(ge=0, le=1)


class SpeedSpec(_Strict):
    """Speed setpoint limits, as multiples of the rated speed (processing time / speed)."""

    min: float = Field(0.6, gt=0)
    nominal: float = Field(1.0, gt=0)
    max: float = Field(1.3, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> SpeedSpec:
        if not self.min <= self.nominal <= self.max:
            raise ValueError(
                f"need min <= nominal <= max, got {self.min}, {self.nominal}, {self.max}"
            )
        return self


class PowerSpec(_Strict):
    """Electrical power: ``idle_kw + load_kw * load * speed**exponent * (1 + wear_gain*(1-health))``
    while running an operation of relative ``load``, ``idle_kw`` when idle, ``down_kw``
    during repair or maintenance."""

    idle_kw: float = Field(1.0, ge=0)
    load_kw: float = Field(8.0, ge=0)
    exponent: float = Field(2.5, ge=1)
    down_kw: float = Field(0.2, ge=0)
    wear_gain: float = Field(0.15, ge=0)


class WearSpec(_Strict):
    """Health (1 new, 0 worn out) falls while running an operation of relative ``load`` at
    ``rate_per_hour * load * speed**speed_exponent``.

    Machines do not start a shift new: each starts with a health drawn uniformly from
    ``[initial_health_min, initial_health_max]``.
    """

    rate_per_hour: float = Field(0.02, ge=0)
    speed_exponent: float = Field(2.0, ge=0)
    initial_health_min: float = Field(1.0, ge=0, le=1)
    initial_health_max: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> WearSpec:
        if self.initial_health_min > self.initial_health_max:
            raise ValueError("need initial_health_min <= initial_health_max")
        return self


class FailureSpec(_Strict):
    """Breakdown hazard while running: ``base_rate_per_hour * exp(health_sensitivity*(1-h))``."""

    base_rate_per_hour: float = Field(0.002, ge=0)
    health_sensitivity: float = Field(6.0, ge=0)


class RepairSpec(_Strict):
    """Repair time after a breakdown: lognormal with this mean and coefficient of variation.
    A repair replaces the failed part and restores health to ``restores_health_to``."""

    mean_hours: float = Field(3.0, gt=0)
    cv: float = Field(0.5, ge=0)
    restores_health_to: float = Field(1.0, ge=0, le=1)


class MaintenanceSpec(_Strict):
    """Planned maintenance: takes ``duration_hours`` (shorter than a repair), restores health."""

    duration_hours: float = Field(0.5, gt=0)
    restores_health_to: float = Field(1.0, ge=0, le=1)


class QualitySpec(_Strict):
    """Defect probability per operation:
    ``base_rate * exp(speed_sensitivity*(speed-nominal) + wear_sensitivity*(1-health))``."""

    base_rate: float = Field(0.01, ge=0, le=1)
    speed_sensitivity: float = Field(3.0, ge=0)
    wear_sensitivity: float = Field(2.5, ge=0)


class SensorSpec(_Strict):
    """How vibration, temperature and power readings follow health, speed and load.

    Vibration (mm/s RMS) while running: ``vibration_mm_s * speed * sqrt(load) *
    (1 + vibration_wear_gain * (1-health)**2)``; idle machines read
    ``vibration_idle_mm_s``. Temperature relaxes toward
    ``ambient_c + rise_c_per_kw * power_kw * (1 + temperature_wear_gain*(1-health))`` with
    time constant ``time_constant_minutes``. Every reading carries Gaussian noise with the
    given relative standard deviation.
    """

    vibration_mm_s: float = Field(2.0, gt=0)
    vibration_idle_mm_s: float = Field(0.3, ge=0)
    vibration_wear_gain: float = Field(4.0, ge=0)
    ambient_c: float = 25.0
    rise_c_per_kw: float = Field(3.0, ge=0)
    temperature_wear_gain: float = Field(0.5, ge=0)
    time_constant_minutes: float = Field(10.0, gt=0)
    noise: float = Field(0.05, ge=0, le=1)


class MachineType(_Strict):
    """Shared parameters of a kind of machine; machines refer to it by name."""

    capabilities: list[str] = Field(min_length=1)
    speed: SpeedSpec = SpeedSpec()
    power: PowerSpec = PowerSpec()
    wear: WearSpec = WearSpec()
    failure: FailureSpec = FailureSpec()
    repair: RepairSpec = RepairSpec()
    maintenance: MaintenanceSpec = MaintenanceSpec()
    quality: QualitySpec = QualitySpec()
    sensors: SensorSpec = SensorSpec()

    @model_validator(mode="after")
    def _maintenance_shorter_than_repair(self) -> MachineType:
        if self.maintenance.duration_hours >= self.repair.mean_hours:
            raise ValueError(
                f"maintenance.duration_hours ({self.maintenance.duration_hours}) must be less "
                f"than repair.mean_hours ({self.repair.mean_hours}): planned maintenance is "
                "what avoids the longer repair"
            )
        return self


class MachineEntry(_Strict):
    """Machines of one type on a line. With ``count > 1`` the name is a pattern with
    ``{i}`` (1-based), e.g. ``mill-{i}``."""

    name: str = Field(min_length=1)
    type: str
    count: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _pattern(self) -> MachineEntry:
        if self.count > 1 and "{i}" not in self.name:
            raise ValueError(f"name {self.name!r} needs '{{i}}' when count > 1")
        return self

    def names(self) -> list[str]:
        if self.count == 1:
            return [self.name.replace("{i}", "1")]
        return [self.name.replace("{i}", str(i + 1)) for i in range(self.count)]


class LineSpec(_Strict):
    name: str = Field(min_length=1)
    machines: list[MachineEntry] = Field(min_length=1)


class RouteStep(_Strict):
    """One operation of a product: the capability it needs, its time at speed 1, and the
    raw material it consumes when it starts."""

    capability: str
    minutes: float = Field(gt=0)
    material: str | None = None
    quantity: float = Field(1.0, gt=0)
    #: Relative load of the operation (1 = the machine type's rated load): scales the
    #: load power, the wear rate and the vibration.
    load: float = Field(1.0, gt=0, le=3)


class ProductSpec(_Strict):
    name: str = Field(min_length=1)
    route: list[RouteStep] = Field(min_length=1)
    mix: float = Field(1.0, gt=0)


class OrdersSpec(_Strict):
    """Orders: ``initial`` at the start of the shift, then a Poisson stream at
    ``rate_per_hour``; product by ``mix`` weight; due at arrival + ``due_slack`` x route time."""

    initial: int = Field(10, ge=0)
    rate_per_hour: float = Field(4.0, ge=0)
    due_slack: float = Field(3.0, gt=0)


class MaterialSpec(_Strict):
    """Raw material stock with a reorder-point policy and a supplier that can slip."""

    name: str = Field(min_length=1)
    initial_stock: float = Field(ge=0)
    reorder_point: float = Field(ge=0)
    reorder_quantity: float = Field(gt=0)
    lead_time_hours: float = Field(gt=0)
    disruption_probability: float = Field(0.0, ge=0, le=1)
    disruption_delay_hours: float = Field(0.0, ge=0)


class EnergySpec(_Strict):
    """Plant-level energy: a peak cap, a base load, an hourly time-of-use tariff and an
    hourly grid carbon intensity (24 values each, index = hour of the day)."""

    peak_cap_kw: float = Field(gt=0)
    base_load_kw: float = Field(0.0, ge=0)
    currency: str = "EUR"
    tariff_per_kwh: list[float] = Field(min_length=24, max_length=24)
    carbon_g_per_kwh: list[float] = Field(min_length=24, max_length=24)

    @field_validator("tariff_per_kwh", "carbon_g_per_kwh")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError("every hourly value must be >= 0")
        return v


class DynamicsSwitches(_Strict):
    """Each dynamic can be switched off; off means the simple job shop's behaviour."""

    speed: bool = True
    energy: bool = True
    wear: bool = True
    failures: bool = True
    sensors: bool = True
    orders: bool = True
    supply: bool = True
    quality: bool = True


class PlantConfig(_Strict):
    """A whole plant, as written in its YAML file."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    horizon: str | float = "8h"
    shift_start_hour: float = Field(6.0, ge=0, lt=24)
    decision_interval_minutes: float = Field(15.0, gt=0)
    on_defect: Literal["scrap", "rework"] = "scrap"
    machine_types: dict[str, MachineType] = Field(min_length=1)
    lines: list[LineSpec] = Field(min_length=1)
    products: list[ProductSpec] = Field(min_length=1)
    orders: OrdersSpec = OrdersSpec()
    materials: list[MaterialSpec] = []
    energy: EnergySpec
    dynamics: DynamicsSwitches = DynamicsSwitches()

    @field_validator("horizon")
    @classmethod
    def _horizon(cls, v: str | float) -> str | float:
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _references(self) -> PlantConfig:
        names: set[str] = set()
        capabilities: set[str] = set()
        for li, line in enumerate(self.lines):
            for mi, entry in enumerate(line.machines):
                where = f"lines[{li}].machines[{mi}]"
                if entry.type not in self.machine_types:
                    raise ValueError(
                        f"{where}.type: unknown machine type {entry.type!r} "
                        f"(defined: {sorted(self.machine_types)})"
                    )
                for n in entry.names():
                    if n in names:
                        raise ValueError(f"{where}.name: machine name {n!r} is used twice")
                    names.add(n)
                capabilities.update(self.machine_types[entry.type].capabilities)
        if len({line.name for line in self.lines}) != len(self.lines):
            raise ValueError("lines: line names must be unique")
        materials = {m.name for m in self.materials}
        if len(materials) != len(self.materials):
            raise ValueError("materials: material names must be unique")
        if len({p.name for p in self.products}) != len(self.products):
            raise ValueError("products: product names must be unique")
        for pi, product in enumerate(self.products):
            for si, step in enumerate(product.route):
                where = f"products[{pi}].route[{si}]"
                if step.capability not in capabilities:
                    raise ValueError(
                        f"{where}.capability: no machine offers {step.capability!r} "
                        f"(offered: {sorted(capabilities)})"
                    )
                if step.material is not None and step.material not in materials:
                    raise ValueError(
                        f"{where}.material: unknown material {step.material!r} "
                        f"(defined: {sorted(materials)})"
                    )
        return self

    @property
    def horizon_seconds(self) -> float:
        return parse_duration(self.horizon)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = (
            ""
            if e["type"] in ("missing",) or isinstance(value, dict | list)
            else (f" (got {value!r})")
        )
        lines.append(f"  {loc or '<top>'}: {msg}{shown}")
    return f"invalid plant config {source}:\n" + "\n".join(lines)


def load_plant(source: str | Path | Mapping[str, Any] | PlantConfig) -> PlantConfig:
    """Load and validate a plant config from a YAML path, a mapping, or a config.

    A name without a path separator or suffix (``"demo"``) refers to the shipped
    ``configs/<name>.yaml``.
    """
    if isinstance(source, PlantConfig):
        return source
    if isinstance(source, Mapping):
        data: Any = source
        where = "(mapping)"
    else:
        path = _resolve_config_path(source)
        where = str(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as exc:
            raise PlantConfigError(f"plant config {where} is not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise PlantConfigError(f"plant config {where} cannot be read: {exc}") from None
        except yaml.YAMLError as exc:
            raise PlantConfigError(f"plant config {where} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise PlantConfigError(
                f"plant config {where} must be a YAML mapping, got {type(data).__name__}"
            )
    try:
        return PlantConfig.model_validate(data)
    except ValidationError as exc:
        raise PlantConfigError(_format_errors(exc, where)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (YAML would keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def shipped_configs_dir() -> Path:
    """Where the shipped plant YAMLs are: the ``autofab.configs`` data package (the
    top-level ``configs/`` folder, in a checkout or an editable install)."""
    spec = importlib.util.find_spec("autofab.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "configs"


def _resolve_config_path(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    text = str(source)
    if "/" not in text and "\\" not in text and not path.suffix:
        for folder in (shipped_configs_dir(), Path.cwd() / "configs"):
            candidate = folder / f"{text}.yaml"
            if candidate.is_file():
                return candidate
    raise PlantConfigError(
        f"plant config {text!r} not found (give a YAML path, or a shipped name such as 'demo')"
    )


# --------------------------------------------------------------------------- compiled


@dataclass(frozen=True, eq=False)
class PlantArrays:
    """A plant config flattened into per-machine and per-material numpy arrays (SI units)."""

    config: PlantConfig
    machine_names: tuple[str, ...]
    machine_line: IntArray
    line_names: tuple[str, ...]
    machine_capabilities: tuple[frozenset[str], ...]
    speed_min: FloatArray
    speed_nominal: FloatArray
    speed_max: FloatArray
    idle_w: FloatArray
    load_w: FloatArray
    power_exponent: FloatArray
    down_w: FloatArray
    power_wear_gain: FloatArray
    wear_per_s: FloatArray
    wear_speed_exponent: FloatArray
    health0_min: FloatArray
    health0_max: FloatArray
    hazard_per_s: FloatArray
    hazard_sensitivity: FloatArray
    repair_mean_s: FloatArray
    repair_cv: FloatArray
    repair_health: FloatArray
    maintenance_s: FloatArray
    maintenance_health: FloatArray
    defect_base: FloatArray
    defect_speed: FloatArray
    defect_wear: FloatArray
    vib_mm_s: FloatArray
    vib_idle_mm_s: FloatArray
    vib_wear_gain: FloatArray
    ambient_c: FloatArray
    rise_c_per_w: FloatArray
    temp_wear_gain: FloatArray
    temp_tau_s: FloatArray
    sensor_noise: FloatArray
    material_names: tuple[str, ...]
    material_initial: FloatArray
    material_reorder_point: FloatArray
    material_reorder_qty: FloatArray
    material_lead_s: FloatArray
    material_disruption_p: FloatArray
    material_disruption_s: FloatArray
    tariff_per_j: FloatArray  # (24,) price per joule by hour of day
    carbon_g_per_j: FloatArray  # (24,) grams CO2 per joule by hour of day

    @property
    def n_machines(self) -> int:
        return len(self.machine_names)


def compile_plant(config: PlantConfig) -> PlantArrays:
    """Flatten a validated config into arrays, converting to seconds, watts and joules."""
    rows: list[tuple[str, int, MachineType]] = []
    for li, line in enumerate(config.lines):
        for entry in line.machines:
            for n in entry.names():
                rows.append((n, li, config.machine_types[entry.type]))

    def col(get: Any, scale: float = 1.0) -> FloatArray:
        return np.array([float(get(t)) * scale for _, _, t in rows])

    hour = 3600.0
    kwh = 3.6e6
    mats = config.materials
    return PlantArrays(
        config=config,
        machine_names=tuple(n for n, _, _ in rows),
        machine_line=np.array([li for _, li, _ in rows], dtype=np.int64),
        line_names=tuple(line.name for line in config.lines),
        machine_capabilities=tuple(frozenset(t.capabilities) for _, _, t in rows),
        speed_min=col(lambda t: t.speed.min),
        speed_nominal=col(lambda t: t.speed.nominal),
        speed_max=col(lambda t: t.speed.max),
        idle_w=col(lambda t: t.power.idle_kw, 1e3),
        load_w=col(lambda t: t.power.load_kw, 1e3),
        power_exponent=col(lambda t: t.power.exponent),
        down_w=col(lambda t: t.power.down_kw, 1e3),
        power_wear_gain=col(lambda t: t.power.wear_gain),
        wear_per_s=col(lambda t: t.wear.rate_per_hour, 1 / hour),
        wear_speed_exponent=col(lambda t: t.wear.speed_exponent),
        health0_min=col(lambda t: t.wear.initial_health_min),
        health0_max=col(lambda t: t.wear.initial_health_max),
        hazard_per_s=col(lambda t: t.failure.base_rate_per_hour, 1 / hour),
        hazard_sensitivity=col(lambda t: t.failure.health_sensitivity),
        repair_mean_s=col(lambda t: t.repair.mean_hours, hour),
        repair_cv=col(lambda t: t.repair.cv),
        repair_health=col(lambda t: t.repair.restores_health_to),
        maintenance_s=col(lambda t: t.maintenance.duration_hours, hour),
        maintenance_health=col(lambda t: t.maintenance.restores_health_to),
        defect_base=col(lambda t: t.quality.base_rate),
        defect_speed=col(lambda t: t.quality.speed_sensitivity),
        defect_wear=col(lambda t: t.quality.wear_sensitivity),
        vib_mm_s=col(lambda t: t.sensors.vibration_mm_s),
        vib_idle_mm_s=col(lambda t: t.sensors.vibration_idle_mm_s),
        vib_wear_gain=col(lambda t: t.sensors.vibration_wear_gain),
        ambient_c=col(lambda t: t.sensors.ambient_c),
        rise_c_per_w=col(lambda t: t.sensors.rise_c_per_kw, 1e-3),
        temp_wear_gain=col(lambda t: t.sensors.temperature_wear_gain),
        temp_tau_s=col(lambda t: t.sensors.time_constant_minutes, 60.0),
        sensor_noise=col(lambda t: t.sensors.noise),
        material_names=tuple(m.name for m in mats),
        material_initial=np.array([m.initial_stock for m in mats], dtype=np.float64),
        material_reorder_point=np.array([m.reorder_point for m in mats], dtype=np.float64),
        material_reorder_qty=np.array([m.reorder_quantity for m in mats], dtype=np.float64),
        material_lead_s=np.array([m.lead_time_hours * hour for m in mats], dtype=np.float64),
        material_disruption_p=np.array([m.disruption_probability for m in mats], dtype=np.float64),
        material_disruption_s=np.array(
            [m.disruption_delay_hours * hour for m in mats], dtype=np.float64
        ),
        tariff_per_j=np.array(config.energy.tariff_per_kwh, dtype=np.float64) / kwh,
        carbon_g_per_j=np.array(config.energy.carbon_g_per_kwh, dtype=np.float64) / kwh,
    )
