"""The safety supervisor's pure checks: one test per rule and reason, then a safety property
over arbitrary sequences of requests, operator actions and machine status changes."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from autofab.agents.protocol import SetpointRequest
from autofab.control.supervisor import (
    BOOLEAN_VARIABLES,
    VARIABLES,
    Applied,
    Decision,
    Mode,
    SupervisorConfigError,
    SupervisorLimits,
    SupervisorState,
    decide,
    decide_batch,
    engage_estop,
    hold_override,
    initial_state,
    observe_status,
    predicted_power_kw,
    release_estop,
    release_override,
)
from autofab.envs.plant import load_plant

T0 = 1_000.0
MACHINE = {
    "speed_min": 0.6,
    "speed_nominal": 1.0,
    "speed_max": 1.3,
    "idle_kw": 1.0,
    "load_kw": 8.0,
    "exponent": 2.0,
    "down_kw": 0.2,
}


def make_limits(
    cap_kw: float = 100.0, speed_mode: Mode = "clamp", cap_mode: Mode = "clamp", **speed: Any
) -> SupervisorLimits:
    """Three identical machines: at nominal speed, running, each draws 1 + 8 = 9 kW."""
    return SupervisorLimits.validate_config(
        {
            "machines": {"m1": MACHINE, "m2": MACHINE, "m3": MACHINE},
            "speed_setpoint": {"mode": speed_mode, **speed},
            "power_cap": {"mode": cap_mode, "peak_cap_kw": cap_kw, "base_load_kw": 0.0},
        }
    )


def req(
    value: Any = 1.1,
    machine: str = "m1",
    variable: str = "speed_setpoint",
    at: Any = T0,
    ttl: Any = 10.0,
    origin: str = "agent",
    request_id: str = "r1",
) -> SetpointRequest:
    """A request built without validation, so it can carry what the wire would refuse."""
    return SetpointRequest.model_construct(
        request_id=request_id,
        machine=machine,
        variable=variable,
        value=value,
        requested_at=at,
        ttl_seconds=ttl,
        origin=origin,
    )


def one(
    request: SetpointRequest,
    limits: SupervisorLimits | None = None,
    state: SupervisorState | None = None,
    now: float = T0 + 1.0,
) -> tuple[Decision, SupervisorState]:
    limits = limits or make_limits()
    state = state or initial_state(limits, T0)
    return decide(state, request, now, limits)


# --- Limits ------------------------------------------------------------------------------


def test_limits_from_plant_take_each_machine_and_the_cap() -> None:
    plant = load_plant("demo")
    limits = SupervisorLimits.from_plant(plant, {"speed_setpoint": {"max_rate_per_second": 0.1}})
    assert limits.power_cap.peak_cap_kw == plant.energy.peak_cap_kw
    names = {n for line in plant.lines for e in line.machines for n in e.names()}
    assert set(limits.machines) == names
    assert limits.speed_setpoint.max_rate_per_second == 0.1
    assert limits.speed_setpoint.mode == "clamp"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"speed_setpoint": {"mode": "clip"}}, "speed_setpoint.mode"),
        ({"speed_setpoint": {"max_rate_per_second": -1.0}}, "speed_setpoint.max_rate_per_second"),
        ({"speed_setpoint": {"max": 0.1}}, "speed_setpoint.max"),
        ({"speed_setpoint": {"min": 1.2, "max": 1.1}}, "speed_setpoint.min"),
        ({"power_cap": {"peak_cap_kw": math.nan}}, "power_cap.peak_cap_kw"),
        ({"speed_limit": {}}, "speed_limit: unknown key"),
    ],
)
def test_bad_limits_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(SupervisorConfigError, match=key.replace(".", r"\.")):
        SupervisorLimits.from_plant(load_plant("demo"), overrides)


def test_tighter_bounds_narrow_the_machine_range() -> None:
    limits = make_limits(min=0.8, max=1.2)
    assert limits.speed_bounds("m1") == (0.8, 1.2)
    assert make_limits().speed_bounds("m1") == (0.6, 1.3)


# --- One rule at a time ------------------------------------------------------------------


def test_a_good_request_is_applied_and_remembered() -> None:
    d, state = one(req(1.1))
    assert (d.outcome, d.value, d.reason) == ("applied", 1.1, "ok")
    assert state.value("m1", "speed_setpoint") == 1.1
    assert state.applied[("m1", "speed_setpoint")].applied_at == T0 + 1.0


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (req(machine="ghost"), "unknown_machine"),
        (req(variable="spd"), "unknown_variable"),
        (req(math.nan), "non_finite"),
        (req(math.inf), "non_finite"),
        (req(-math.inf, variable="run"), "non_finite"),
        (req(True), "wrong_type"),
        (req("1.1"), "wrong_type"),
        (req(None), "wrong_type"),
        (req(0.5, variable="run"), "wrong_type"),
        (req(2.0, variable="maintenance_request"), "wrong_type"),
        (req(at=T0 - 20.0), "stale"),
        (req(at=math.nan), "stale"),
        (req(ttl=math.inf), "stale"),
        (req(ttl=0.0), "stale"),
        (req(at=T0 + 60.0), "clock_skew"),
    ],
)
def test_rejections(request_: SetpointRequest, reason: str) -> None:
    limits = make_limits()
    state = initial_state(limits, T0)
    d, after = decide(state, request_, T0 + 1.0, limits)
    assert (d.outcome, d.value, d.reason) == ("rejected", None, reason)
    assert after is state
    assert d.detail


def test_booleans_accept_0_1_and_bool() -> None:
    for raw, expected in ((0.0, False), (1.0, True), (False, False), (True, True), (1, True)):
        d, _ = one(req(raw, variable="run"))
        assert (d.outcome, d.value) == ("applied", expected)
        assert isinstance(d.value, bool)


def test_out_of_order_is_dropped() -> None:
    d, state = one(req(1.1, at=T0 + 0.5))
    assert d.outcome == "applied"
    d, _ = decide(state, req(0.9, at=T0 + 0.4), T0 + 2.0, make_limits())
    assert (d.outcome, d.reason) == ("rejected", "out_of_order")
    d, _ = decide(state, req(1.0, at=T0 + 0.5), T0 + 2.0, make_limits())
    assert d.outcome == "applied"


@pytest.mark.parametrize(("mode", "outcome"), [("clamp", "clamped"), ("reject", "rejected")])
def test_bounds_clamp_or_reject(mode: Mode, outcome: str) -> None:
    limits = make_limits(speed_mode=mode, max=1.2)
    d, _ = one(req(5.0, at=T0 + 99), limits, now=T0 + 100.0)
    assert (d.outcome, d.reason) == (outcome, "out_of_bounds")
    assert d.value == (1.2 if mode == "clamp" else None)
    d, _ = one(req(-1.0, at=T0 + 99), limits, now=T0 + 100.0)
    assert d.value == (0.6 if mode == "clamp" else None)


@pytest.mark.parametrize(("mode", "outcome"), [("clamp", "clamped"), ("reject", "rejected")])
def test_rate_limit_clamps_or_rejects(mode: Mode, outcome: str) -> None:
    limits = make_limits(speed_mode=mode, max_rate_per_second=0.2)
    d, _ = one(req(1.3), limits, now=T0 + 0.5)
    assert (d.outcome, d.reason) == (outcome, "rate_limit")
    if mode == "clamp":
        assert d.value == pytest.approx(1.1)
    d, _ = one(req(1.05), limits, now=T0 + 0.5)
    assert d.outcome == "applied"


def test_rate_limit_counts_from_the_last_write() -> None:
    limits = make_limits(max_rate_per_second=0.2)
    state = initial_state(limits, T0)
    _, state = decide(state, req(1.1, at=T0), T0 + 0.5, limits)
    d, _ = decide(state, req(1.3, at=T0 + 0.6), T0 + 0.6, limits)
    assert d.value == pytest.approx(1.12)
    d, _ = decide(state, req(1.3, at=T0), T0 + 0.4, limits)
    assert (d.reason, d.value) == ("rate_limit", 1.1)


def test_manual_override_ignores_agents_but_not_the_holder() -> None:
    limits = make_limits()
    state = hold_override(initial_state(limits, T0), "m1", "operator")
    d, _ = decide(state, req(1.1, origin="agent"), T0 + 1, limits)
    assert (d.reason, d.detail.startswith("manual override")) == ("manual_override", True)
    d, _ = decide(state, req(1.1, origin="operator"), T0 + 1, limits)
    assert d.outcome == "applied"
    d, _ = decide(state, req(1.1, machine="m2"), T0 + 1, limits)
    assert d.outcome == "applied"
    d, _ = decide(release_override(state, "m1"), req(1.1), T0 + 1, limits)
    assert d.outcome == "applied"


def test_estop_forces_stops_and_lets_only_stops_through() -> None:
    limits = make_limits()
    state, writes = engage_estop(initial_state(limits, T0), T0 + 1)
    assert {(w.machine, w.variable, w.value) for w in writes} == {
        (m, "run", False) for m in ("m1", "m2", "m3")
    }
    assert all(state.value(m, "run") is False for m in ("m1", "m2", "m3"))
    for request in (req(1.1, at=T0 + 1), req(1.0, variable="run", at=T0 + 1)):
        d, _ = decide(state, request, T0 + 2, limits)
        assert d.reason == "estop"
    d, _ = decide(state, req(0.0, variable="maintenance_request", at=T0 + 1), T0 + 2, limits)
    assert d.outcome == "applied"
    # A run request made before the stop must not replay it after the release.
    released = release_estop(state)
    d, _ = decide(released, req(1.0, variable="run", at=T0 + 0.5), T0 + 2, limits)
    assert d.reason == "out_of_order"
    d, _ = decide(released, req(1.0, variable="run", at=T0 + 2), T0 + 2, limits)
    assert d.outcome == "applied"


@pytest.mark.parametrize(
    ("status", "reason"), [("down", "fault"), (2, "fault"), (3, "maintenance_lock")]
)
def test_fault_and_maintenance_allow_only_stops(status: Any, reason: str) -> None:
    limits = make_limits()
    state = observe_status(initial_state(limits, T0), "m1", status)
    for request in (req(1.1), req(1.0, variable="run"), req(1.0, variable="maintenance_request")):
        d, _ = decide(state, request, T0 + 1, limits)
        assert d.reason == reason
    d, _ = decide(state, req(0.0, variable="run"), T0 + 1, limits)
    assert d.outcome == "applied"
    d, _ = decide(observe_status(state, "m1", "idle"), req(1.1), T0 + 1, limits)
    assert d.outcome == "applied"


def test_observe_status_refuses_unknown_machines_and_codes() -> None:
    state = initial_state(make_limits(), T0)
    with pytest.raises(ValueError, match="ghost"):
        observe_status(state, "ghost", "idle")
    with pytest.raises(ValueError, match="code 7"):
        observe_status(state, "m1", 7)


def test_predicted_power_follows_run_speed_and_status() -> None:
    limits = make_limits()
    state = initial_state(limits, T0)
    assert predicted_power_kw(state, limits) == pytest.approx(27.0)
    _, stopped = decide(state, req(0.0, variable="run"), T0 + 1, limits)
    assert predicted_power_kw(stopped, limits) == pytest.approx(19.0)
    # A cycle stop: a running operation still draws its load until it ends.
    running = observe_status(stopped, "m1", "running")
    assert predicted_power_kw(running, limits) == pytest.approx(27.0)
    down = observe_status(state, "m1", "down")
    assert predicted_power_kw(down, limits) == pytest.approx(18.2)


def test_power_cap_clamps_a_speed_increase_to_the_highest_that_fits() -> None:
    limits = make_limits(cap_kw=29.0)  # 2 kW of headroom over 27 kW
    d, state = one(req(1.3), limits, now=T0 + 10)
    assert (d.outcome, d.reason) == ("clamped", "power_cap")
    assert isinstance(d.value, float)
    assert d.value == pytest.approx(math.sqrt(10 / 8), rel=1e-9)
    assert predicted_power_kw(state, limits) <= 29.0


def test_power_cap_rejects_per_config_and_for_booleans() -> None:
    limits = make_limits(cap_kw=29.0, cap_mode="reject")
    d, _ = one(req(1.3), limits, now=T0 + 10)
    assert (d.outcome, d.reason) == ("rejected", "power_cap")
    limits = make_limits(cap_kw=20.0)
    state = initial_state(limits, T0, runs={"m1": False, "m2": False, "m3": True})
    _, state = decide(state, req(1.0, variable="run", machine="m2"), T0 + 1, limits)
    d, _ = decide(state, req(1.0, variable="run", machine="m1"), T0 + 1, limits)
    assert (d.outcome, d.reason) == ("rejected", "power_cap")


def test_shedding_load_passes_even_over_the_cap() -> None:
    limits = make_limits(cap_kw=10.0)  # already at 27 kW
    d, _ = one(req(0.8), limits)
    assert d.outcome == "applied"
    d, _ = one(req(0.0, variable="run"), limits)
    assert d.outcome == "applied"


def test_batch_sees_earlier_decisions_and_keeps_order() -> None:
    limits = make_limits(cap_kw=29.0)
    requests = [req(1.1, machine="m1", request_id="a"), req(1.1, machine="m2", request_id="b")]
    decisions, state = decide_batch(initial_state(limits, T0), requests, T0 + 10, limits)
    assert [d.request_id for d in decisions] == ["a", "b"]
    assert decisions[0].outcome == "applied"  # 1 + 8 * 1.21 = 10.68: 1.68 of 2 kW
    assert (decisions[1].outcome, decisions[1].reason) == ("clamped", "power_cap")
    assert predicted_power_kw(state, limits) <= 29.0


def many_machines(count: int, cap_kw: float, cap_mode: Mode) -> SupervisorLimits:
    machines = {f"m{i}": {**MACHINE, "load_kw": 8.0 + i % 7 * 0.37} for i in range(count)}
    return SupervisorLimits.validate_config(
        {
            "machines": machines,
            "speed_setpoint": {"max_rate_per_second": 10.0},
            "power_cap": {"mode": cap_mode, "peak_cap_kw": cap_kw, "base_load_kw": 0.3},
        }
    )


@settings(max_examples=150, deadline=None)
@given(
    count=st.sampled_from([3, 70, 300]),
    # Where the cap sits relative to the power at start: far off, or a hair either side.
    headroom=st.one_of(
        st.floats(-5.0, 5.0), st.sampled_from([0.0, 1e-13, -1e-13, 1e-9, 1e-15]), st.just(1e9)
    ),
    cap_mode=st.sampled_from(["clamp", "reject"]),
    script=st.lists(
        st.tuples(st.integers(0, 299), st.sampled_from(VARIABLES), st.floats(0.0, 1.4)),
        min_size=1,
        max_size=700,
    ),
)
def test_a_batch_decides_exactly_as_one_request_at_a_time(
    count: int, headroom: float, cap_mode: Mode, script: list[tuple[int, str, float]]
) -> None:
    """decide_batch keeps a running power estimate instead of summing every machine per
    request; near the cap it must fall back to the exact sums, so its decisions and final
    state are those of :func:`decide` called request by request."""
    speeds = {f"m{i}": 0.6 + (i * 0.618034) % 0.7 for i in range(count)}
    probe = many_machines(count, 1e9, cap_mode)
    start = initial_state(probe, T0, speeds=speeds)
    limits = many_machines(count, predicted_power_kw(start, probe) + headroom, cap_mode)
    requests = [
        req(
            value if variable == "speed_setpoint" else float(value > 0.7),
            machine=f"m{i % count}",
            variable=variable,
            at=T0 + 1,
            request_id=f"r{n}",
        )
        for n, (i, variable, value) in enumerate(script)
    ]
    now = T0 + 2
    batch_decisions, batch_state = decide_batch(start, requests, now, limits)
    state = start
    for request, from_batch in zip(requests, batch_decisions, strict=True):
        decision, state = decide(state, request, now, limits)
        assert decision == from_batch
    assert dict(batch_state.applied) == dict(state.applied)
    assert predicted_power_kw(batch_state, limits) <= max(
        limits.power_cap.peak_cap_kw, predicted_power_kw(start, limits)
    )


@settings(max_examples=40, deadline=None)
@given(
    count=st.sampled_from([70, 300]),
    steps=st.lists(st.floats(1e-6, 1e-3), min_size=2, max_size=300),
    at=st.floats(0.0, 1.0),
)
def test_the_power_estimate_never_lets_a_raise_past_the_cap(
    count: int, steps: list[float], at: float
) -> None:
    """A cap one rounding unit below the plant's power after the k-th of many small speed
    raises (each on another machine): the k-th must be clamped, whatever the running
    estimate's rounding says, and no decision may end above the cap by the exact sum."""
    speeds = {f"m{i}": 0.6 + (i * 0.618034) % 0.1 for i in range(count)}
    unlimited = many_machines(count, 1e9, "clamp")
    start = initial_state(unlimited, T0, speeds=speeds)
    requests = [
        req(speeds[f"m{n}"] + step, machine=f"m{n}", at=T0 + 1, request_id=f"r{n}")
        for n, step in enumerate(steps[:count])
    ]
    k = min(len(requests) - 1, int(at * len(requests)))
    decisions, state = decide_batch(start, requests[: k + 1], T0 + 2, unlimited)
    assert all(d.outcome == "applied" for d in decisions)
    cap = math.nextafter(predicted_power_kw(state, unlimited), 0.0)
    limits = many_machines(count, cap, "clamp")

    decisions, _ = decide_batch(start, requests, T0 + 2, limits)
    assert [d.outcome for d in decisions[:k]] == ["applied"] * k
    assert (decisions[k].outcome, decisions[k].reason) == ("clamped", "power_cap")
    applied = dict(start.applied)
    for n, d in enumerate(decisions):
        if d.value is not None:
            applied[(d.machine, d.variable)] = Applied(d.value, T0 + 1, T0 + 2)
        if n >= k:
            assert predicted_power_kw(replace(start, applied=applied), limits) <= cap


# --- The safety property -----------------------------------------------------------------

MACHINES = ("m1", "m2", "m3")
ORIGINS = ("agent", "operator", "night-shift")

# Mostly plausible requests (so many are applied or clamped), with every kind of bad one.
values = st.one_of(
    st.floats(0.5, 1.5),
    st.floats(0.5, 1.5),
    st.sampled_from([0.0, 1.0, 0.0, 1.0, 0.6, 1.3, -1.0, 1e300, math.nan, math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["1.0", None]),
)
requests = st.builds(
    req,
    value=values,
    machine=st.sampled_from((*MACHINES, *MACHINES, "ghost")),
    variable=st.sampled_from((*VARIABLES, *VARIABLES, "speed_setpoint", "bogus")),
    at=st.one_of(st.floats(-2.0, 1.0), st.floats(-30.0, 10.0), st.just(math.nan)),  # from now
    ttl=st.one_of(st.floats(1.0, 20.0), st.floats(-1.0, 20.0), st.just(math.inf)),
    origin=st.sampled_from(ORIGINS),
    request_id=st.text("abc", min_size=1, max_size=4),
)
events = st.one_of(
    st.tuples(st.just("batch"), st.lists(requests, min_size=1, max_size=5)),
    st.tuples(st.just("advance"), st.floats(0.0, 5.0)),
    st.tuples(st.just("advance"), st.floats(0.0, 2.0)),
    st.tuples(st.just("hold"), st.sampled_from(MACHINES), st.sampled_from(ORIGINS)),
    st.tuples(st.just("release"), st.sampled_from(MACHINES)),
    st.tuples(st.just("estop")),
    st.tuples(st.just("release_estop")),
    st.tuples(st.just("status"), st.sampled_from(MACHINES), st.integers(0, 3)),
)


def shadow_power(written: dict[tuple[str, str], Any], status: dict[str, int]) -> float:
    """The plant power model, written again here so the test does not trust the module's."""
    total = 0.0
    for m in MACHINES:
        code = status.get(m)
        speed, run = written[(m, "speed_setpoint")][0], written[(m, "run")][0]
        if code in (2, 3):
            total += 0.2
        elif run or code == 1:
            total += 1.0 + 8.0 * speed**2
        else:
            total += 1.0
    return total


@settings(max_examples=1500, deadline=None)
@given(
    speed_mode=st.sampled_from(["clamp", "reject"]),
    cap_mode=st.sampled_from(["clamp", "reject"]),
    cap_kw=st.one_of(st.floats(26.0, 32.0), st.floats(5.0, 40.0)),  # 27 kW at start
    script=st.lists(events, max_size=25),
)
def test_safety_property(
    speed_mode: Mode, cap_mode: Mode, cap_kw: float, script: list[Any]
) -> None:
    """Whatever arrives, every value the supervisor says to write is within bounds and the
    rate limit, respects every interlock and the power cap, and each request gets exactly
    one decision."""
    rate = 0.2
    limits = make_limits(cap_kw, speed_mode, cap_mode, min=0.7, max=1.25, max_rate_per_second=rate)
    now = T0
    state = initial_state(limits, now, speeds=dict.fromkeys(MACHINES, 1.0))
    written: dict[tuple[str, str], tuple[Any, float]] = {
        (m, v): (state.value(m, v), now) for m in MACHINES for v in VARIABLES
    }
    status: dict[str, int] = {}
    overrides: dict[str, str] = {}
    estop = False
    for action in script:
        kind = action[0]
        if kind == "advance":
            now += action[1]
        elif kind == "hold":
            state, overrides[action[1]] = hold_override(state, action[1], action[2]), action[2]
        elif kind == "release":
            state = release_override(state, action[1])
            overrides.pop(action[1], None)
        elif kind == "estop":
            state, writes = engage_estop(state, now)
            estop = True
            assert {w.machine for w in writes} == set(MACHINES)
            for w in writes:
                assert w.value is False
                written[(w.machine, w.variable)] = (False, now)
        elif kind == "release_estop":
            state, estop = release_estop(state), False
        elif kind == "status":
            state = observe_status(state, action[1], action[2])
            status[action[1]] = action[2]
        else:
            batch = [r.model_copy(update={"requested_at": now + r.requested_at}) for r in action[1]]
            decisions, state = decide_batch(state, batch, now, limits)
            assert [d.request_id for d in decisions] == [r.request_id for r in batch]
            for d, r in zip(decisions, batch, strict=True):
                event(f"{d.outcome}: {d.reason}")
                assert (d.machine, d.variable, d.origin) == (r.machine, r.variable, r.origin)
                if d.outcome == "rejected":
                    assert d.value is None
                    continue
                assert d.value is not None
                assert r.machine in MACHINES
                assert r.variable in VARIABLES
                assert not isinstance(r.value, str | type(None))
                assert math.isfinite(float(r.value))
                assert r.requested_at + r.ttl_seconds >= now
                key = (r.machine, r.variable)
                holder = overrides.get(r.machine)
                assert holder is None or holder == r.origin
                is_stop = r.variable in BOOLEAN_VARIABLES and d.value is False
                if estop or status.get(r.machine) in (2, 3):
                    assert is_stop
                before = shadow_power(written, status)
                previous, at = written[key]
                if r.variable == "speed_setpoint":
                    assert isinstance(d.value, float)
                    assert 0.7 <= d.value <= 1.25
                    assert abs(d.value - previous) <= rate * (now - at) + 1e-9
                elif r.variable == "start_job":
                    assert isinstance(d.value, float)
                    assert d.value >= 0
                    assert d.value == int(d.value)
                else:
                    assert isinstance(d.value, bool)
                    assert r.value in (0, 1)
                written[key] = (d.value, now)
                after = shadow_power(written, status)
                assert after <= max(cap_kw, before) + 1e-9
    for (m, v), (value, _) in written.items():
        assert state.value(m, v) == value  # type: ignore[arg-type]
