"""The energy agent: grants under the cap, denies with retry times, expiry, idempotency."""

from __future__ import annotations

import json

import pytest

from autofab.agents.base import Now
from autofab.agents.energy import EnergyAgent, Tariff, plant_to_wall
from autofab.agents.protocol import PowerDeny, PowerGrant, PowerRelease, PowerRequest, Subjects
from autofab.envs.plant import load_plant

S = Subjects("demo")
START = Now(0.0, 0.0)


def request(rid: str, power: float, machine: str = "m1", job: str = "j1", duration=100.0):
    return PowerRequest(
        request_id=rid,
        machine=machine,
        job=job,
        op=0,
        power_w=power,
        start_at=0.0,
        duration_seconds=duration,
    )


def ask(agent: EnergyAgent, msg, now: Now = START):
    out = agent.handle(S.energy_request, msg, now, reply_to="_INBOX.1")
    assert len(out) <= 1
    return out[0].message if out else None


@pytest.fixture
def agent() -> EnergyAgent:
    return EnergyAgent("energy", S, 10_000.0, expiry_factor=1.0, expiry_margin_seconds=10.0)


def test_from_plant_budget_is_cap_minus_base_load():
    config = load_plant("demo")
    agent = EnergyAgent.from_plant("energy", config)
    assert agent.budget_w == pytest.approx((85 - 15) * 1e3)


def test_grants_under_cap_and_denies_over_it_with_retry_at(agent):
    grant = ask(agent, request("r1", 6_000.0))
    assert isinstance(grant, PowerGrant)
    assert grant.until_at == pytest.approx(110.0)
    deny = ask(agent, request("r2", 6_000.0, machine="m2", job="j2"))
    assert isinstance(deny, PowerDeny)
    assert deny.retry_at == pytest.approx(110.0)
    assert agent.granted_w == pytest.approx(6_000.0)


def test_release_frees_budget_and_late_duplicate_is_ignored(agent):
    ask(agent, request("r1", 6_000.0))
    agent.handle(S.energy_release, PowerRelease(request_id="r1", machine="m1"), Now(1, 1))
    assert agent.granted_w == 0.0
    assert ask(agent, request("r1", 6_000.0)) is None
    assert agent.ignored["finished_request"] == 1


def test_repeated_request_gets_the_same_grant(agent):
    first = ask(agent, request("r1", 6_000.0))
    again = ask(agent, request("r1", 6_000.0), Now(0.5, 5.0))
    assert again == first
    assert agent.granted_w == pytest.approx(6_000.0)


def test_request_larger_than_budget_gets_no_retry_time(agent):
    deny = ask(agent, request("r1", 20_000.0))
    assert isinstance(deny, PowerDeny)
    assert deny.retry_at is None
    assert not agent.waiting


def test_waiting_large_request_is_not_starved_by_small_ones(agent):
    ask(agent, request("r1", 6_000.0, machine="a", job="ja"))
    assert isinstance(ask(agent, request("big", 8_000.0, machine="b", job="jb")), PowerDeny)
    # 4 kW are free, but the big request waits first: a small newcomer must wait too.
    assert isinstance(ask(agent, request("s1", 1_000.0, machine="c", job="jc")), PowerDeny)
    agent.handle(S.energy_release, PowerRelease(request_id="r1", machine="a"), Now(1, 1))
    assert isinstance(ask(agent, request("big2", 8_000.0, machine="b", job="jb")), PowerGrant)
    assert isinstance(ask(agent, request("s2", 1_000.0, machine="c", job="jc")), PowerGrant)


def test_grants_expire_on_the_timer(agent):
    ask(agent, request("r1", 6_000.0))
    timer = agent.next_timer()
    assert timer == pytest.approx(110.0)
    agent.on_timer(Now(timer, 110.0))
    assert agent.granted_w == 0.0
    assert agent.ignored["grant_expired"] == 1


def test_snapshot_restore_keeps_grants(agent):
    ask(agent, request("r1", 6_000.0))
    ask(agent, request("r2", 6_000.0, machine="m2", job="j2"))
    fresh = EnergyAgent("energy", S, 10_000.0)
    fresh.restore(json.loads(json.dumps(agent.snapshot())))
    assert fresh.granted_w == pytest.approx(6_000.0)
    assert isinstance(ask(fresh, request("r1", 6_000.0)), PowerGrant)
    assert fresh.next_timer() == agent.next_timer()


def test_tariff_cost_sums_hour_by_hour():
    prices = tuple([0.1] * 12 + [0.3] * 12)
    tariff = Tariff(prices, shift_start_hour=11.5)
    # 1 kW for one hour from 11:30: half an hour at 0.1, half an hour at 0.3.
    assert tariff.cost(1_000.0, 0.0, 3600.0) == pytest.approx(0.2)
    assert tariff.per_kwh_at(0.0) == 0.1
    assert tariff.per_kwh_at(1800.0) == 0.3
    with pytest.raises(ValueError, match="24"):
        Tariff((0.1,))


def test_plant_to_wall_never_sets_a_timer_in_place():
    now = Now(1_700_000_000.0, 100.0)
    assert plant_to_wall(100.0, now, 60.0) == now.wall
    assert plant_to_wall(100.0 + 1e-9, now, 60.0) > now.wall
    assert plant_to_wall(160.0, now, 60.0) == pytest.approx(now.wall + 1.0)


def test_budget_shrinks_while_power_is_dear():
    """Demand response: at or above expensive_per_kwh only a fraction of the budget is
    granted; a request that only fits the full budget waits for the cheap hours."""
    prices = tuple(0.30 if 2 <= h < 4 else 0.10 for h in range(24))
    agent = EnergyAgent(
        "energy",
        S,
        10_000.0,
        tariff=Tariff(prices, shift_start_hour=0.0),
        expensive_per_kwh=0.25,
        expensive_budget_fraction=0.5,
        expiry_factor=1.0,
        expiry_margin_seconds=0.0,
    )
    assert agent.budget_at(3600.0) == 10_000.0
    assert agent.budget_at(2.5 * 3600) == 5_000.0
    dear = Now(10.0, 2.5 * 3600)
    assert isinstance(ask(agent, request("r1", 4_000.0), dear), PowerGrant)
    deny = ask(agent, request("r2", 6_000.0, machine="m2", job="j2"), dear)
    assert isinstance(deny, PowerDeny)
    assert "dear" in deny.reason
    assert deny.retry_at == pytest.approx(4 * 3600.0)  # the cheap hours come back first
    # After the dear hours the full budget is there again.
    cheap = Now(20.0, 4 * 3600.0 + 1.0)
    assert isinstance(ask(agent, request("r3", 6_000.0, machine="m2", job="j2"), cheap), PowerGrant)
    with pytest.raises(ValueError, match="fraction"):
        EnergyAgent("e", S, 1.0, expensive_budget_fraction=0.0)
    with pytest.raises(ValueError, match="needs the tariff"):
        EnergyAgent("e", S, 1.0, expensive_per_kwh=0.2)
