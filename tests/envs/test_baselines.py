"""Baseline policies of the factory model: dispatch, maintenance and speed."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pytest

from autofab.envs.baselines import (
    ConditionBased,
    FactoryPolicy,
    FixedInterval,
    MaxSpeed,
    NominalSpeed,
    RunToFailure,
    TariffAwareSpeed,
    age_replacement_interval_s,
    policy_from_spec,
    run_policy,
    run_seeds,
)
from autofab.envs.factory_model import FactoryModel, run_shift
from autofab.envs.plant import PlantArrays, compile_plant, load_plant
from autofab.envs.rules import RULES

SPECS = [
    "rule:mwkr",
    "rule:spt+max",
    "rule:edd+fixed:2h",
    "rule:fifo+cbm",
    "rule:mwkr+cbm+tariff",
    "rule:lpt+fixed+tariff",
]


@pytest.fixture(scope="module")
def demo() -> PlantArrays:
    return compile_plant(load_plant("demo"))


def with_cap(kw: float, mill_load: float | None = None) -> PlantArrays:
    """The demo plant with another peak cap and, optionally, heavier milling operations."""
    data: dict[str, Any] = load_plant("demo").model_dump()
    data["energy"] = {**data["energy"], "peak_cap_kw": kw}
    if mill_load is not None:
        for product in data["products"]:
            for step in product["route"]:
                if step["capability"] == "mill":
                    step["load"] = mill_load
    return compile_plant(load_plant(data))


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


# --------------------------------------------------------------------------- running


@pytest.mark.parametrize("spec", SPECS)
def test_full_shift_is_deterministic(demo: PlantArrays, spec: str):
    first = run_policy(demo, spec, seed=3)
    assert first["sim_time_s"] == pytest.approx(demo.config.horizon_seconds)
    assert first["decisions"] > 0
    assert same(first, run_policy(demo, spec, seed=3))
    assert not same(first, run_policy(demo, spec, seed=4))


def test_a_reused_policy_object_resets_between_runs(demo: PlantArrays):
    policy = policy_from_spec("rule:mwkr+cbm+tariff")
    runs = run_seeds(demo, policy, [1, 2, 1])
    assert same(runs[0], runs[2])
    assert same(runs[0], run_policy(demo, "rule:mwkr+cbm+tariff", seed=1))


def test_dispatch_picks_the_rules_best_candidate(demo: PlantArrays):
    model = FactoryModel.from_config(demo, seed=0)
    model.advance_to_decision()
    for name in RULES:
        machine = int(model.needs_decision()[0])
        jobs = np.sort(model.candidates(machine))
        expected = int(jobs[np.argmin(RULES[name](model)[jobs])])
        assert FactoryPolicy(name)(model, machine).job == expected


# --------------------------------------------------------------------------- speed


@pytest.mark.parametrize(
    ("spec", "limit"), [("rule:mwkr", "speed_nominal"), ("rule:mwkr+max", "speed_max")]
)
def test_fixed_speed_policies_run_every_operation_at_their_speed(
    demo: PlantArrays, spec: str, limit: str
):
    model = FactoryModel.from_config(demo, seed=5)
    run_shift(model, policy_from_spec(spec))
    speeds = getattr(demo, limit)
    assert model.attempts
    assert all(a["speed"] == pytest.approx(speeds[a["machine"]]) for a in model.attempts)


def test_naive_speed_breaks_the_demo_cap(demo: PlantArrays):
    kpis = run_policy(demo, "rule:mwkr+max", seed=0)
    assert kpis["cap_violations"] > 0


@pytest.mark.parametrize("cap_kw", [None, 60.0, 45.0])
def test_tariff_aware_speed_never_breaks_the_cap(demo: PlantArrays, cap_kw: float | None):
    plant = demo if cap_kw is None else with_cap(cap_kw)
    for spec in ("rule:mwkr+tariff", "rule:spt+cbm+tariff"):
        for kpis in run_seeds(plant, spec, range(4)):
            assert kpis["cap_violations"] == 0, (spec, kpis)
            assert kpis["over_cap_s"] == 0
            assert kpis["peak_kw"] <= plant.config.energy.peak_cap_kw + 1e-9
            assert kpis["parts_good"] > 0


def test_tariff_aware_speed_counts_the_operations_load():
    plant = with_cap(50.0, mill_load=1.8)
    for kpis in run_seeds(plant, "rule:mwkr+cbm+tariff", range(3)):
        assert kpis["cap_violations"] == 0, kpis
        assert kpis["parts_good"] > 0


def test_condition_based_level_is_near_one_for_sound_machines_under_any_load():
    data: dict[str, Any] = load_plant("demo").model_dump()
    for kind in data["machine_types"].values():
        kind["wear"].update(initial_health_min=1.0, initial_health_max=1.0, rate_per_hour=0.0)
    for product in data["products"]:
        for step in product["route"]:
            step["load"] = 2.0
    plant = compile_plant(load_plant(data))
    model = FactoryModel.from_config(plant, seed=0)
    cbm = ConditionBased()
    policy = FactoryPolicy(maintenance=cbm)
    while model.now < 3600:
        model.advance_to_decision()
        for machine in model.needs_decision():
            d = policy(model, int(machine))
            model.decide(int(machine), d.job, d.speed, d.maintain)
    levels = cbm.level[np.isfinite(cbm.level)]
    assert len(levels) >= 4
    assert levels == pytest.approx(1.0, abs=0.15)
    assert model.maintenances.sum() == 0


def test_tariff_aware_speed_is_slower_in_expensive_hours(demo: PlantArrays):
    model = FactoryModel.from_config(demo, seed=0)
    model.advance_to_decision()
    machine = int(model.needs_decision()[0])
    job = int(model.candidates(machine)[0])
    policy = TariffAwareSpeed(capacity=1.0, window_s=1e9)  # backlog never binds
    cheap = policy.speed(model, machine, job)  # 06:00, the shift's cheapest hour
    model.run_until(2.5 * 3600)  # 08:30, the morning peak; nothing starts meanwhile
    dear = policy.speed(model, machine, job)
    assert cheap is not None
    assert dear is not None
    assert demo.speed_min[machine] <= dear < demo.speed_nominal[machine] < cheap
    assert cheap <= demo.speed_max[machine]


def test_tariff_aware_speed_waits_when_even_the_minimum_would_break_the_cap():
    plant = with_cap(24.0)  # base 15 kW + all idle 8.5 kW: no room for any load
    model = FactoryModel.from_config(plant, seed=0)
    model.advance_to_decision()
    machine = int(model.needs_decision()[0])
    job = int(model.candidates(machine)[0])
    assert TariffAwareSpeed().speed(model, machine, job) is None
    kpis = run_shift(model, policy_from_spec("rule:mwkr+tariff"))
    assert kpis["parts_good"] == 0
    assert kpis["cap_violations"] == 0


# --------------------------------------------------------------------------- maintenance


class GuardedModel(FactoryModel):
    """A model whose hidden state raises when code in the baselines module reads it."""

    _hidden = ("health", "budget")

    def __getattribute__(self, name: str) -> Any:
        if name in GuardedModel._hidden:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "autofab.envs.baselines":
                raise AssertionError(f"a baseline policy read the hidden {name!r}")
        return super().__getattribute__(name)


def test_guard_catches_a_policy_that_reads_health(demo: PlantArrays):
    model = GuardedModel.from_config(demo, seed=0)
    model.advance_to_decision()
    # The guard is keyed on the reading module; pretend to be the baselines module.
    code = compile("model.health", "<probe>", "eval")
    with pytest.raises(AssertionError, match="health"):
        eval(code, {"__name__": "autofab.envs.baselines", "model": model})


@pytest.mark.parametrize("spec", ["rule:mwkr+cbm", "rule:mwkr+cbm+tariff", "rule:mwkr+fixed"])
def test_policies_never_read_hidden_state(demo: PlantArrays, spec: str):
    guarded = run_shift(GuardedModel.from_config(demo, seed=2), policy_from_spec(spec))
    plain = run_shift(FactoryModel.from_config(demo, seed=2), policy_from_spec(spec))
    assert same(guarded, plain)
    assert guarded["maintenance"] > 0 or spec.endswith("fixed")


def test_run_to_failure_never_maintains(demo: PlantArrays):
    assert all(k["maintenance"] == 0 for k in run_seeds(demo, "rule:mwkr", range(3)))


def test_fixed_interval_maintains_after_its_run_hours(demo: PlantArrays):
    model = FactoryModel.from_config(demo, seed=1)
    policy = FactoryPolicy(maintenance=FixedInterval(3600.0))
    seen: list[float] = []

    def watched(m: FactoryModel, machine: int) -> Any:
        decision = policy(m, machine)
        if decision.maintain:
            seen.append(float(m.run_since_maintenance_s[machine]))
        return decision

    run_shift(model, watched)
    assert seen
    assert min(seen) >= 3600.0
    assert model.maintenances.sum() == len(seen)


def test_age_replacement_interval_on_the_demo(demo: PlantArrays):
    hours = age_replacement_interval_s(demo) / 3600
    names = demo.machine_names
    assert hours[names.index("mill-1")] == pytest.approx(7.45, abs=0.05)
    assert hours[names.index("grind-1")] < hours[names.index("mill-1")]
    assert hours[names.index("assembly-1")] > hours[names.index("drill-1")]
    thresholds = ConditionBased().thresholds(demo)
    assert thresholds[names.index("mill-1")] == pytest.approx(1.555, abs=0.01)


def test_age_replacement_never_maintains_without_wear():
    data: dict[str, Any] = load_plant("demo").model_dump()
    for kind in data["machine_types"].values():
        kind["wear"]["rate_per_hour"] = 0.0
    plant = compile_plant(load_plant(data))
    assert np.isinf(age_replacement_interval_s(plant)).all()
    assert np.isinf(ConditionBased().thresholds(plant)).all()


def test_condition_based_cuts_unplanned_downtime(demo: PlantArrays):
    seeds = range(6)
    rtf = sum(k["unplanned_downtime_s"] for k in run_seeds(demo, "rule:mwkr", seeds))
    cbm = sum(k["unplanned_downtime_s"] for k in run_seeds(demo, "rule:mwkr+cbm", seeds))
    assert cbm < 0.6 * rtf


def test_condition_based_reads_sensors_once_per_instant(demo: PlantArrays):
    model = FactoryModel.from_config(demo, seed=0)
    cbm = ConditionBased(threshold=5.0)
    policy = FactoryPolicy(maintenance=cbm)
    while model.now < 3600:
        model.advance_to_decision()
        for machine in model.needs_decision():
            d = policy(model, int(machine))
            model.decide(int(machine), d.job, d.speed, d.maintain)
    readings = np.isfinite(cbm.level)
    assert readings.any()
    # Only machines that have run have a level, and it is near 1 + gain * wear**2 >= 1.
    assert (cbm.level[readings] > 0.8).all()
    # A second call at the same instant takes no new reading: the RNG does not move.
    state = model.rng.bit_generator.state
    cbm.observe(model)
    assert model.rng.bit_generator.state == state


# --------------------------------------------------------------------------- specs


def test_spec_parts_build_the_policy():
    policy = policy_from_spec(" Rule:SPT + CBM:1.8 + Tariff ")
    assert policy.dispatch == "spt"
    assert isinstance(policy.maintenance, ConditionBased)
    assert policy.maintenance.threshold == 1.8
    assert isinstance(policy.speed, TariffAwareSpeed)
    assert policy.spec == "rule:spt+cbm:1.8+tariff"
    default = policy_from_spec("rule:mwkr")
    assert isinstance(default.maintenance, RunToFailure)
    assert isinstance(default.speed, NominalSpeed)
    fixed = policy_from_spec("max+fixed:90m+rule:edd")
    assert isinstance(fixed.speed, MaxSpeed)
    assert isinstance(fixed.maintenance, FixedInterval)
    assert fixed.maintenance.interval_s == 5400.0


@pytest.mark.parametrize(
    "spec",
    ["rule:mwkr", "rule:spt+max", "rule:edd+fixed", "rule:edd+fixed:90m", "rule:fifo+cbm+tariff"],
)
def test_spec_round_trips(spec: str):
    assert policy_from_spec(spec).spec == spec


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "empty part"),
        ("rule:mwkr++cbm", "empty part"),
        ("cbm", "no rule:NAME"),
        ("rule:nope", "'nope'"),
        ("rule:", "''"),
        ("rule:mwkr+warp", "'warp'"),
        ("rule:mwkr+tariff:2", "'tariff:2'"),
        ("rule:mwkr+rule:spt", "two dispatching rules"),
        ("rule:mwkr+cbm+fixed", "two maintenance"),
        ("rule:mwkr+max+tariff", "two speed"),
        ("rule:mwkr+cbm:0.5", "'0.5'"),
        ("rule:mwkr+cbm:high", "'high'"),
        ("rule:mwkr+fixed:8x", "'8x'"),
        ("rule:mwkr+rtf:2h", "rtf takes no argument"),
    ],
)
def test_bad_specs_name_the_part_and_the_valid_ones(spec: str, named: str):
    with pytest.raises(ValueError, match="policy") as info:
        policy_from_spec(spec)
    message = str(info.value)
    assert named in message
    if "cbm:" not in spec and "fixed:" not in spec:
        for part in ("rule:NAME", "mwkr", "rtf", "fixed[:INTERVAL]", "cbm[:THRESHOLD]", "tariff"):
            assert part in message


def test_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="dispatching rule"):
        FactoryPolicy("nope")
    with pytest.raises(ValueError, match="interval"):
        FixedInterval(0)
    with pytest.raises(ValueError, match="threshold"):
        ConditionBased(1.0)
    with pytest.raises(ValueError, match="alpha"):
        ConditionBased(alpha=0)
    with pytest.raises(ValueError, match="utilisation"):
        TariffAwareSpeed(utilisation=1.5)
