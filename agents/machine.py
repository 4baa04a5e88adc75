"""Machine agents: bid for operations, get material and power, ask the supervisor to run.

A :class:`MachineAgent` speaks for one machine; a :class:`MachineHost` speaks for many in
one handler and answers each call for proposals with one :class:`ProposalBatch`, which is
how a round with 100 bidders stays within a few milliseconds.

Life of an awarded operation
----------------------------
1. A call arrives; the :class:`~autofab.agents.bidding.BiddingPolicy` prices it from the
   machine's queue, speed and estimated health. A policy that chooses speeds
   (:class:`~autofab.agents.bidding.SpeedBiddingPolicy`) picks the speed the operation
   would run at and prices it there; any other runs it at the machine's own ``speed``. A
   chosen speed outside ``[speed_min, speed_max]`` is clamped and the bid priced again at
   the clamped speed (counted as ``speed_clamped``), so a bid is always one the machine
   can keep. The call and its speed are kept until it is awarded, rejected, or
   ``award_wait_seconds`` after its deadline.
2. :class:`Accept` puts the operation at the end of the queue as a :class:`Task` with the
   speed it was bid at; that speed times it in the queue, sizes its power request, is the
   ``speed_setpoint`` it starts with and sets its wear. Only the head of the queue
   asks for resources, one at a time, so nothing is hoarded: first material
   (:class:`MaterialReserve`, when the operation needs any), then power
   (:class:`PowerRequest`). A deny or shortage retries at the plant time the other agent
   named (``retry_at``, ``available_at``), or after ``retry_seconds``; a request with no
   reply is asked again after ``request_timeout_seconds`` under a new id.
3. With both in hand the agent sends :class:`SetpointRequest` ``speed_setpoint`` (the
   task's speed), ``start_job`` (where the plant numbers its orders) and then ``run`` = 1
   to the safety supervisor, with a TTL. It never writes to the plant. The supervisor may
   clamp the speed (its bounds, its rate limit between writes); the plant then runs at
   the speed applied, and the operation ends sooner or later than the bid said.
4. Completion comes from the plant: the runtime (or the test world,
   :class:`autofab.agents.scenario.PlantWorld`) calls :meth:`MachineAgent.operation_finished`
   when the plant reports the operation done. The agent then sends :class:`InformDone`,
   releases the power, sends ``run`` = 0 and starts on the next operation. A breakdown is
   :meth:`MachineAgent.breakdown` (or a :class:`Telemetry` with status ``"down"``): every
   operation in the queue is answered with :class:`Failure`, so the scheduler announces
   them again, and the resources are released (material only if the operation had not
   started, since a started one consumed it).
5. :class:`Reject` for an operation already in the queue withdraws the award (the
   scheduler gave up waiting for it): the agent drops it, stopping it if it runs.

Anything that does not fit this story (a grant for a request it no longer waits on, a
second Accept for a round) is answered safely (the grant is released) and counted in
:attr:`MachineAgent.ignored`.

Health
------
The agent keeps its own health estimate: it starts at ``health`` and falls by the plant's
wear law (at the operation's speed) for every operation it completes; a repair restores
it. :meth:`set_health` lets a predictive-maintenance monitor replace it. A
:class:`HealthReport` goes out every ``health_interval_seconds`` (wall time) and whenever
the breakdown probability moves by ``report_delta`` or the machine goes down or comes
back.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.bidding import (
    BidContext,
    BiddingPolicy,
    MachineSpec,
    RuleBasedBidding,
    honest_bid,
)
from autofab.agents.energy import Tariff, bounded_add, plant_to_wall
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
    MessageBase,
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
from autofab.envs.plant import PlantConfig, compile_plant

__all__ = ["MachineAgent", "MachineHost", "Task"]

#: How many stopped operations a machine remembers (one or two is the most it can hold).
_STOPPED_KEEP = 8


@dataclass
class Task:
    """An awarded operation in a machine's queue, and where it stands.

    ``speed`` is the speed it was bid at and runs at; ``None`` (a snapshot from before
    per-operation speeds) means the machine's own speed.
    """

    round_id: str
    job: str
    op: int
    processing_seconds: float
    load: float
    material: str | None
    quantity: float
    finish_at: float
    attempt: int = 0
    material_request: str | None = None
    material_held: bool = False
    power_request: str | None = None
    power_held: bool = False
    request_sent_wall: float | None = None
    retry_wall: float | None = None
    power_w: float = 0.0
    started_at: float | None = None
    plant_job: int | None = None
    start_sent_wall: float | None = None
    speed: float | None = None

    @property
    def running(self) -> bool:
        return self.started_at is not None

    def speed_or(self, default: float) -> float:
        """The task's speed, or ``default`` (the machine's speed) when it has none."""
        return default if self.speed is None else self.speed

    def duration(self, default_speed: float) -> float:
        """Running seconds at the task's speed (``default_speed`` when it has none)."""
        return self.processing_seconds / self.speed_or(default_speed)


class MachineAgent(Agent):
    """The agent of one machine; see the module docstring for what it does and why.

    ``speed`` is the machine's own speed: what an operation runs at unless the policy
    chooses one per operation. ``speedup`` (plant seconds per wall second) is used only
    to turn plant-time retry times into wall-time timers.
    """

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        spec: MachineSpec,
        tariff: Tariff,
        *,
        policy: BiddingPolicy | None = None,
        speed: float | None = None,
        health: float = 1.0,
        speedup: float = 1.0,
        health_interval_seconds: float = 60.0,
        health_horizon_seconds: float = 3600.0,
        report_delta: float = 0.02,
        setpoint_ttl_seconds: float = 5.0,
        retry_seconds: float = 60.0,
        request_timeout_seconds: float = 2.0,
        award_wait_seconds: float = 5.0,
        start_confirm_seconds: float = 2.0,
        memory: int = 10_000,
    ) -> None:
        super().__init__(name)
        self.subjects = subjects
        self.spec = spec
        self.tariff = tariff
        self.policy: BiddingPolicy = policy or RuleBasedBidding()
        self.speed = spec.speed_nominal if speed is None else speed
        if not spec.speed_min <= self.speed <= spec.speed_max:
            raise ValueError(
                f"speed {self.speed} of {name} is outside [{spec.speed_min}, {spec.speed_max}]"
            )
        self.health = health
        self.speedup = speedup
        self.health_interval_seconds = health_interval_seconds
        self.health_horizon_seconds = health_horizon_seconds
        self.report_delta = report_delta
        self.setpoint_ttl_seconds = setpoint_ttl_seconds
        self.retry_seconds = retry_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.award_wait_seconds = award_wait_seconds
        self.start_confirm_seconds = start_confirm_seconds
        self.memory = memory
        self.status: Literal["up", "down"] = "up"
        self.queue: list[Task] = []
        #: Calls this machine bid on, by round, awaiting Accept or Reject.
        self.bids: dict[str, CallForProposals] = {}
        #: The speed of each bid in ``bids``, by round (what an Accept will run it at).
        self.bid_speeds: dict[str, float] = {}
        #: Rounds finished, failed or withdrawn here: a late Accept for one is ignored.
        self.closed: OrderedDict[str, None] = OrderedDict()
        #: Running operations whose award was withdrawn, by (job, op): if the plant
        #: finishes one anyway, it is reported (:meth:`_stopped_finished`).
        self.stopped: OrderedDict[tuple[str, int], Task] = OrderedDict()
        #: Material reservations used up by an operation that started: never released.
        self.consumed: OrderedDict[str, None] = OrderedDict()
        self.completed = 0
        self._seq = 0
        self._next_report: float | None = 0.0
        self._reported: tuple[float, str] | None = None
        #: The plant's ``ops_done`` counter as last seen, and whether the plant was seen
        #: running the head operation (telemetry from a plant with numbered orders).
        self._ops_done: int | None = None
        self._plant_started = False

    @classmethod
    def from_plant(cls, name: str, config: PlantConfig, **kwargs: Any) -> MachineAgent:
        """The agent of machine ``name`` in ``config``, with the plant's tariff."""
        spec = MachineSpec.from_plant(compile_plant(config), name)
        return cls(name, Subjects(config.name), spec, Tariff.from_plant(config), **kwargs)

    # --- Agent interface ---------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return [
            *(Subscription(self.subjects.cfp(c)) for c in sorted(self.spec.capabilities)),
            Subscription(self.subjects.award_all),
            Subscription(self.subjects.energy_reply(self.name)),
            Subscription(self.subjects.material_reply(self.name)),
            Subscription(self.subjects.telemetry(self.name)),
        ]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        if isinstance(message, CallForProposals):
            bid = self.make_bid(message, now)
            if bid is None:
                return []
            proposal = Proposal(
                round_id=message.round_id,
                machine=bid.machine,
                finish_at=bid.finish_at,
                energy_cost=bid.energy_cost,
                health_risk=bid.health_risk,
            )
            return [Outgoing(self.subjects.bid(message.round_id), proposal)]
        return self.receive(message, now)

    def next_timer(self) -> float | None:
        times = [self._next_report] if self._next_report is not None else []
        if self.bids:
            times.append(min(c.deadline for c in self.bids.values()) + self.award_wait_seconds)
        if self.queue and self.status == "up":
            head = self.queue[0]
            if self._start_unconfirmed(head):
                assert head.start_sent_wall is not None
                times.append(head.start_sent_wall + self.start_confirm_seconds)
            elif head.retry_wall is not None:
                times.append(head.retry_wall)
            elif head.request_sent_wall is not None:
                times.append(head.request_sent_wall + self.request_timeout_seconds)
        return min(times) if times else None

    def on_timer(self, now: Now) -> list[Outgoing]:
        for round_id in [
            r for r, c in self.bids.items() if c.deadline + self.award_wait_seconds <= now.wall
        ]:
            del self.bids[round_id]
            self.bid_speeds.pop(round_id, None)
        out: list[Outgoing] = []
        if self.queue:
            head = self.queue[0]
            if (
                self.status == "up"
                and self._start_unconfirmed(head)
                and head.start_sent_wall is not None
                and head.start_sent_wall + self.start_confirm_seconds <= now.wall
            ):
                # No sign of it at the plant (a refused or lost setpoint, or the plant is
                # waiting for material): ask again; a repeat of a start is harmless.
                self._count("start_repeated")
                out += self._start_commands(head, now)
            if head.retry_wall is not None and head.retry_wall <= now.wall:
                head.retry_wall = None
            elif (
                head.request_sent_wall is not None
                and head.request_sent_wall + self.request_timeout_seconds <= now.wall
            ):
                self._count("request_timeout")
                self._forget_request(head)
        out += self._advance(now)
        if self._next_report is None or self._next_report <= now.wall:
            out += self._report(now)
        return out

    # --- What a host calls ---------------------------------------------------------------

    def make_bid(self, cfp: CallForProposals, now: Now) -> Bid | None:
        """This machine's bid for ``cfp``, or ``None`` (down, incapable, or declined).

        The speed it is bid at is kept in :attr:`bid_speeds` until the round is decided.
        """
        round_id = cfp.round_id
        if self.status == "down" or round_id in self.closed:
            return None
        # One pass over the queue: is the round already ours, and when is the queue done
        # (the same sum as queue_end_at, inlined: a host runs this for every machine).
        end = now.plant
        speed = self.speed
        for task in self.queue:
            if task.round_id == round_id:
                return None
            duration = task.processing_seconds / (speed if task.speed is None else task.speed)
            started = task.started_at
            end = max(end, started + duration) if started is not None else end + duration
        context = BidContext(
            machine=self.name,
            spec=self.spec,
            speed=speed,
            health=self.health,
            queue_end_at=end,
            now=now.plant,
            tariff=self.tariff,
        )
        policy = self.policy
        choose = getattr(policy, "bid_with_speed", None)
        if choose is None:
            bid = policy.bid(cfp, context)
        else:
            chosen: tuple[Bid, float] | None = choose(cfp, context)
            if chosen is None:
                return None
            bid, speed = chosen
            spec = self.spec
            if not math.isfinite(speed):
                self._count("speed_not_finite")
                return None
            if not spec.speed_min <= speed <= spec.speed_max:
                self._count("speed_clamped")
                speed = min(max(speed, spec.speed_min), spec.speed_max)
                bid = honest_bid(cfp, context, speed)
        if bid is not None:
            self.bids[round_id] = cfp
            self.bid_speeds[round_id] = speed
        return bid

    def receive(self, message: MessageBase, now: Now) -> list[Outgoing]:
        """Everything but a call for proposals: awards, replies, telemetry."""
        if isinstance(message, Accept):
            if message.machine != self.name:
                return []
            return self._accept(message, now)
        if isinstance(message, Reject):
            if self.name not in message.machines:
                return []
            return self._reject(message, now)
        if isinstance(message, PowerGrant | PowerDeny | MaterialReserved | MaterialUnavailable):
            if message.machine != self.name:
                return []
            return self._reply(message, now)
        if isinstance(message, Telemetry):
            if message.machine != self.name:
                return []
            out = self._observe_work(message, now)
            if message.status == "down" and self.status == "up":
                return out + self.breakdown(now, "the plant reports the machine down")
            if message.status != "down" and self.status == "down":
                return out + self.repaired(now)
            return out
        self._count(f"unexpected_{message.type}")
        return []

    def queue_end_at(self, now: Now) -> float:
        """Plant time at which the awarded work in the queue should be done."""
        end = now.plant
        for task in self.queue:
            duration = task.duration(self.speed)
            end = (
                max(end, task.started_at + duration)
                if task.started_at is not None
                else end + duration
            )
        return end

    def active_operation(self) -> Task | None:
        """The operation running now, if any (what the plant world watches)."""
        if self.queue and self.queue[0].running:
            return self.queue[0]
        return None

    def _start_unconfirmed(self, task: Task) -> bool:
        """``task`` was started by number and the plant has not been seen running it."""
        return task.running and task.plant_job is not None and not self._plant_started

    def _observe_work(self, t: Telemetry, now: Now) -> list[Outgoing]:
        """Follow the head operation at a plant that reports numbered orders: seen running,
        then seen finished (``ops_done`` moved on, with it as the last one done)."""
        head = self.active_operation()
        if head is not None and t.plant_job == head.plant_job and t.plant_op == head.op:
            self._plant_started = True
        if t.ops_done is None:
            return []
        seen, self._ops_done = self._ops_done, t.ops_done
        if seen is None or t.ops_done <= seen:
            return []
        if head is None or (t.last_plant_job, t.last_plant_op) != (head.plant_job, head.op):
            for (job, op), task in list(self.stopped.items()):
                if (task.plant_job, op) == (t.last_plant_job, t.last_plant_op):
                    return self._stopped_finished(job, op, now, t.last_defect)
            if head is not None:
                self._count("plant_finished_other")
            return []
        if head.plant_job is None:
            return []
        return self.operation_finished(head.job, head.op, now, defect=t.last_defect)

    def _stopped_finished(self, job: str, op: int, now: Now, defect: bool) -> list[Outgoing]:
        """The plant finished an operation this machine was told to drop (its award was
        withdrawn while it ran): the work is done all the same, so say so. The scheduler
        takes it while the job still waits for that operation, and calls off the round
        announced in its place; otherwise it counts it as stale."""
        task = self.stopped.pop((job, op), None)
        if task is None or task.started_at is None:
            self._count("finish_unknown")
            return []
        self._count("finished_after_stop")
        run = max(now.plant - task.started_at, 0.0)
        done = InformDone(
            round_id=task.round_id,
            machine=self.name,
            job=job,
            op=op,
            started_at=task.started_at,
            finished_at=max(now.plant, task.started_at),
            energy_j=task.power_w * run,
            defect=defect,
        )
        return [Outgoing(self.subjects.result(task.round_id), done)]

    def operation_finished(
        self, job: str, op: int, now: Now, defect: bool = False
    ) -> list[Outgoing]:
        """The plant says ``job``/``op`` is done (``defect``: with a bad part): report it,
        release, take the next one."""
        task = self.active_operation()
        if task is None or (task.job, task.op) != (job, op):
            return self._stopped_finished(job, op, now, defect)
        assert task.started_at is not None
        self.queue.pop(0)
        bounded_add(self.closed, task.round_id, self.memory)
        self.completed += 1
        run = max(now.plant - task.started_at, 0.0)
        wear = self.spec.wear_rate(task.speed_or(self.speed), task.load)
        self.health = max(0.0, self.health - wear * run)
        done = InformDone(
            round_id=task.round_id,
            machine=self.name,
            job=task.job,
            op=task.op,
            started_at=task.started_at,
            finished_at=max(now.plant, task.started_at),
            energy_j=task.power_w * run,
            defect=defect,
        )
        out = [
            Outgoing(self.subjects.result(task.round_id), done),
            *self._release(task),
            self._setpoint("run", 0.0, now),
        ]
        out += self._advance(now)
        return out + self._report_if_changed(now)

    def breakdown(self, now: Now, reason: str = "machine breakdown") -> list[Outgoing]:
        """The machine broke down: fail every queued operation so each is announced again."""
        if self.status == "down":
            return []
        self.status = "down"
        out: list[Outgoing] = []
        for task in self.queue:
            out.append(self._fail(task.round_id, task.job, task.op, now, reason))
            out += self._release(task)
        self.queue = []
        return out + self._report(now)

    def repaired(self, now: Now, health: float = 1.0) -> list[Outgoing]:
        """The machine is back from repair or maintenance, with ``health``."""
        if self.status == "up":
            return []
        self.status = "up"
        self.health = health
        return self._report(now)

    def set_health(self, health: float) -> None:
        """Replace the health estimate (e.g. from a predictive-maintenance monitor)."""
        self.health = min(max(health, 0.0), 1.0)

    # --- Internals ---------------------------------------------------------------------

    def _fail(self, round_id: str, job: str, op: int, now: Now, reason: str) -> Outgoing:
        """Close ``round_id`` here for good and tell the scheduler, which announces again."""
        bounded_add(self.closed, round_id, self.memory)
        failure = Failure(
            round_id=round_id, machine=self.name, job=job, op=op, failed_at=now.plant, reason=reason
        )
        return Outgoing(self.subjects.result(round_id), failure)

    def _accept(self, acc: Accept, now: Now) -> list[Outgoing]:
        if acc.round_id in self.closed or any(t.round_id == acc.round_id for t in self.queue):
            self._count("duplicate_accept")
            return []
        cfp = self.bids.pop(acc.round_id, None)
        speed = self.bid_speeds.pop(acc.round_id, self.speed)
        reason = None
        if self.status == "down":
            reason = "machine down"
        elif cfp is None or (cfp.job, cfp.op) != (acc.job, acc.op):
            reason = "award without a matching bid on record"
        if reason is not None or cfp is None:
            return [self._fail(acc.round_id, acc.job, acc.op, now, reason or "no bid")]
        duration = cfp.processing_seconds / speed
        self.queue.append(
            Task(
                round_id=acc.round_id,
                job=acc.job,
                op=acc.op,
                processing_seconds=cfp.processing_seconds,
                load=cfp.load,
                material=cfp.material if cfp.quantity > 0 else None,
                quantity=cfp.quantity,
                finish_at=self.queue_end_at(now) + duration,
                plant_job=acc.plant_job,
                speed=speed,
            )
        )
        return self._advance(now)

    def _reject(self, rej: Reject, now: Now) -> list[Outgoing]:
        self.bids.pop(rej.round_id, None)
        self.bid_speeds.pop(rej.round_id, None)
        for i, task in enumerate(self.queue):
            if task.round_id == rej.round_id:
                del self.queue[i]
                bounded_add(self.closed, task.round_id, self.memory)
                out = self._release(task)
                if task.running:
                    # Stopped, but it may finish anyway (a cycle stop lets the running
                    # operation end, and the stop may cross the finish): keep it, so a
                    # finish the plant reports is still told to the scheduler.
                    bounded_add(self.stopped, (task.job, task.op), _STOPPED_KEEP, task)
                    out.append(self._setpoint("run", 0.0, now))
                return out + self._advance(now)
        return []

    def _reply(
        self, msg: PowerGrant | PowerDeny | MaterialReserved | MaterialUnavailable, now: Now
    ) -> list[Outgoing]:
        power = isinstance(msg, PowerGrant | PowerDeny)
        for task in self.queue:
            awaited = task.power_request if power else task.material_request
            held = task.power_held if power else task.material_held
            if awaited != msg.request_id:
                continue
            if held:
                self._count("duplicate_reply")
                return []
            task.request_sent_wall = None
            if isinstance(msg, PowerGrant):
                task.power_held = True
            elif isinstance(msg, MaterialReserved):
                task.material_held = True
            else:
                if isinstance(msg, PowerDeny):
                    task.power_request, retry_at = None, msg.retry_at
                else:
                    task.material_request, retry_at = None, msg.available_at
                if retry_at is None or retry_at <= now.plant:
                    retry_at = now.plant + self.retry_seconds
                task.retry_wall = plant_to_wall(retry_at, now, self.speedup)
            return self._advance(now)
        # Nobody waits for it: give back what it grants, so nothing leaks.
        self._count("unexpected_reply")
        if isinstance(msg, PowerGrant):
            release = PowerRelease(request_id=msg.request_id, machine=self.name)
            return [Outgoing(self.subjects.energy_release, release)]
        if isinstance(msg, MaterialReserved) and msg.request_id not in self.consumed:
            give_back = MaterialRelease(request_id=msg.request_id, machine=self.name)
            return [Outgoing(self.subjects.material_release, give_back)]
        return []

    def _forget_request(self, task: Task) -> None:
        """Stop waiting for an unanswered request; a late answer will be released."""
        if not task.material_held:
            task.material_request = None
        elif not task.power_held:
            task.power_request = None
        task.request_sent_wall = None

    def _advance(self, now: Now) -> list[Outgoing]:
        """Move the head of the queue one step: material, then power, then run."""
        if self.status == "down" or not self.queue:
            return []
        task = self.queue[0]
        if task.running or task.retry_wall is not None or task.request_sent_wall is not None:
            return []
        if task.material is not None and not task.material_held:
            task.attempt += 1
            task.material_request = f"{self.name}-{task.round_id}-m{task.attempt}"
            task.request_sent_wall = now.wall
            reserve = MaterialReserve(
                request_id=task.material_request,
                machine=self.name,
                job=task.job,
                op=task.op,
                material=task.material,
                quantity=task.quantity,
            )
            return [Outgoing(self.subjects.material_reserve, reserve)]
        if not task.power_held:
            task.attempt += 1
            task.power_request = f"{self.name}-{task.round_id}-p{task.attempt}"
            task.request_sent_wall = now.wall
            task.power_w = self.spec.running_power_w(
                task.speed_or(self.speed), task.load, self.health
            )
            request = PowerRequest(
                request_id=task.power_request,
                machine=self.name,
                job=task.job,
                op=task.op,
                power_w=task.power_w,
                start_at=now.plant,
                duration_seconds=task.duration(self.speed),
            )
            return [Outgoing(self.subjects.energy_request, request)]
        if task.material_held and task.material_request is not None:
            bounded_add(self.consumed, task.material_request, self.memory)
        task.started_at = now.plant
        task.finish_at = now.plant + task.duration(self.speed)
        self._plant_started = False
        return self._start_commands(task, now)

    def _start_commands(self, task: Task, now: Now) -> list[Outgoing]:
        """The setpoints that start ``task``: its speed, the production order (where the
        plant numbers its orders), then run."""
        task.start_sent_wall = now.wall
        out = [self._setpoint("speed_setpoint", task.speed_or(self.speed), now)]
        if task.plant_job is not None:
            out.append(self._setpoint("start_job", float(task.plant_job), now))
        return [*out, self._setpoint("run", 1.0, now)]

    def _release(self, task: Task) -> list[Outgoing]:
        """Give back what ``task`` holds: power always, material only if it did not start."""
        out: list[Outgoing] = []
        if task.power_held and task.power_request is not None:
            release = PowerRelease(request_id=task.power_request, machine=self.name)
            out.append(Outgoing(self.subjects.energy_release, release))
        if task.material_held and task.material_request is not None and not task.running:
            give_back = MaterialRelease(request_id=task.material_request, machine=self.name)
            out.append(Outgoing(self.subjects.material_release, give_back))
        task.power_held = task.material_held = False
        return out

    def _setpoint(self, variable: str, value: float, now: Now) -> Outgoing:
        self._seq += 1
        request = SetpointRequest(
            request_id=f"{self.name}-sp{self._seq}",
            machine=self.name,
            variable=variable,
            value=value,
            requested_at=now.wall,
            ttl_seconds=self.setpoint_ttl_seconds,
            origin=self.name,
        )
        return Outgoing(self.subjects.setpoint_request, request, self.setpoint_ttl_seconds)

    def failure_probability(self) -> float:
        """Chance of a breakdown within the next ``health_horizon_seconds`` of running."""
        return 1.0 - math.exp(-self.spec.hazard(self.health) * self.health_horizon_seconds)

    def _report(self, now: Now) -> list[Outgoing]:
        probability = self.failure_probability()
        hazard = self.spec.hazard(self.health)
        report = HealthReport(
            machine=self.name,
            plant_time=now.plant,
            rul_seconds=None if self.status == "down" or hazard <= 0 else 1.0 / hazard,
            failure_probability=min(max(probability, 0.0), 1.0),
            horizon_seconds=self.health_horizon_seconds,
        )
        self._reported = (probability, self.status)
        self._next_report = now.wall + self.health_interval_seconds
        return [Outgoing(self.subjects.health(self.name), report)]

    def _report_if_changed(self, now: Now) -> list[Outgoing]:
        if self._reported is None:
            return self._report(now)
        probability, status = self._reported
        if (
            status != self.status
            or abs(self.failure_probability() - probability) >= self.report_delta
        ):
            return self._report(now)
        return []

    def snapshot(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "health": self.health,
            "speed": self.speed,
            "queue": [asdict(t) for t in self.queue],
            "bids": {r: c.model_dump(mode="json", by_alias=True) for r, c in self.bids.items()},
            "bid_speeds": dict(self.bid_speeds),
            "closed": list(self.closed),
            "consumed": list(self.consumed),
            "ignored": dict(self.ignored),
            "completed": self.completed,
            "seq": self._seq,
            "ops_done": self._ops_done,
            "plant_started": self._plant_started,
            "stopped": [asdict(t) for t in self.stopped.values()],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.status = state["status"]
        self.health = float(state["health"])
        self.speed = float(state["speed"])
        self.queue = [Task(**t) for t in state["queue"]]
        self.bids = {r: CallForProposals.model_validate(c) for r, c in state["bids"].items()}
        # Snapshots from before per-operation speeds have none: those bids run at ``speed``.
        speeds = state.get("bid_speeds", {})
        self.bid_speeds = {r: float(speeds.get(r, self.speed)) for r in self.bids}
        self.closed = OrderedDict.fromkeys(str(r) for r in state["closed"])
        self.consumed = OrderedDict.fromkeys(str(r) for r in state["consumed"])
        self.ignored = dict(state["ignored"])
        self.completed = int(state["completed"])
        self._seq = int(state["seq"])
        self._ops_done = state.get("ops_done")
        self._plant_started = bool(state.get("plant_started", False))
        stopped = [Task(**t) for t in state.get("stopped", [])]
        self.stopped = OrderedDict(((t.job, t.op), t) for t in stopped)
        self._next_report = 0.0


class MachineHost(Agent):
    """Many machine agents behind one handler: one :class:`ProposalBatch` per call.

    The host answers every call it hears, with an empty batch when none of its machines
    bids, so the scheduler can count hosts and close a round early. Everything else is
    routed to the machine the message names.
    """

    def __init__(self, name: str, subjects: Subjects, machines: Sequence[MachineAgent]) -> None:
        super().__init__(name)
        if not machines:
            raise ValueError(f"host {name} needs at least one machine")
        self.subjects = subjects
        self.machines: dict[str, MachineAgent] = {m.name: m for m in machines}
        if len(self.machines) != len(machines):
            raise ValueError(f"host {name}: machine names must be unique")

    @classmethod
    def from_plant(
        cls, name: str, config: PlantConfig, machines: Sequence[str] | None = None, **kwargs: Any
    ) -> MachineHost:
        """A host for ``machines`` of ``config`` (default: all of them)."""
        plant = compile_plant(config)
        tariff = Tariff.from_plant(config)
        subjects = Subjects(config.name)
        names = plant.machine_names if machines is None else machines
        agents = [
            MachineAgent(n, subjects, MachineSpec.from_plant(plant, n), tariff, **kwargs)
            for n in names
        ]
        return cls(name, subjects, agents)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset().union(*(m.spec.capabilities for m in self.machines.values()))

    def subscriptions(self) -> list[Subscription]:
        return [
            *(Subscription(self.subjects.cfp(c)) for c in sorted(self.capabilities)),
            Subscription(self.subjects.award_all),
            Subscription(self.subjects.energy_reply_all),
            Subscription(self.subjects.material_reply_all),
            Subscription(self.subjects.telemetry_all),
        ]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        if isinstance(message, CallForProposals):
            bids = [
                bid for m in self.machines.values() if (bid := m.make_bid(message, now)) is not None
            ]
            batch = ProposalBatch(round_id=message.round_id, host=self.name, bids=bids)
            return [Outgoing(self.subjects.bid(message.round_id), batch)]
        if isinstance(message, Reject):
            # What MachineAgent.receive does for a Reject naming the machine, without its
            # search of the (long) name list for each of the (many) machines named.
            out: list[Outgoing] = []
            for name in message.machines:
                agent = self.machines.get(name)
                if agent is not None:
                    out += agent._reject(message, now)
            return out
        machine = getattr(message, "machine", None)
        if isinstance(machine, str) and machine in self.machines:
            return self.machines[machine].receive(message, now)
        return []

    def next_timer(self) -> float | None:
        times = [t for m in self.machines.values() if (t := m.next_timer()) is not None]
        return min(times) if times else None

    def on_timer(self, now: Now) -> list[Outgoing]:
        out: list[Outgoing] = []
        for m in self.machines.values():
            due = m.next_timer()
            if due is not None and due <= now.wall:
                out += m.on_timer(now)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {name: m.snapshot() for name, m in self.machines.items()}

    def restore(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - set(self.machines)
        if unknown:
            raise ValueError(f"host {self.name} has no machines {sorted(unknown)}")
        for name, machine_state in state.items():
            self.machines[name].restore(machine_state)
