"""The learned bidding policy: honest bids, its file and refusals, the loader, a live run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autofab.envs  # noqa: F401  (registers the env ids)
from autofab.agents.bidding import BidContext, MachineSpec, RuleBasedBidding, honest_bid
from autofab.agents.energy import Tariff
from autofab.agents.policies.artifacts import PolicyLoadError, load_policy
from autofab.agents.policies.bidding_policy import (
    DEFAULT_BIDDING,
    FEATURES,
    SPEED_FEATURES,
    BiddingLoadError,
    LearnedBidding,
    bid_features,
    candidate_speeds,
    load_bidding_policy,
    read_bidding_file,
    run_episode,
    save_bidding_policy,
    train_bidding,
)
from autofab.agents.policies.dispatcher import DEFAULT_DISPATCHER, DispatcherPolicy
from autofab.agents.protocol import CallForProposals, OrderItem, OrderSubmit, Subjects
from autofab.agents.scenario import Scenario
from autofab.envs.plant import compile_plant, load_plant

CONFIG = load_plant("demo")
PLANT = compile_plant(CONFIG)
TARIFF = Tariff.from_plant(CONFIG)
SPECS = {name: MachineSpec.from_plant(PLANT, name) for name in PLANT.machine_names}
CAPABILITIES = sorted({c for spec in SPECS.values() for c in spec.capabilities})


def random_gate(seed: int, hidden: int = 0, max_passes: int = 2, speeds: int = 0) -> LearnedBidding:
    """Random weights: a gate, or with ``speeds`` a speed chooser."""
    rng = np.random.default_rng(seed)
    n, out = (len(SPEED_FEATURES), 2) if speeds else (len(FEATURES), 1)
    if hidden:
        layers = [
            (rng.normal(size=(n, hidden)), rng.normal(size=hidden)),
            (rng.normal(size=(hidden, out)), rng.normal(size=out)),
        ]
    else:
        layers = [(rng.normal(size=(n, out)), rng.normal(size=out))]
    return LearnedBidding(layers, {"note": "random"}, max_passes=max_passes, speeds=speeds)


@st.composite
def calls_and_contexts(draw: st.DrawFn) -> tuple[CallForProposals, BidContext]:
    name = draw(st.sampled_from(sorted(SPECS)))
    spec = SPECS[name]
    now = draw(st.floats(0.0, 30_000.0))
    ready = draw(st.floats(0.0, 30_000.0))
    call = CallForProposals(
        round_id="r1",
        job=draw(st.sampled_from(["j1", "j2"])),
        op=draw(st.integers(0, 3)),
        capability=draw(st.sampled_from(CAPABILITIES)),
        ready_at=ready,
        due_at=max(ready + draw(st.floats(-5_000.0, 50_000.0)), 0.0),
        processing_seconds=draw(st.floats(1.0, 7_200.0)),
        load=draw(st.floats(0.1, 3.0)),
        deadline=1.0,
    )
    context = BidContext(
        machine=name,
        spec=spec,
        speed=draw(st.floats(spec.speed_min, spec.speed_max)),
        health=draw(st.floats(0.0, 1.0)),
        queue_end_at=now + draw(st.floats(0.0, 20_000.0)),
        now=now,
        tariff=TARIFF,
    )
    return call, context


@settings(max_examples=200, deadline=None)
@given(case=calls_and_contexts(), seed=st.integers(0, 50), hidden=st.sampled_from([0, 3]))
def test_a_bid_is_the_honest_estimate_or_nothing(
    case: tuple[CallForProposals, BidContext], seed: int, hidden: int
) -> None:
    call, context = case
    policy = random_gate(seed, hidden)
    bid = policy.bid(call, context)
    if call.capability not in context.spec.capabilities:
        assert bid is None
        return
    assert np.isfinite(bid_features(call, context, honest_bid(call, context))).all()
    if bid is not None:
        # What the machine can keep: its own speed, after its queue, priced by the rule.
        assert bid == RuleBasedBidding().bid(call, context)
        start = max(context.now, call.ready_at, context.queue_end_at)
        assert bid.finish_at == pytest.approx(start + call.processing_seconds / context.speed)
        assert bid.machine == context.machine
        assert 0.0 <= bid.health_risk <= 1.0


@settings(max_examples=50, deadline=None)
@given(case=calls_and_contexts(), max_passes=st.integers(0, 3))
def test_a_machine_passes_one_operation_at_most_max_passes_times(
    case: tuple[CallForProposals, BidContext], max_passes: int
) -> None:
    call, context = case
    always_pass = LearnedBidding(
        [(np.zeros((len(FEATURES), 1)), np.ones(1))], max_passes=max_passes
    )
    answers = [always_pass.bid(call, context) for _ in range(max_passes + 2)]
    if call.capability not in context.spec.capabilities:
        assert answers == [None] * len(answers)
        return
    assert answers[:max_passes] == [None] * max_passes
    assert answers[max_passes:] == [honest_bid(call, context)] * 2


@settings(max_examples=200, deadline=None)
@given(
    case=calls_and_contexts(),
    seed=st.integers(0, 50),
    hidden=st.sampled_from([0, 3]),
    speeds=st.sampled_from([1, 5, 8]),
)
def test_a_speed_chooser_bids_honestly_at_a_candidate_speed_in_the_limits(
    case: tuple[CallForProposals, BidContext], seed: int, hidden: int, speeds: int
) -> None:
    call, context = case
    spec = context.spec
    policy = random_gate(seed, hidden, speeds=speeds)
    chosen = policy.bid_with_speed(call, context)
    if call.capability not in spec.capabilities:
        assert chosen is None
        assert policy.bid(call, context) is None
        return
    if chosen is not None:
        bid, speed = chosen
        assert speed in candidate_speeds(context, speeds)
        assert spec.speed_min <= speed <= spec.speed_max
        assert bid == honest_bid(call, context, speed)
        start = max(context.now, call.ready_at, context.queue_end_at)
        assert bid.finish_at == pytest.approx(start + call.processing_seconds / speed)
    # Without a speed it prices the machine's own, as the rule does.
    fresh = policy.fresh()
    own = fresh.bid(call, context)
    assert own is None or own == honest_bid(call, context)


def test_candidate_speeds_start_with_the_machines_own_and_span_the_limits() -> None:
    spec = SPECS["mill-1"]
    context = BidContext("mill-1", spec, 1.0, 1.0, 0.0, 0.0, TARIFF)
    assert candidate_speeds(context, 0) == [1.0]
    assert candidate_speeds(context, 8) == pytest.approx([1.0, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3])
    assert candidate_speeds(context, 5) == pytest.approx([1.0, 0.6, 0.775, 0.95, 1.125, 1.3])


def _mill_call() -> tuple[CallForProposals, BidContext]:
    """A milling call with slack, to mill-1 at its own speed (health 0.9, busy until 100 s)."""
    call = CallForProposals(
        round_id="r1",
        job="j1",
        op=0,
        capability="mill",
        ready_at=0.0,
        due_at=3_600.0,
        processing_seconds=600.0,
        deadline=1.0,
    )
    return call, BidContext("mill-1", SPECS["mill-1"], 1.0, 0.9, 100.0, 0.0, TARIFF)


def test_a_speed_chooser_with_zero_weights_is_the_rule() -> None:
    """The start of the training search: every speed scores 0, so the own speed wins."""
    zero = LearnedBidding([(np.zeros((len(SPEED_FEATURES), 2)), np.array([0.0, -1.0]))], speeds=8)
    call, context = _mill_call()
    assert zero.bid_with_speed(call, context) == (honest_bid(call, context), 1.0)
    assert run_episode(zero, 3).cost == pytest.approx(run_episode(RuleBasedBidding(), 3).cost)


def test_a_speed_chooser_prefers_what_its_weights_reward() -> None:
    """A score of -speed_ratio picks the slowest speed, +speed_ratio the fastest."""
    column = SPEED_FEATURES.index("speed_ratio")
    call, context = _mill_call()
    for sign, expected in [(-1.0, 0.6), (1.0, 1.3)]:
        w = np.zeros((len(SPEED_FEATURES), 2))
        w[column, 0] = sign
        policy = LearnedBidding([(w, np.array([0.0, -1.0]))], speeds=8)
        chosen = policy.bid_with_speed(call, context)
        assert chosen is not None
        assert chosen[1] == pytest.approx(expected)


def test_save_and_load_round_trip_of_a_speed_chooser(tmp_path: Path) -> None:
    policy = random_gate(5, hidden=3, max_passes=1, speeds=8)
    path = save_bidding_policy(policy, tmp_path / "speed.npz", {"run": "test"})
    with np.load(path, allow_pickle=False) as data:
        assert int(data["format_version"]) == 2
        assert [str(f) for f in data["layout"]] == list(SPEED_FEATURES)
    loaded = read_bidding_file(path)
    assert (loaded.speeds, loaded.max_passes) == (8, 1)
    x = np.linspace(-1.0, 1.0, len(SPEED_FEATURES))
    np.testing.assert_allclose(loaded.outputs(x), policy.outputs(x), rtol=1e-5, atol=1e-6)
    assert isinstance(load_policy(path), LearnedBidding)


def test_a_gate_is_still_written_and_read_as_format_version_1(tmp_path: Path) -> None:
    path = save_bidding_policy(random_gate(2), tmp_path / "gate.npz")
    with np.load(path, allow_pickle=False) as data:
        assert int(data["format_version"]) == 1
        assert "speeds" not in data.files
    assert read_bidding_file(path).speeds == 0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"layout": list(FEATURES)}, "trained on another feature layout: expected"),
        ({"speeds": -1}, "speeds must be >= 0, got -1"),
        ({"speeds": None}, "not a readable bidding policy file"),
        (
            {"w0": np.zeros((len(SPEED_FEATURES), 1))},
            f"chooser maps {len(SPEED_FEATURES)} features to 2 outputs",
        ),
    ],
)
def test_damaged_speed_chooser_files_are_refused(
    tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    good = save_bidding_policy(random_gate(0, speeds=5), tmp_path / "good.npz")
    bad = _rewrite(good, tmp_path / "bad.npz", **changes)
    with pytest.raises(BiddingLoadError, match=re.escape(str(bad))) as caught:
        read_bidding_file(bad)
    assert expected in str(caught.value)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    policy = random_gate(3, hidden=4, max_passes=1)
    path = save_bidding_policy(policy, tmp_path / "gate.npz", {"run": "test"})
    loaded = read_bidding_file(path)
    assert loaded.max_passes == 1
    assert loaded.meta == {"note": "random", "run": "test"}
    for (w, b), (w2, b2) in zip(policy.layers, loaded.layers, strict=True):
        np.testing.assert_allclose(w, w2, rtol=1e-6)
        np.testing.assert_allclose(b, b2, rtol=1e-6)
    x = np.linspace(-1.0, 1.0, len(FEATURES))
    assert loaded.pass_logit(x) == pytest.approx(policy.pass_logit(x), rel=1e-5, abs=1e-6)
    assert isinstance(load_policy(path), LearnedBidding)
    assert isinstance(load_bidding_policy(path), LearnedBidding)


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = np.asarray(value)
    with dst.open("wb") as fh:
        np.savez(fh, **arrays)
    return dst


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format_version": 99}, "expected format_version 1 or 2, found 99"),
        ({"layout": ["queue_wait", "health"]}, "trained on another feature layout: expected"),
        ({"w0": np.full((len(FEATURES), 1), np.nan)}, "non-finite weights"),
        ({"w0": np.zeros((3, 1))}, "gate maps 10 features to 1 outputs; these layers map 3"),
        ({"meta": "{not json"}, "not a readable bidding policy file"),
        ({"max_passes": None}, "not a readable bidding policy file"),
    ],
)
def test_damaged_files_are_refused_naming_the_file(
    tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    good = save_bidding_policy(random_gate(0), tmp_path / "good.npz")
    bad = _rewrite(good, tmp_path / "bad.npz", **changes)
    with pytest.raises(BiddingLoadError, match=re.escape(str(bad))) as caught:
        read_bidding_file(bad)
    assert expected in str(caught.value)
    with pytest.raises(PolicyLoadError, match=re.escape(str(bad))):
        load_policy(bad)


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BiddingLoadError, match="does not exist"):
        load_bidding_policy(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(BiddingLoadError, match=re.escape(str(garbage))):
        read_bidding_file(garbage)
    with pytest.raises(PolicyLoadError, match=re.escape(str(garbage))):
        load_policy(garbage)
    # A dispatcher is not a bidding policy, and load_policy still reads it as a dispatcher.
    with pytest.raises(BiddingLoadError, match="expected kind 'bidding', found None"):
        read_bidding_file(DEFAULT_DISPATCHER)
    assert isinstance(load_policy(DEFAULT_DISPATCHER), DispatcherPolicy)


def test_load_policy_refuses_a_bidding_policy_with_an_env(tmp_path: Path) -> None:
    path = save_bidding_policy(random_gate(1), tmp_path / "gate.npz")
    with pytest.raises(PolicyLoadError, match="does not act on an env"):
        load_policy(path, gym.make("autofab/JobShop-v0", instance="ft06"))


def test_names_for_machine_construction() -> None:
    assert isinstance(load_bidding_policy("rules"), RuleBasedBidding)
    shipped = load_bidding_policy("default")
    assert isinstance(shipped, LearnedBidding)
    assert shipped.meta["algo"] == "cem"
    assert isinstance(load_policy(DEFAULT_BIDDING), LearnedBidding)


def test_shipped_policy_runs_a_plant_and_does_every_operation_once() -> None:
    policy = load_bidding_policy("default")
    scenario = Scenario.from_plant(
        CONFIG,
        hosts=2,
        speedup=600.0,
        machine={"policy": policy},
        scheduler={"bid_window_seconds": 0.05, "retry_seconds": 0.5},
    )
    subjects = Subjects(CONFIG.name)
    for i, (product, quantity) in enumerate([("bracket", 3), ("shaft", 2), ("housing", 2)]):
        order = OrderSubmit(
            client_order_id=f"mes-{i}",
            items=[OrderItem(product=product, quantity=quantity)],
            due_at=3_600.0,
        )
        scenario.publish(subjects.orders_submit, order, reply_to=f"_INBOX.{i}")
    scheduler = scenario.agents["scheduler"]
    assert scenario.run(
        lambda: len(scheduler.jobs) == 7 and scheduler.all_done(),
        for_seconds=50_000.0,
        max_steps=400_000,
    )
    routes = {p.name: len(p.route) for p in CONFIG.products}
    expected = {(j, op) for j, job in scheduler.jobs.items() for op in range(routes[job.product])}
    done = Counter((job, op) for job, op, *_ in scenario.agents["plant"].finished)
    assert set(done) == expected
    assert set(done.values()) == {1}
    assert Counter((c.job, c.op) for c in scheduler.completions) == done


def test_deployment_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from autofab.agents.policies.artifacts import load_policy\n"
        "from autofab.agents.policies.bidding_policy import load_bidding_policy\n"
        "from autofab.agents.machine import MachineAgent\n"
        "from autofab.envs.plant import load_plant\n"
        "p = load_bidding_policy('default')\n"
        "load_policy('default')\n"
        "MachineAgent.from_plant('mill-1', load_plant('demo'), policy=p)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("speeds", [0, 5])
def test_training_keeps_a_policy_no_worse_than_the_rule_on_its_seeds(speeds: int) -> None:
    result = train_bidding([0, 1], iterations=1, population=3, elite=2, seed=0, speeds=speeds)
    assert result.best <= 0.0
    assert result.episodes == 2 + 3 * 2
    assert result.policy.speeds == speeds
    meta = json.loads(json.dumps(result.policy.meta))
    assert (meta["train_seeds"], meta["speeds"]) == ([0, 1], speeds)


def test_a_plant_runs_each_operation_at_the_speed_it_was_bid() -> None:
    """A chooser that always bids its slowest speed: the toy plant takes processing /
    that speed for every operation, and every operation is done once."""
    w = np.zeros((len(SPEED_FEATURES), 2))
    w[SPEED_FEATURES.index("speed_ratio"), 0] = -1.0
    slowest = LearnedBidding([(w, np.array([0.0, -1.0]))], speeds=3)
    scenario = Scenario.from_plant(
        CONFIG,
        hosts=1,
        speedup=600.0,
        machine={"policy": slowest},
        scheduler={"bid_window_seconds": 0.05, "retry_seconds": 0.5},
    )
    subjects = Subjects(CONFIG.name)
    order = OrderSubmit(
        client_order_id="mes-0", items=[OrderItem(product="bracket", quantity=2)], due_at=3_600.0
    )
    scenario.publish(subjects.orders_submit, order, reply_to="_INBOX.0")
    scheduler = scenario.agents["scheduler"]
    assert scenario.run(
        lambda: len(scheduler.jobs) == 2 and scheduler.all_done(),
        for_seconds=50_000.0,
        max_steps=400_000,
    )
    route = next(p.route for p in CONFIG.products if p.name == "bracket")
    finished = scenario.agents["plant"].finished
    assert len(finished) == 2 * len(route)
    for _job, op, machine, started, ended in finished:
        assert ended - started == pytest.approx(
            route[op].minutes * 60.0 / SPECS[machine].speed_min, rel=1e-3
        )
