"""The scheduler: orders, rounds, awards, re-announcements, and what it ignores."""

from __future__ import annotations

import json

import pytest

from autofab.agents.base import Now
from autofab.agents.protocol import (
    Accept,
    Bid,
    CallForProposals,
    Failure,
    InformDone,
    OrderAck,
    OrderItem,
    OrderRefused,
    OrderStatus,
    OrderStatusQuery,
    OrderSubmit,
    Proposal,
    ProposalBatch,
    Reject,
    Subjects,
)
from autofab.agents.scheduler import OperationSpec, SchedulerAgent, ScoreWeights
from autofab.envs.plant import load_plant

S = Subjects("demo")
START = Now(0.0, 0.0)
ROUTES = {
    "part": [
        OperationSpec("mill", 600.0, material="steel", quantity=1.0),
        OperationSpec("drill", 300.0),
    ]
}


def make(**kwargs) -> SchedulerAgent:
    return SchedulerAgent("scheduler", S, ROUTES, bid_window_seconds=1.0, **kwargs)


def submit(agent, cid="c1", product="part", qty=1, now=START):
    msg = OrderSubmit(
        client_order_id=cid, items=[OrderItem(product=product, quantity=qty)], due_at=5000.0
    )
    return agent.handle(S.orders_submit, msg, now, reply_to="_INBOX.1")


def only(out, kind):
    found = [o.message for o in out if isinstance(o.message, kind)]
    assert len(found) == 1, out
    return found[0]


def proposal(round_id, machine, finish, cost=0.0, risk=0.0):
    return Proposal(
        round_id=round_id, machine=machine, finish_at=finish, energy_cost=cost, health_risk=risk
    )


def done(call: CallForProposals, machine: str, finished=700.0) -> InformDone:
    return InformDone(
        round_id=call.round_id,
        machine=machine,
        job=call.job,
        op=call.op,
        started_at=100.0,
        finished_at=finished,
        energy_j=1.0,
    )


def awarded(agent, now=START):
    """Submit one order and award its first operation to m1."""
    call = only(submit(agent, now=now), CallForProposals)
    agent.handle(S.bid(call.round_id), proposal(call.round_id, "m1", 700.0), now)
    out = agent.on_timer(Now(call.deadline, 1.0))
    assert only(out, Accept).machine == "m1"
    return call


def test_order_is_acknowledged_with_jobs_and_first_operations_announced():
    agent = make()
    out = submit(agent, qty=2)
    ack = only(out, OrderAck)
    assert out[0].subject == "_INBOX.1"
    assert ack.jobs == [f"{ack.order}-1", f"{ack.order}-2"]
    calls = [o for o in out if isinstance(o.message, CallForProposals)]
    assert [c.subject for c in calls] == [S.cfp("mill")] * 2
    assert {c.message.job for c in calls} == set(ack.jobs)
    first = calls[0].message
    assert (first.op, first.material, first.quantity, first.deadline) == (0, "steel", 1.0, 1.0)


def test_repeated_order_returns_the_first_answer_and_creates_nothing():
    agent = make()
    first = only(submit(agent), OrderAck)
    out = submit(agent, qty=5)
    assert [o.message for o in out] == [first]
    assert len(agent.jobs) == 1
    refused = only(submit(agent, cid="c2", product="nope"), OrderRefused)
    assert "nope" in refused.reason
    assert [o.message for o in submit(agent, cid="c2")] == [refused]
    assert agent.ignored["repeated_order"] == 2


def test_order_too_large_is_refused():
    agent = make(max_jobs_per_order=3)
    assert "limit" in only(submit(agent, qty=4), OrderRefused).reason


def test_order_status_follows_the_order():
    agent = make()

    def status(cid="c1", now=START) -> OrderStatus:
        out = agent.handle(S.orders_query, OrderStatusQuery(client_order_id=cid), now, "_INBOX.2")
        return only(out, OrderStatus)

    assert status().status == "unknown"
    submit(agent, cid="bad", product="nope")
    assert status("bad").status == "refused"
    call = only(submit(agent), CallForProposals)
    queued = status()
    assert (queued.status, queued.jobs_total, queued.finish_at) == ("queued", 1, 900.0)
    agent.handle(S.bid(call.round_id), proposal(call.round_id, "m1", 700.0), Now(0.1, 0.0))
    agent.on_timer(Now(call.deadline, 1.0))
    running = status()
    assert (running.status, running.finish_at) == ("in_progress", 1000.0)
    (next_call,) = agent.handle(S.result(call.round_id), done(call, "m1"), Now(2.0, 700.0))
    agent.handle(
        S.bid(next_call.message.round_id),
        proposal(next_call.message.round_id, "m2", 1100.0),
        Now(2.1, 701),
    )
    agent.on_timer(Now(next_call.message.deadline, 800.0))
    agent.handle(S.result("x"), done(next_call.message, "m2", 1100.0), Now(4.0, 1100.0))
    final = status(now=Now(5.0, 1200.0))
    assert (final.status, final.jobs_done, final.finish_at) == ("done", 1, 1100.0)


def test_best_score_wins_and_the_rest_are_rejected():
    agent = make(weights=ScoreWeights(finish=1.0, energy=100.0, risk=0.0))
    call = only(submit(agent), CallForProposals)
    now = Now(0.5, 0.0)
    agent.handle(S.bid(call.round_id), proposal(call.round_id, "fast", 600.0, cost=5.0), now)
    batch = ProposalBatch(
        round_id=call.round_id,
        host="h1",
        bids=[
            Bid(machine="cheap", finish_at=700.0, energy_cost=1.0, health_risk=0.5),
            Bid(machine="slow", finish_at=2000.0, energy_cost=0.0, health_risk=0.0),
        ],
    )
    agent.handle(S.bid(call.round_id), batch, now)
    out = agent.on_timer(Now(call.deadline, 1.0))
    assert only(out, Accept) == Accept(round_id=call.round_id, machine="cheap", job=call.job, op=0)
    assert only(out, Reject).machines == ["fast", "slow"]
    assert all(o.subject == S.award(call.round_id) for o in out)


def test_round_closes_early_when_every_expected_responder_answered():
    agent = make(expected_responders={"mill": 2})
    call = only(submit(agent), CallForProposals)
    now = Now(0.1, 0.0)
    assert agent.handle(S.bid(call.round_id), proposal(call.round_id, "m1", 700.0), now) == []
    empty = ProposalBatch(round_id=call.round_id, host="h2", bids=[])
    out = agent.handle(S.bid(call.round_id), empty, now)
    assert only(out, Accept).machine == "m1"


def test_no_bids_announces_again_under_a_new_round():
    agent = make(retry_seconds=2.0)
    call = only(submit(agent), CallForProposals)
    assert agent.on_timer(Now(call.deadline, 1.0)) == []
    assert agent.next_timer() == pytest.approx(call.deadline + 2.0)
    again = only(agent.on_timer(Now(call.deadline + 2.0, 3.0)), CallForProposals)
    assert (again.job, again.op) == (call.job, call.op)
    assert again.round_id != call.round_id
    assert agent.reannounced == {"no_bids": 1}


def test_failure_announces_again_and_only_the_winner_may_fail():
    agent = make()
    call = awarded(agent)
    stray = Failure(
        round_id=call.round_id, machine="m9", job=call.job, op=0, failed_at=5, reason="x"
    )
    assert agent.handle(S.result(call.round_id), stray, Now(2, 5)) == []
    failure = stray.model_copy(update={"machine": "m1"})
    again = only(agent.handle(S.result(call.round_id), failure, Now(2, 5)), CallForProposals)
    assert again.round_id != call.round_id
    assert again.op == 0
    assert agent.handle(S.result(call.round_id), failure, Now(2, 5)) == []
    assert agent.ignored == {"not_awarded": 1, "stale_result": 1}
    assert agent.reannounced == {"failed": 1}


def test_silent_winner_is_withdrawn_and_the_operation_announced_again():
    agent = make(grace_seconds=100.0, grace_factor=0.0, speedup=10.0)
    call = awarded(agent)
    rnd = agent.rounds[call.round_id]
    assert rnd.result_due == pytest.approx(800.0)
    out = agent.on_timer(Now(rnd.result_wall, 800.0))
    assert only(out, Reject).machines == ["m1"]
    assert only(out, CallForProposals).round_id != call.round_id
    assert agent.reannounced == {"timeout": 1}
    again = only(out, CallForProposals)
    # A late result from the old winner (delayed, not lost) is taken while the job still
    # waits for that operation: the round announced in its place is called off and the
    # next operation announced, so the operation is not done twice.
    t = rnd.result_wall
    agent.handle(S.bid(again.round_id), proposal(again.round_id, "m2", 900.0), Now(t, 800))
    late = agent.handle(S.result(call.round_id), done(call, "m1"), Now(t + 0.1, 801))
    assert only(late, Reject).machines == ["m2"]
    assert only(late, CallForProposals).op == 1
    assert agent.ignored["late_result_taken"] == 1
    assert agent.reannounced["superseded"] == 1
    assert [(c.job, c.op) for c in agent.completions] == [(call.job, 0)]
    # Once more is a duplicate, and a result from another machine never counts.
    assert agent.handle(S.result(call.round_id), done(call, "m1"), Now(t + 0.2, 802)) == []
    assert agent.ignored.get("duplicate_done", 0) + agent.ignored.get("stale_result", 0) == 1


def test_late_duplicate_and_stray_messages_are_ignored_and_counted():
    agent = make()
    call = only(submit(agent), CallForProposals)
    bid = proposal(call.round_id, "m1", 700.0)
    agent.handle(S.bid(call.round_id), bid, Now(0.1, 0.0))
    agent.handle(S.bid(call.round_id), bid, Now(0.2, 0.0))
    agent.handle(S.bid("nope"), proposal("nope", "m1", 1.0), Now(0.2, 0.0))
    agent.handle(S.bid(call.round_id), proposal(call.round_id, "m2", 1.0), Now(1.5, 0.0))
    agent.on_timer(Now(call.deadline, 1.0))
    agent.handle(S.bid(call.round_id), proposal(call.round_id, "m3", 1.0), Now(1.6, 1.0))
    assert agent.handle(S.result(call.round_id), done(call, "m2"), Now(2, 700)) == []
    nxt = only(
        agent.handle(S.result(call.round_id), done(call, "m1"), Now(2, 700)), CallForProposals
    )
    assert nxt.op == 1
    assert nxt.ready_at == 700.0
    assert agent.handle(S.result(call.round_id), done(call, "m1"), Now(2, 700)) == []
    assert agent.ignored == {
        "duplicate_bid": 1,
        "unknown_round": 1,
        "late_bid": 2,
        "not_awarded": 1,
        "duplicate_done": 1,
    }
    assert len(agent.completions) == 1


def test_next_operation_waits_for_the_previous_one():
    agent = make()
    call = awarded(agent)
    assert [r.op for r in agent.rounds.values()] == [0]
    agent.handle(S.result(call.round_id), done(call, "m1"), Now(3, 700))
    assert [r.op for r in agent.rounds.values()] == [1]


def test_concurrent_awards_to_one_machine_push_its_finish_back():
    agent = make()
    a = only(submit(agent, cid="a"), CallForProposals)
    b = only(submit(agent, cid="b"), CallForProposals)
    for call in (a, b):
        agent.handle(S.bid(call.round_id), proposal(call.round_id, "m1", 600.0), Now(0.1, 0))
        agent.handle(S.bid(call.round_id), proposal(call.round_id, "m2", 900.0), Now(0.1, 0))
    out = agent.on_timer(Now(1.0, 1.0))
    winners = {m.round_id: m.machine for m in (o.message for o in out) if isinstance(m, Accept)}
    assert winners == {a.round_id: "m1", b.round_id: "m2"}


def test_snapshot_restore_mid_round_continues_without_reusing_round_ids():
    agent = make()
    call = awarded(agent)
    open_call = only(submit(agent, cid="c2"), CallForProposals)
    fresh = make()
    fresh.restore(json.loads(json.dumps(agent.snapshot())))
    assert set(fresh.rounds) == set(agent.rounds)
    assert only(submit(fresh), OrderAck) == only(submit(agent), OrderAck)
    fresh.handle(S.bid(open_call.round_id), proposal(open_call.round_id, "m2", 800), Now(0.5, 0))
    assert only(fresh.on_timer(Now(open_call.deadline, 1.0)), Accept).machine == "m2"
    nxt = only(
        fresh.handle(S.result(call.round_id), done(call, "m1"), Now(2, 700)), CallForProposals
    )
    assert nxt.round_id not in agent.closed
    assert nxt.round_id not in agent.rounds


def test_from_plant_reads_routes_and_ignores_other_messages():
    agent = SchedulerAgent.from_plant("scheduler", load_plant("demo"))
    assert [s.capability for s in agent.routes["bracket"]] == ["mill", "drill", "grind"]
    assert agent.routes["bracket"][0].processing_seconds == 720.0
    assert agent.routes["bracket"][1].quantity == 0.0
    accept = Accept(round_id="r", machine="m", job="j", op=0)
    assert agent.handle(S.award("r"), accept, Now(0, 0)) == []
    assert agent.ignored == {"unexpected_accept": 1}


def test_plant_job_travels_with_calls_and_awards():
    agent = make()
    msg = OrderSubmit(
        client_order_id="c9", items=[OrderItem(product="part")], due_at=5000.0, plant_job=12
    )
    call = only(agent.handle(S.orders_submit, msg, START, reply_to="_INBOX.1"), CallForProposals)
    assert call.plant_job == 12
    agent.handle(S.bid(call.round_id), proposal(call.round_id, "m1", 700.0), START)
    assert only(agent.on_timer(Now(call.deadline, 1.0)), Accept).plant_job == 12
    with pytest.raises(ValueError, match="one unit"):
        OrderSubmit(
            client_order_id="c10",
            items=[OrderItem(product="part", quantity=2)],
            due_at=1.0,
            plant_job=1,
        )


@pytest.mark.parametrize(("on_defect", "redo"), [("rework", 1), ("scrap", 0)])
def test_defective_part_is_made_again(on_defect, redo):
    agent = make(on_defect=on_defect)
    first = awarded(agent)
    second = only(
        agent.handle(S.result(first.round_id), done(first, "m1"), START), CallForProposals
    )
    assert second.op == 1
    agent.handle(S.bid(second.round_id), proposal(second.round_id, "m2", 900.0), START)
    agent.on_timer(Now(second.deadline, 1.0))
    bad = done(second, "m2", finished=900.0).model_copy(update={"defect": True})
    again = only(agent.handle(S.result(second.round_id), bad, START), CallForProposals)
    assert again.op == redo
    assert again.round_id != second.round_id
    assert agent.reannounced["defect"] == 1
    # Completions list the work on good parts only: a scrapped part's are dropped.
    assert [(c.job, c.op) for c in agent.completions] == [(first.job, 0)][: 1 - (redo == 0)]
    with pytest.raises(ValueError, match="on_defect"):
        make(on_defect="melt")
