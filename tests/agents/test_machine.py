"""Machine agents: bids, the material-power-run sequence, completion, failure, hosts."""

from __future__ import annotations

import json
import math

import pytest

from autofab.agents.base import Now
from autofab.agents.bidding import (
    BidContext,
    BiddingPolicy,
    MachineSpec,
    RuleBasedBidding,
    SpeedBiddingPolicy,
    honest_bid,
)
from autofab.agents.energy import Tariff
from autofab.agents.machine import MachineAgent, MachineHost
from autofab.agents.protocol import (
    Accept,
    Bid,
    CallForProposals,
    Failure,
    HealthReport,
    InformDone,
    MaterialRelease,
    MaterialReserve,
    MaterialReserved,
    MaterialUnavailable,
    PowerDeny,
    PowerGrant,
    PowerRelease,
    PowerRequest,
    Proposal,
    ProposalBatch,
    Reject,
    SetpointRequest,
    Subjects,
    Telemetry,
)
from autofab.envs.plant import compile_plant, load_plant

S = Subjects("demo")
AWARDED_AT = Now(1.0, 0.0)
CONFIG = load_plant("demo")


def cfp(round_id="r1", job="j1", op=0, capability="mill", material=None, qty=0.0, deadline=10.0):
    return CallForProposals(
        round_id=round_id,
        job=job,
        op=op,
        capability=capability,
        ready_at=0.0,
        due_at=10_000.0,
        processing_seconds=600.0,
        material=material,
        quantity=qty,
        deadline=deadline,
    )


def messages(out, kind):
    return [o.message for o in out if isinstance(o.message, kind)]


@pytest.fixture
def mill() -> MachineAgent:
    return MachineAgent.from_plant("mill-1", CONFIG, speedup=60.0)


def award(agent: MachineAgent, call: CallForProposals, now=AWARDED_AT):
    agent.handle(S.cfp(call.capability), call, now)
    return agent.handle(
        S.award(call.round_id),
        Accept(round_id=call.round_id, machine=agent.name, job=call.job, op=call.op),
        now,
    )


def start(agent: MachineAgent, call: CallForProposals):
    """Award ``call`` and answer its requests until the machine runs it."""
    out = award(agent, call)
    if call.material is not None:
        (res,) = messages(out, MaterialReserve)
        out = agent.handle(
            S.material_reply(agent.name),
            MaterialReserved(
                request_id=res.request_id, machine=agent.name, material=res.material, quantity=1
            ),
            Now(1.1, 6.0),
        )
    (req,) = messages(out, PowerRequest)
    grant = PowerGrant(request_id=req.request_id, machine=agent.name, power_w=1, until_at=1e4)
    return agent.handle(S.energy_reply(agent.name), grant, Now(1.2, 12.0))


def test_rule_bid_prices_finish_energy_and_risk():
    plant = compile_plant(CONFIG)
    spec = MachineSpec.from_plant(plant, "mill-1")
    tariff = Tariff.from_plant(CONFIG)
    context = BidContext("mill-1", spec, 1.0, 0.8, queue_end_at=300.0, now=100.0, tariff=tariff)
    bid = RuleBasedBidding().bid(cfp(), context)
    assert bid is not None
    assert bid.finish_at == pytest.approx(900.0)
    power = spec.running_power_w(1.0, 1.0, 0.8)
    assert power == pytest.approx(1500 + 11000 * (1 + 0.15 * 0.2))
    assert bid.energy_cost == pytest.approx(tariff.cost(power, 300.0, 600.0))
    mid = 0.8 - spec.wear_rate(1.0, 1.0) * 300
    assert bid.health_risk == pytest.approx(1 - math.exp(-spec.hazard(mid) * 600))
    assert RuleBasedBidding().bid(cfp(capability="turn"), context) is None


def test_standalone_machine_answers_a_call_with_a_proposal(mill):
    (out,) = mill.handle(S.cfp("mill"), cfp(), Now(1.0, 50.0))
    assert out.subject == S.bid("r1")
    assert isinstance(out.message, Proposal)
    assert out.message.finish_at == pytest.approx(650.0)
    assert S.cfp("mill") in [s.subject for s in mill.subscriptions()]


def test_awarded_operation_reserves_material_then_power_then_runs(mill):
    out = award(mill, cfp(material="steel-bar", qty=1.0))
    (res,) = messages(out, MaterialReserve)
    assert messages(out, PowerRequest) == []
    reserved = MaterialReserved(
        request_id=res.request_id, machine="mill-1", material="steel-bar", quantity=1.0
    )
    out = mill.handle(S.material_reply("mill-1"), reserved, Now(1.1, 6.0))
    (req,) = messages(out, PowerRequest)
    assert req.duration_seconds == pytest.approx(600.0)
    grant = PowerGrant(request_id=req.request_id, machine="mill-1", power_w=1, until_at=1e4)
    out = mill.handle(S.energy_reply("mill-1"), grant, Now(1.2, 12.0))
    setpoints = messages(out, SetpointRequest)
    assert [(s.variable, s.value) for s in setpoints] == [("speed_setpoint", 1.0), ("run", 1.0)]
    assert all(o.ttl_seconds == mill.setpoint_ttl_seconds for o in out)
    assert mill.active_operation() is not None


def test_finished_operation_informs_and_releases(mill):
    start(mill, cfp())
    out = mill.operation_finished("j1", 0, Now(11.0, 612.0))
    (done,) = messages(out, InformDone)
    assert (done.round_id, done.job, done.op, done.finished_at) == ("r1", "j1", 0, 612.0)
    assert out[0].subject == S.result("r1")
    assert len(messages(out, PowerRelease)) == 1
    assert [s.value for s in messages(out, SetpointRequest)] == [0.0]
    assert mill.active_operation() is None
    assert mill.operation_finished("j1", 0, Now(11.0, 612.0)) == []
    assert mill.ignored["finish_unknown"] == 1


def test_breakdown_fails_every_queued_operation(mill):
    start(mill, cfp(material="steel-bar", qty=1.0))
    award(mill, cfp(round_id="r2", job="j2"))
    out = mill.breakdown(Now(5.0, 300.0))
    assert sorted(f.round_id for f in messages(out, Failure)) == ["r1", "r2"]
    assert len(messages(out, PowerRelease)) == 1
    assert messages(out, MaterialRelease) == []  # consumed: the operation had started
    assert mill.queue == []
    assert mill.make_bid(cfp(round_id="r3"), Now(5.0, 300.0)) is None
    (report,) = messages(mill.repaired(Now(50.0, 3000.0)), HealthReport)
    assert report.rul_seconds is not None
    assert mill.make_bid(cfp(round_id="r4"), Now(50.0, 3000.0)) is not None


def test_telemetry_down_is_a_breakdown(mill):
    award(mill, cfp())
    telemetry = Telemetry(
        machine="mill-1",
        plant_time=10.0,
        status="down",
        speed_setpoint=1.0,
        load=1.0,
        run_seconds=5.0,
        renewals=0,
        vibration_mm_s=1.0,
        temperature_c=30.0,
        power_w=0.0,
    )
    out = mill.handle(S.telemetry("mill-1"), telemetry, Now(2.0, 10.0))
    assert len(messages(out, Failure)) == 1
    assert mill.status == "down"


def test_deny_and_shortage_retry_later(mill):
    out = award(mill, cfp(material="steel-bar", qty=1.0))
    (res,) = messages(out, MaterialReserve)
    short = MaterialUnavailable(
        request_id=res.request_id,
        machine="mill-1",
        material="steel-bar",
        quantity=1.0,
        available_at=600.0,
    )
    assert mill.handle(S.material_reply("mill-1"), short, Now(1.1, 6.0)) == []
    assert mill.queue[0].retry_wall == pytest.approx(1.1 + (600 - 6) / 60)
    out = mill.on_timer(Now(11.0, 600.0))
    (again,) = messages(out, MaterialReserve)
    assert again.request_id != res.request_id
    reserved = MaterialReserved(
        request_id=again.request_id, machine="mill-1", material="steel-bar", quantity=1.0
    )
    (req,) = messages(mill.handle(S.material_reply("mill-1"), reserved, Now(11, 600)), PowerRequest)
    deny = PowerDeny(request_id=req.request_id, machine="mill-1", reason="cap", retry_at=None)
    assert mill.handle(S.energy_reply("mill-1"), deny, Now(11.1, 606.0)) == []
    assert mill.queue[0].retry_wall == pytest.approx(11.1 + mill.retry_seconds / 60)


def test_unexpected_grant_is_given_back(mill):
    grant = PowerGrant(request_id="stray", machine="mill-1", power_w=5.0, until_at=100.0)
    (out,) = mill.handle(S.energy_reply("mill-1"), grant, Now(1.0, 1.0))
    assert out.message == PowerRelease(request_id="stray", machine="mill-1")
    reserved = MaterialReserved(request_id="x", machine="mill-1", material="s", quantity=1)
    (out,) = mill.handle(S.material_reply("mill-1"), reserved, Now(1.0, 1.0))
    assert isinstance(out.message, MaterialRelease)


def test_duplicate_accept_and_award_without_bid(mill):
    call = cfp()
    award(mill, call)
    accept = Accept(round_id="r1", machine="mill-1", job="j1", op=0)
    assert mill.handle(S.award("r1"), accept, Now(1.0, 1.0)) == []
    assert mill.ignored["duplicate_accept"] == 1
    stray = Accept(round_id="r9", machine="mill-1", job="j9", op=0)
    (failure,) = messages(mill.handle(S.award("r9"), stray, Now(1.0, 1.0)), Failure)
    assert "bid" in failure.reason
    assert len(mill.queue) == 1


def test_reject_withdraws_a_running_award(mill):
    start(mill, cfp())
    out = mill.handle(S.award("r1"), Reject(round_id="r1", machines=["mill-1"]), Now(3.0, 100.0))
    assert len(messages(out, PowerRelease)) == 1
    assert [s.value for s in messages(out, SetpointRequest)] == [0.0]
    assert mill.queue == []


def test_health_report_on_a_timer(mill):
    assert mill.next_timer() == 0.0
    (report,) = messages(mill.on_timer(Now(0.0, 0.0)), HealthReport)
    assert 0.0 < report.failure_probability < 1.0
    assert mill.next_timer() == pytest.approx(mill.health_interval_seconds)


def test_host_answers_one_batch_for_all_capable_machines():
    host = MachineHost.from_plant("host-1", CONFIG)
    (out,) = host.handle(S.cfp("mill"), cfp(), Now(1.0, 0.0))
    assert isinstance(out.message, ProposalBatch)
    assert sorted(b.machine for b in out.message.bids) == ["mill-1", "mill-2"]
    host.machines["mill-1"].breakdown(Now(1.0, 0.0))
    host.machines["mill-2"].breakdown(Now(1.0, 0.0))
    (out,) = host.handle(S.cfp("mill"), cfp(round_id="r2"), Now(1.0, 0.0))
    assert out.message.bids == []


def test_host_routes_awards_and_replies_by_machine():
    host = MachineHost.from_plant("host-1", CONFIG, ["mill-1", "mill-2"])
    host.handle(S.cfp("mill"), cfp(), Now(1.0, 0.0))
    accept = Accept(round_id="r1", machine="mill-2", job="j1", op=0)
    (req,) = messages(host.handle(S.award("r1"), accept, Now(1.0, 0.0)), PowerRequest)
    assert req.machine == "mill-2"
    reject = Reject(round_id="r1", machines=["mill-1"])
    assert host.handle(S.award("r1"), reject, Now(1.0, 0.0)) == []
    assert "r1" not in host.machines["mill-1"].bids
    grant = PowerGrant(request_id=req.request_id, machine="mill-2", power_w=1, until_at=1e4)
    out = host.handle(S.energy_reply("mill-2"), grant, Now(1.1, 6.0))
    assert len(messages(out, SetpointRequest)) == 2


def test_custom_policy_plugs_in():
    class Never:
        def bid(self, cfp: CallForProposals, context: BidContext) -> Bid | None:
            return None

    assert isinstance(Never(), BiddingPolicy)
    agent = MachineAgent.from_plant("mill-1", CONFIG, policy=Never())
    assert agent.handle(S.cfp("mill"), cfp(), Now(1.0, 0.0)) == []


def test_snapshot_restore_keeps_the_queue(mill):
    start(mill, cfp())
    award(mill, cfp(round_id="r2", job="j2"))
    fresh = MachineAgent.from_plant("mill-1", CONFIG, speedup=60.0)
    fresh.restore(json.loads(json.dumps(mill.snapshot())))
    assert [t.round_id for t in fresh.queue] == ["r1", "r2"]
    out = fresh.operation_finished("j1", 0, Now(11.0, 612.0))
    assert [d.round_id for d in messages(out, InformDone)] == ["r1"]
    assert len(messages(out, PowerRequest)) == 1  # the next one gets going


def test_speed_outside_limits_is_refused():
    with pytest.raises(ValueError, match="outside"):
        MachineAgent.from_plant("mill-1", CONFIG, speed=2.0)


def _telemetry(**kw) -> Telemetry:
    fields = dict(
        machine="mill-1",
        plant_time=10.0,
        status="idle",
        speed_setpoint=1.0,
        load=1.0,
        run_seconds=5.0,
        renewals=0,
        vibration_mm_s=1.0,
        temperature_c=30.0,
        power_w=0.0,
        ops_done=0,
    )
    return Telemetry(**{**fields, **kw})


def test_numbered_order_is_started_by_number_and_finished_by_telemetry(mill):
    mill.handle(S.telemetry("mill-1"), _telemetry(), Now(0.5, 0.0))  # the counter as found
    call = cfp()
    mill.handle(S.cfp("mill"), call, AWARDED_AT)
    out = mill.handle(
        S.award("r1"),
        Accept(round_id="r1", machine="mill-1", job="j1", op=0, plant_job=7),
        AWARDED_AT,
    )
    (req,) = messages(out, PowerRequest)
    grant = PowerGrant(request_id=req.request_id, machine="mill-1", power_w=1, until_at=1e4)
    out = mill.handle(S.energy_reply("mill-1"), grant, Now(1.2, 12.0))
    sets = [(s.variable, s.value) for s in messages(out, SetpointRequest)]
    assert sets == [("speed_setpoint", 1.0), ("start_job", 7.0), ("run", 1.0)]
    # No sign of it at the plant: the start is asked again after start_confirm_seconds.
    again = mill.on_timer(Now(1.2 + mill.start_confirm_seconds, 20.0))
    assert [s.variable for s in messages(again, SetpointRequest)] == [
        "speed_setpoint",
        "start_job",
        "run",
    ]
    running = _telemetry(status="running", plant_job=7, plant_op=0)
    assert mill.handle(S.telemetry("mill-1"), running, Now(4.0, 30.0)) == []
    assert not mill._start_unconfirmed(mill.queue[0])
    # Another machine's work finishing here would be a plant/agent mismatch: counted.
    other = _telemetry(ops_done=1, last_plant_job=3, last_plant_op=0)
    assert mill.handle(S.telemetry("mill-1"), other, Now(5.0, 40.0)) == []
    assert mill.ignored["plant_finished_other"] == 1
    finished = _telemetry(ops_done=2, last_plant_job=7, last_plant_op=0, last_defect=True)
    out = mill.handle(S.telemetry("mill-1"), finished, Now(6.0, 650.0))
    (done,) = messages(out, InformDone)
    assert (done.job, done.op, done.defect) == ("j1", 0, True)
    assert mill.active_operation() is None
    # The same counter again is not a second completion.
    assert messages(mill.handle(S.telemetry("mill-1"), finished, Now(7.0, 660.0)), InformDone) == []


class FixedSpeed:
    """A speed-choosing policy that bids every capable call at one speed (priced at the
    machine's own speed when that one is outside its limits)."""

    def __init__(self, speed: float) -> None:
        self.speed = speed

    def bid(self, cfp: CallForProposals, context: BidContext) -> Bid | None:
        return RuleBasedBidding().bid(cfp, context)

    def bid_with_speed(
        self, cfp: CallForProposals, context: BidContext
    ) -> tuple[Bid, float] | None:
        if cfp.capability not in context.spec.capabilities:
            return None
        spec = context.spec
        inside = spec.speed_min <= self.speed <= spec.speed_max
        return honest_bid(cfp, context, self.speed if inside else None), self.speed


def test_honest_bid_prices_the_speed_it_is_given():
    plant = compile_plant(CONFIG)
    spec = MachineSpec.from_plant(plant, "mill-1")
    tariff = Tariff.from_plant(CONFIG)
    context = BidContext("mill-1", spec, 1.0, 0.8, queue_end_at=300.0, now=100.0, tariff=tariff)
    slow = honest_bid(cfp(), context, 0.75)
    assert slow.finish_at == pytest.approx(300.0 + 600.0 / 0.75)
    power = spec.running_power_w(0.75, 1.0, 0.8)
    assert slow.energy_cost == pytest.approx(tariff.cost(power, 300.0, 800.0))
    mid = 0.8 - spec.wear_rate(0.75, 1.0) * 400
    assert slow.health_risk == pytest.approx(1 - math.exp(-spec.hazard(mid) * 800))
    assert honest_bid(cfp(), context) == honest_bid(cfp(), context, 1.0)
    with pytest.raises(ValueError, match=r"speed 2.0 of mill-1 is outside \[0.6, 1.3\]"):
        honest_bid(cfp(), context, 2.0)


def test_a_chosen_speed_is_bid_kept_and_run_at():
    mill = MachineAgent.from_plant("mill-1", CONFIG, speedup=60.0, policy=FixedSpeed(0.8))
    assert isinstance(mill.policy, SpeedBiddingPolicy)
    (out,) = mill.handle(S.cfp("mill"), cfp(), Now(1.0, 50.0))
    assert out.message.finish_at == pytest.approx(50.0 + 600.0 / 0.8)
    assert mill.bid_speeds == {"r1": 0.8}
    accept = Accept(round_id="r1", machine="mill-1", job="j1", op=0)
    (req,) = messages(mill.handle(S.award("r1"), accept, Now(1.0, 50.0)), PowerRequest)
    (task,) = mill.queue
    assert (task.speed, mill.speed, mill.bid_speeds) == (0.8, 1.0, {})
    assert req.power_w == pytest.approx(mill.spec.running_power_w(0.8, 1.0, 1.0))
    assert req.duration_seconds == pytest.approx(750.0)
    assert mill.queue_end_at(Now(1.0, 50.0)) == pytest.approx(800.0)
    # The next bid queues behind the slow one, at its own chosen speed.
    (nxt,) = mill.handle(S.cfp("mill"), cfp(round_id="r2", job="j2"), Now(1.0, 50.0))
    assert nxt.message.finish_at == pytest.approx(800.0 + 750.0)
    grant = PowerGrant(request_id=req.request_id, machine="mill-1", power_w=1, until_at=1e4)
    out = mill.handle(S.energy_reply("mill-1"), grant, Now(1.2, 60.0))
    assert [(s.variable, s.value) for s in messages(out, SetpointRequest)] == [
        ("speed_setpoint", 0.8),
        ("run", 1.0),
    ]
    assert task.finish_at == pytest.approx(60.0 + 750.0)
    mill.operation_finished("j1", 0, Now(14.0, 810.0))
    assert mill.health == pytest.approx(1.0 - mill.spec.wear_rate(0.8, 1.0) * 750.0)


def test_a_chosen_speed_survives_snapshot_and_restore():
    mill = MachineAgent.from_plant("mill-1", CONFIG, speedup=60.0, policy=FixedSpeed(0.7))
    start(mill, cfp())
    mill.handle(S.cfp("mill"), cfp(round_id="r2", job="j2"), Now(1.3, 15.0))
    state = json.loads(json.dumps(mill.snapshot()))
    fresh = MachineAgent.from_plant("mill-1", CONFIG, speedup=60.0)
    fresh.restore(state)
    assert fresh.queue[0].speed == 0.7
    assert fresh.bid_speeds == {"r2": 0.7}
    accept = Accept(round_id="r2", machine="mill-1", job="j2", op=0)
    fresh.handle(S.award("r2"), accept, Now(1.4, 20.0))
    assert [t.speed for t in fresh.queue] == [0.7, 0.7]
    again = fresh.on_timer(Now(1.2 + fresh.start_confirm_seconds, 30.0))
    assert messages(again, SetpointRequest) == []  # not numbered: nothing to confirm
    fresh.queue[0].plant_job = 4
    fresh._plant_started = False
    again = fresh.on_timer(Now(1.2 + fresh.start_confirm_seconds, 30.0))
    assert ("speed_setpoint", 0.7) in [
        (s.variable, s.value) for s in messages(again, SetpointRequest)
    ]


def test_a_snapshot_from_before_per_task_speeds_runs_at_the_machine_speed(mill):
    start(mill, cfp())
    mill.handle(S.cfp("mill"), cfp(round_id="r2", job="j2"), Now(1.3, 15.0))
    state = json.loads(json.dumps(mill.snapshot()))
    for task in state["queue"]:
        del task["speed"]
    del state["bid_speeds"]
    fresh = MachineAgent.from_plant("mill-1", CONFIG, speedup=60.0, speed=0.9)
    fresh.restore({**state, "speed": 0.9})
    assert fresh.queue[0].speed is None
    assert fresh.queue[0].duration(fresh.speed) == pytest.approx(600.0 / 0.9)
    assert fresh.bid_speeds == {"r2": 0.9}
    out = fresh.operation_finished("j1", 0, Now(11.0, 612.0))
    assert len(messages(out, InformDone)) == 1


@pytest.mark.parametrize(("asked", "runs"), [(2.0, 1.3), (0.1, 0.6)])
def test_a_speed_outside_the_limits_is_clamped_and_priced_again(asked, runs):
    mill = MachineAgent.from_plant("mill-1", CONFIG, policy=FixedSpeed(asked))
    bid = mill.make_bid(cfp(), Now(1.0, 0.0))
    assert bid is not None
    context = BidContext("mill-1", mill.spec, 1.0, 1.0, 0.0, 0.0, mill.tariff)
    assert bid == honest_bid(cfp(), context, runs)
    assert mill.bid_speeds == {"r1": runs}
    assert mill.ignored["speed_clamped"] == 1


def test_a_speed_that_is_not_a_number_is_not_bid():
    mill = MachineAgent.from_plant("mill-1", CONFIG, policy=FixedSpeed(math.nan))
    assert mill.handle(S.cfp("mill"), cfp(), Now(1.0, 0.0)) == []
    assert mill.bids == {}
    assert mill.ignored["speed_not_finite"] == 1


def test_finish_after_a_withdrawal_is_still_reported(mill):
    """A withdrawn award whose operation the plant finishes anyway (the stop crossed the
    finish) is reported, so the scheduler can take it instead of having it done twice."""
    start(mill, cfp())
    out = mill.handle(
        S.award("r1"), Reject(round_id="r1", machines=["mill-1"], reason="withdrawn"), AWARDED_AT
    )
    assert [s.value for s in messages(out, SetpointRequest)] == [0.0]
    (done,) = messages(mill.operation_finished("j1", 0, Now(11.0, 612.0)), InformDone)
    assert (done.round_id, done.job, done.op) == ("r1", "j1", 0)
    assert mill.ignored["finished_after_stop"] == 1
    assert mill.operation_finished("j1", 0, Now(12.0, 620.0)) == []  # once only
    assert mill.ignored["finish_unknown"] == 1
