"""The supply agent: reservations, reorder point, deliveries on plant time, releases."""

from __future__ import annotations

import json

import pytest

from autofab.agents.base import Now
from autofab.agents.protocol import (
    MaterialRelease,
    MaterialReorder,
    MaterialReserve,
    MaterialReserved,
    MaterialUnavailable,
    Subjects,
)
from autofab.agents.supply import MaterialPolicy, SupplyAgent
from autofab.envs.plant import load_plant

S = Subjects("demo")


def reserve(rid: str, qty: float = 1.0, material: str = "steel") -> MaterialReserve:
    return MaterialReserve(
        request_id=rid, machine="m1", job="j1", op=0, material=material, quantity=qty
    )


@pytest.fixture
def agent() -> SupplyAgent:
    policy = MaterialPolicy(reorder_point=2.0, reorder_quantity=5.0, lead_seconds=3600.0)
    return SupplyAgent("supply", S, {"steel": 4.0}, {"steel": policy}, speedup=60.0)


def replies(out):
    return [o.message for o in out if not isinstance(o.message, MaterialReorder)]


def reorders(out):
    return [o.message for o in out if isinstance(o.message, MaterialReorder)]


def test_from_plant_reads_materials():
    agent = SupplyAgent.from_plant("supply", load_plant("demo"))
    assert agent.stock == {"steel-bar": 25.0, "aluminium-block": 8.0}
    assert agent.policies["steel-bar"].lead_seconds == 7200.0


def test_reserve_takes_stock_and_reorders_at_the_reorder_point(agent):
    out = agent.handle(S.material_reserve, reserve("r1"), Now(0, 0), "_INBOX.1")
    assert isinstance(replies(out)[0], MaterialReserved)
    assert out[0].subject == "_INBOX.1"
    assert agent.stock["steel"] == 3.0
    assert reorders(out) == []
    out = agent.handle(S.material_reserve, reserve("r2"), Now(0, 10), None)
    assert out[0].subject == S.material_reply("m1")
    (reorder,) = reorders(out)
    assert reorder.quantity == 5.0
    assert reorder.available_at == 3610.0
    assert [o.subject for o in out if isinstance(o.message, MaterialReorder)] == [
        S.material_reorder
    ]


def test_unavailable_names_the_delivery_that_covers_it(agent):
    out = agent.handle(S.material_reserve, reserve("big", 7.0), Now(0, 0))
    (reply,) = replies(out)
    assert isinstance(reply, MaterialUnavailable)
    assert reply.available_at == 3600.0
    assert agent.position("steel") >= 7.0


def test_delivery_arrives_on_the_plant_time_timer(agent):
    agent.handle(S.material_reserve, reserve("r1", 3.0), Now(0, 0))
    assert agent.stock["steel"] == 1.0
    timer = agent.next_timer()
    assert timer == pytest.approx(60.0)
    agent.on_timer(Now(timer, 3600.0))
    assert agent.stock["steel"] == 6.0
    assert agent.next_timer() is None


def test_release_returns_stock_and_duplicates_change_nothing(agent):
    first = agent.handle(S.material_reserve, reserve("r1"), Now(0, 0))
    again = agent.handle(S.material_reserve, reserve("r1"), Now(0, 0))
    assert replies(again) == replies(first)
    assert agent.stock["steel"] == 3.0
    agent.handle(S.material_release, MaterialRelease(request_id="r1", machine="m1"), Now(1, 1))
    agent.handle(S.material_release, MaterialRelease(request_id="r1", machine="m1"), Now(1, 1))
    assert agent.stock["steel"] == 4.0
    assert agent.handle(S.material_reserve, reserve("r1"), Now(2, 2)) == []
    assert agent.ignored == {
        "duplicate_reserve": 1,
        "unknown_release": 1,
        "released_request": 1,
    }


def test_unknown_material_is_unavailable(agent):
    (reply,) = replies(agent.handle(S.material_reserve, reserve("r1", material="gold"), Now(0, 0)))
    assert isinstance(reply, MaterialUnavailable)
    assert reply.available_at is None


def test_snapshot_restore_keeps_stock_and_pending_deliveries(agent):
    agent.handle(S.material_reserve, reserve("r1", 3.0), Now(0, 0))
    fresh = SupplyAgent("supply", S, {"steel": 0.0}, agent.policies, speedup=60.0)
    fresh.restore(json.loads(json.dumps(agent.snapshot())))
    assert fresh.stock == agent.stock
    assert fresh.next_timer() == agent.next_timer()
    fresh.on_timer(Now(60.0, 3600.0))
    assert fresh.stock["steel"] == 6.0
    fresh.handle(S.material_release, MaterialRelease(request_id="r1", machine="m1"), Now(61, 3660))
    assert fresh.stock["steel"] == 9.0


def test_mismatched_materials_are_refused():
    with pytest.raises(ValueError, match="same materials"):
        SupplyAgent("supply", S, {"a": 1.0}, {})
