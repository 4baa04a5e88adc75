"""The scheduler agent: takes orders, and gets every operation done once, by Contract Net.

Orders
------
:class:`OrderSubmit` (request/reply on ``Subjects.orders_submit``) is checked against the
plant's products and answered with :class:`OrderAck` (order id and job ids, one job per
unit) or :class:`OrderRefused`. The answer is stored under the client's order id, and a
repeated submit gets that first answer again and creates nothing: an MES that timed out
and resent must not get the order twice. :class:`OrderStatusQuery` is answered with
:class:`OrderStatus`.

Contract Net
------------
Each job has at most one *live* round, for its next operation: the next operation
becomes ready only after :class:`InformDone` of the previous one, so a route is done in
order. A round:

1. is announced (:class:`CallForProposals` on ``Subjects.cfp(capability)``) with a wall
   deadline ``bid_window_seconds`` away and a fresh ``round_id``;
2. collects :class:`Proposal` and :class:`ProposalBatch` bids until the deadline, or until
   every expected responder answered (``expected_responders[capability]``: the number of
   hosts and lone machines that hear that capability, if the runtime knows it);
3. awards the lowest :class:`ScoreWeights` score with :class:`Accept`, and turns the rest
   down with one :class:`Reject`;
4. waits for the winner's :class:`InformDone` until the bid's ``finish_at`` plus a grace
   (plant time). No bids, a :class:`Failure`, or no result by then (a lost machine, a lost
   award) closes the round and announces the operation again under a new ``round_id``;
   after a timeout the old winner also gets a :class:`Reject` that withdraws its award, so
   it does not run the operation as well.

Everything that does not fit (a bid for a closed or unknown round, a second bid from one
machine, a second InformDone, an InformDone or Failure from a machine that was not
awarded) changes nothing and is counted by reason in :attr:`SchedulerAgent.ignored`.
Re-announcements are counted by cause in :attr:`SchedulerAgent.reannounced`.

Defects and plant order numbers
-------------------------------
An :class:`InformDone` with ``defect`` set is a bad part: the operation is announced again
(``on_defect="rework"``), or the whole route with a fresh part (``"scrap"``, whose earlier
completions are dropped, so :attr:`SchedulerAgent.completions` lists the work on good
parts). An order submitted with a ``plant_job`` (the plant's own number for it, as the OPC
UA twin has) passes that number on in every call and award, so the winning machine can name
the production order when it asks the plant to start.

Bookkeeping, and why it is indexed
----------------------------------
With hundreds of rounds open and thousands awarded, nothing on a round's path may scan
every round. Timers (bid deadlines, result timeouts, retries) sit in a heap with lazy
deletion: an entry is acted on only if the round or job still holds that exact time, so a
round closed early costs nothing to forget. Each machine's backlog (the latest promised
finish of the rounds it won and has not reported) is kept up to date on award and on
result, not recomputed from every round. Bids are kept as :class:`Bid` objects and scored
straight from their numbers. The agent's rounds and jobs are for reading: change them only
through messages, timers and :meth:`SchedulerAgent.restore`, which rebuild the indexes.

Score
-----
``score = finish * (finish_at - ready_at) + energy * energy_cost + risk * health_risk``,
lowest wins, ties to the machine name. The weights put the three terms in one unit,
seconds of delay: by default a unit of currency is worth an hour of delay, and a certain
breakdown two hours.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.energy import bounded_add, plant_to_wall
from autofab.agents.protocol import (
    Accept,
    Bid,
    CallForProposals,
    Failure,
    InformDone,
    MessageBase,
    OrderAck,
    OrderRefused,
    OrderStatus,
    OrderStatusQuery,
    OrderSubmit,
    Proposal,
    ProposalBatch,
    Reject,
    Subjects,
    decode,
    encode,
)
from autofab.envs.plant import PlantConfig

__all__ = ["Completion", "OperationSpec", "SchedulerAgent", "ScoreWeights"]

#: Round numbers skipped on a restore, so no round id used after the snapshot is reused.
_RESTORE_GAP = 1_000

#: Kinds of timer in the heap: a round's bid deadline, its result timeout, a job's retry.
_DEADLINE, _RESULT, _RETRY = 0, 1, 2


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the award score (see the module docstring); lower scores win."""

    finish: float = 1.0
    energy: float = 3600.0
    risk: float = 7200.0

    def score(self, bid: Bid, ready_at: float) -> float:
        return self.score_of(bid.finish_at, bid.energy_cost, bid.health_risk, ready_at)

    def score_of(
        self, finish_at: float, energy_cost: float, health_risk: float, ready_at: float
    ) -> float:
        """:meth:`score` from the bid's three numbers, for a bid whose finish was moved."""
        return (
            self.finish * max(finish_at - ready_at, 0.0)
            + self.energy * energy_cost
            + self.risk * health_risk
        )


@dataclass(frozen=True)
class OperationSpec:
    """One step of a product's route, as the scheduler announces it."""

    capability: str
    processing_seconds: float
    load: float = 1.0
    material: str | None = None
    quantity: float = 0.0


@dataclass(frozen=True)
class Completion:
    """An operation done: what the scheduler records once per (job, op)."""

    job: str
    op: int
    round_id: str
    machine: str
    started_at: float
    finished_at: float


@dataclass
class _Job:
    job: str
    order: str
    product: str
    due_at: float
    next_op: int = 0
    ready_at: float = 0.0
    round_id: str | None = None
    retry_wall: float | None = None
    finished_at: float | None = None
    plant_job: int | None = None
    defects: int = 0


@dataclass
class _Round:
    round_id: str
    job: str
    op: int
    ready_at: float
    deadline: float
    state: Literal["open", "awarded"] = "open"
    bids: dict[str, Bid] = field(default_factory=dict)
    responders: list[str] = field(default_factory=list)
    winner: str | None = None
    expected_finish: float | None = None
    result_due: float | None = None
    result_wall: float | None = None


@dataclass
class _Order:
    client_order_id: str
    answer: str
    order: str | None = None
    jobs: list[str] = field(default_factory=list)


class SchedulerAgent(Agent):
    """Orders in, operations out by Contract Net; see the module docstring."""

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        routes: Mapping[str, Sequence[OperationSpec]],
        *,
        weights: ScoreWeights | None = None,
        expected_responders: Mapping[str, int] | None = None,
        bid_window_seconds: float = 0.2,
        retry_seconds: float = 1.0,
        grace_seconds: float = 600.0,
        grace_factor: float = 1.0,
        speedup: float = 1.0,
        max_jobs_per_order: int = 1_000,
        memory: int = 100_000,
        on_defect: Literal["scrap", "rework"] = "scrap",
    ) -> None:
        super().__init__(name)
        self.subjects = subjects
        self.routes = {p: tuple(r) for p, r in routes.items()}
        self.weights = weights or ScoreWeights()
        self.expected_responders = dict(expected_responders or {})
        self.bid_window_seconds = bid_window_seconds
        self.retry_seconds = retry_seconds
        self.grace_seconds = grace_seconds
        self.grace_factor = grace_factor
        self.speedup = speedup
        self.max_jobs_per_order = max_jobs_per_order
        self.memory = memory
        if on_defect not in ("scrap", "rework"):
            raise ValueError(f"on_defect: expected 'scrap' or 'rework', got {on_defect!r}")
        self.on_defect = on_defect
        self.orders: dict[str, _Order] = {}
        self.jobs: dict[str, _Job] = {}
        self.rounds: dict[str, _Round] = {}
        #: Closed rounds and how they ended ("done", "failed", "timeout", "no_bids").
        self.closed: OrderedDict[str, str] = OrderedDict()
        self.completions: list[Completion] = []
        self.reannounced: dict[str, int] = {}
        #: Rounds withdrawn for want of a result, and their winner: a late result from it
        #: is still taken while the job waits for that operation (:meth:`_late_done`).
        self.withdrawn: OrderedDict[str, str] = OrderedDict()
        #: Running totals for monitoring: rounds announced, bids taken, awards made.
        self.counts: dict[str, int] = {"rounds": 0, "bids": 0, "awards": 0}
        #: Wall seconds from call to award of recent rounds (the runtime drains it).
        self.round_seconds: deque[float] = deque(maxlen=10_000)
        self._order_seq = 0
        self._round_seq = 0
        # Indexes over rounds and jobs (see "Bookkeeping" in the module docstring).
        self._timers: list[tuple[float, int, str]] = []
        self._timers_limit = 1024
        self._awards: dict[str, dict[str, float]] = {}
        self._backlog_end: dict[str, float] = {}

    @classmethod
    def from_plant(cls, name: str, config: PlantConfig, **kwargs: Any) -> SchedulerAgent:
        """The scheduler of ``config``'s products; ``kwargs`` go to the constructor."""
        routes = {
            p.name: [
                OperationSpec(
                    capability=s.capability,
                    processing_seconds=s.minutes * 60.0,
                    load=s.load,
                    material=s.material,
                    quantity=s.quantity if s.material is not None else 0.0,
                )
                for s in p.route
            ]
            for p in config.products
        }
        kwargs.setdefault("on_defect", config.on_defect)
        return cls(name, Subjects(config.name), routes, **kwargs)

    # --- Agent interface ---------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return [
            Subscription(self.subjects.orders_submit),
            Subscription(self.subjects.orders_query),
            Subscription(self.subjects.bid_all),
            Subscription(self.subjects.result_all),
        ]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        if isinstance(message, Proposal):
            return self._bids(message.round_id, message.machine, [message.bid()], now)
        if isinstance(message, ProposalBatch):
            return self._bids(message.round_id, message.host, message.bids, now)
        if isinstance(message, InformDone):
            return self._done(message, now)
        if isinstance(message, Failure):
            return self._failure(message, now)
        if isinstance(message, OrderSubmit):
            return self._submit(message, now, reply_to)
        if isinstance(message, OrderStatusQuery):
            status = self.order_status(message.client_order_id, now)
            return [Outgoing(reply_to or self.subjects.orders_reply, status)]
        self._count(f"unexpected_{message.type}")
        return []

    def next_timer(self) -> float | None:
        heap = self._timers
        while heap and not self._timer_live(*heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def on_timer(self, now: Now) -> list[Outgoing]:
        heap = self._timers
        rounds: set[str] = set()
        jobs: set[str] = set()
        while heap and heap[0][0] <= now.wall:
            entry = heapq.heappop(heap)
            if self._timer_live(*entry):
                (jobs if entry[1] == _RETRY else rounds).add(entry[2])
        out: list[Outgoing] = []
        # In creation order, as a scan of every round and job would meet them.
        due_rounds = [r for r in self.rounds if r in rounds] if len(rounds) > 1 else rounds
        for round_id in due_rounds:
            rnd = self.rounds[round_id]
            if rnd.state == "open" and rnd.deadline <= now.wall:
                out += self._close(rnd, now)
            elif rnd.result_wall is not None and rnd.result_wall <= now.wall:
                assert rnd.result_due is not None
                if now.plant < rnd.result_due:
                    rnd.result_wall = plant_to_wall(rnd.result_due, now, self.speedup)
                    self._arm(rnd.result_wall, _RESULT, round_id)
                    continue
                out += self._withdraw(rnd, now)
        due_jobs = [j for j in self.jobs if j in jobs] if len(jobs) > 1 else jobs
        for job_id in due_jobs:
            job = self.jobs[job_id]
            if job.retry_wall is not None and job.retry_wall <= now.wall:
                out += self._announce(job, now)
        return out

    def _arm(self, at: float, kind: int, key: str) -> None:
        """Put a timer in the heap; compact the heap when stale entries pile up."""
        heapq.heappush(self._timers, (at, kind, key))
        if len(self._timers) > self._timers_limit:
            self._rebuild_timers()

    def _timer_live(self, at: float, kind: int, key: str) -> bool:
        """Whether a heap entry is still a timer: its round or job holds that very time."""
        if kind == _RETRY:
            job = self.jobs.get(key)
            return job is not None and job.retry_wall == at
        rnd = self.rounds.get(key)
        if rnd is None:
            return False
        if kind == _DEADLINE:
            return rnd.state == "open" and rnd.deadline == at
        return rnd.result_wall == at

    def _rebuild_timers(self) -> None:
        """The heap from the rounds and jobs alone (after a restore, or to drop stale
        entries), so it never holds more than about twice the live timers."""
        timers = [
            (j.retry_wall, _RETRY, k) for k, j in self.jobs.items() if j.retry_wall is not None
        ]
        for key, rnd in self.rounds.items():
            if rnd.state == "open":
                timers.append((rnd.deadline, _DEADLINE, key))
            if rnd.result_wall is not None:
                timers.append((rnd.result_wall, _RESULT, key))
        heapq.heapify(timers)
        self._timers = timers
        self._timers_limit = 2 * len(timers) + 1024

    # --- Queries -------------------------------------------------------------------------

    def order_status(self, client_order_id: str, now: Now) -> OrderStatus:
        """Where an order stands, with an estimated (or actual) finish."""
        record = self.orders.get(client_order_id)
        if record is None or record.order is None:
            return OrderStatus(
                client_order_id=client_order_id,
                order=None,
                status="unknown" if record is None else "refused",
                jobs_done=0,
                jobs_total=0,
            )
        jobs = [self.jobs[j] for j in record.jobs]
        done = [j for j in jobs if j.finished_at is not None]
        started = any(j.next_op > 0 or self._awarded(j) is not None for j in jobs)
        finish = max((self._finish_estimate(j, now) for j in jobs), default=None)
        state: Literal["queued", "in_progress", "done"] = (
            "done" if len(done) == len(jobs) else "in_progress" if started else "queued"
        )
        return OrderStatus(
            client_order_id=client_order_id,
            order=record.order,
            status=state,
            jobs_done=len(done),
            jobs_total=len(jobs),
            finish_at=finish,
        )

    def all_done(self) -> bool:
        """Every job of every accepted order has finished its route."""
        return all(j.finished_at is not None for j in self.jobs.values())

    # --- Orders --------------------------------------------------------------------------

    def _submit(self, msg: OrderSubmit, now: Now, reply_to: str | None) -> list[Outgoing]:
        to = reply_to or self.subjects.orders_reply
        record = self.orders.get(msg.client_order_id)
        if record is not None:
            self._count("repeated_order")
            return [Outgoing(to, decode("snapshot", record.answer.encode()))]
        unknown = sorted({i.product for i in msg.items} - set(self.routes))
        count = sum(i.quantity for i in msg.items)
        answer: OrderAck | OrderRefused
        if unknown:
            reason = f"unknown products {unknown}; known: {sorted(self.routes)}"
        elif count > self.max_jobs_per_order:
            reason = f"{count} units is more than the limit of {self.max_jobs_per_order}"
        else:
            reason = ""
        if reason:
            answer = OrderRefused(client_order_id=msg.client_order_id, reason=reason)
            self.orders[msg.client_order_id] = _Order(msg.client_order_id, _text(answer))
            return [Outgoing(to, answer)]
        self._order_seq += 1
        order = f"o{self._order_seq}"
        jobs: list[_Job] = []
        for item in msg.items:
            for _ in range(item.quantity):
                job = _Job(f"{order}-{len(jobs) + 1}", order, item.product, msg.due_at)
                job.ready_at = now.plant
                job.plant_job = msg.plant_job
                jobs.append(job)
        answer = OrderAck(
            client_order_id=msg.client_order_id, order=order, jobs=[j.job for j in jobs]
        )
        self.orders[msg.client_order_id] = _Order(
            msg.client_order_id, _text(answer), order, [j.job for j in jobs]
        )
        out = [Outgoing(to, answer)]
        for job in jobs:
            self.jobs[job.job] = job
            out += self._announce(job, now)
        return out

    # --- Rounds --------------------------------------------------------------------------

    def _count(self, reason: str, table: dict[str, int] | None = None) -> None:
        table = self.ignored if table is None else table
        table[reason] = table.get(reason, 0) + 1

    def _announce(self, job: _Job, now: Now) -> list[Outgoing]:
        """Open a new round for the job's next operation."""
        job.retry_wall = None
        step = self.routes[job.product][job.next_op]
        self._round_seq += 1
        round_id = f"{job.job}-{job.next_op}-r{self._round_seq}"
        ready = max(now.plant, job.ready_at)
        rnd = _Round(round_id, job.job, job.next_op, ready, now.wall + self.bid_window_seconds)
        self.rounds[round_id] = rnd
        self.counts["rounds"] += 1
        self._arm(rnd.deadline, _DEADLINE, round_id)
        job.round_id = round_id
        cfp = CallForProposals(
            round_id=round_id,
            job=job.job,
            op=job.next_op,
            capability=step.capability,
            ready_at=ready,
            due_at=job.due_at,
            processing_seconds=step.processing_seconds,
            load=step.load,
            material=step.material,
            quantity=step.quantity,
            deadline=rnd.deadline,
            plant_job=job.plant_job,
        )
        return [Outgoing(self.subjects.cfp(step.capability), cfp)]

    def _bids(self, round_id: str, responder: str, bids: Sequence[Bid], now: Now) -> list[Outgoing]:
        rnd = self.rounds.get(round_id)
        if rnd is None:
            self._count("late_bid" if round_id in self.closed else "unknown_round")
            return []
        if rnd.state != "open" or now.wall > rnd.deadline:
            self._count("late_bid")
            return []
        if responder in rnd.responders:
            self._count("duplicate_bid")
            return []
        rnd.responders.append(responder)
        held = rnd.bids
        for bid in bids:
            if bid.machine in held:
                self._count("duplicate_bid")
                continue
            held[bid.machine] = bid
            self.counts["bids"] += 1
        step = self.routes[self.jobs[rnd.job].product][rnd.op]
        expected = self.expected_responders.get(step.capability)
        if expected is not None and len(rnd.responders) >= expected:
            return self._close(rnd, now)
        return []

    def _close(self, rnd: _Round, now: Now) -> list[Outgoing]:
        """End the bidding of ``rnd``: award the best bid, or try again later."""
        job = self.jobs[rnd.job]
        if not rnd.bids:
            self._end(rnd, "no_bids")
            job.retry_wall = now.wall + self.retry_seconds
            self._arm(job.retry_wall, _RETRY, job.job)
            return []
        step = self.routes[job.product][rnd.op]
        backlog = self._backlog_end
        processing = step.processing_seconds
        score_of = self.weights.score_of
        ready = rnd.ready_at
        best: tuple[float, str] | None = None
        best_finish = 0.0
        for machine, bid in rnd.bids.items():
            finish = bid.finish_at
            promised = backlog.get(machine)
            if promised is not None:
                finish = max(finish, promised + processing)
            key = (score_of(finish, bid.energy_cost, bid.health_risk, ready), machine)
            if best is None or key < best:
                best, best_finish = key, finish
        assert best is not None
        winner = best[1]
        rnd.state, rnd.winner = "awarded", winner
        self.counts["awards"] += 1
        self.round_seconds.append(max(now.wall - (rnd.deadline - self.bid_window_seconds), 0.0))
        rnd.expected_finish = best_finish
        self._promise(winner, rnd.round_id, best_finish)
        rnd.result_due = rnd.expected_finish + max(
            self.grace_seconds, self.grace_factor * step.processing_seconds
        )
        rnd.result_wall = plant_to_wall(rnd.result_due, now, self.speedup)
        self._arm(rnd.result_wall, _RESULT, rnd.round_id)
        accept = Accept(
            round_id=rnd.round_id,
            machine=winner,
            job=rnd.job,
            op=rnd.op,
            plant_job=job.plant_job,
        )
        out = [Outgoing(self.subjects.award(rnd.round_id), accept)]
        losers = sorted(m for m in rnd.bids if m != winner)
        if losers:
            reject = Reject(round_id=rnd.round_id, machines=losers, reason="another bid won")
            out.append(Outgoing(self.subjects.award(rnd.round_id), reject))
        return out

    def _backlog(self) -> dict[str, float]:
        """When each machine should be through the work awarded to it and not yet done.

        Machines bid on concurrent rounds from the same queue, so one machine can win
        several rounds on one promise; the scheduler, which knows its own awards, pushes
        such a bid's finish behind them, both to score it and to time it out. Kept up to
        date by :meth:`_promise` and :meth:`_end` rather than computed from every round.
        """
        return dict(self._backlog_end)

    def _promise(self, machine: str, round_id: str, finish: float) -> None:
        """Record that ``machine`` won ``round_id`` and should be done by ``finish``."""
        self._awards.setdefault(machine, {})[round_id] = finish
        end = self._backlog_end.get(machine)
        self._backlog_end[machine] = finish if end is None else max(end, finish)

    def _unpromise(self, rnd: _Round) -> None:
        """Forget the award of a round that ended (done, failed or withdrawn)."""
        if rnd.winner is None or rnd.expected_finish is None:
            return
        awards = self._awards.get(rnd.winner)
        if awards is None or awards.pop(rnd.round_id, None) is None:
            return
        if not awards:
            del self._awards[rnd.winner]
            del self._backlog_end[rnd.winner]
        elif rnd.expected_finish >= self._backlog_end[rnd.winner]:
            self._backlog_end[rnd.winner] = max(awards.values())

    def _rebuild_backlog(self) -> None:
        self._awards, self._backlog_end = {}, {}
        for rnd in self.rounds.values():
            if rnd.winner is not None and rnd.expected_finish is not None:
                self._promise(rnd.winner, rnd.round_id, rnd.expected_finish)

    def _withdraw(self, rnd: _Round, now: Now) -> list[Outgoing]:
        """The winner sent no result in time: take the award back and announce again."""
        assert rnd.winner is not None
        self._end(rnd, "timeout")
        bounded_add(self.withdrawn, rnd.round_id, self.memory, rnd.winner)
        reject = Reject(
            round_id=rnd.round_id, machines=[rnd.winner], reason="award withdrawn: no result"
        )
        out = [Outgoing(self.subjects.award(rnd.round_id), reject)]
        return out + self._announce(self.jobs[rnd.job], now)

    def _end(self, rnd: _Round, outcome: str) -> None:
        del self.rounds[rnd.round_id]
        self._unpromise(rnd)
        bounded_add(self.closed, rnd.round_id, self.memory, outcome)
        job = self.jobs[rnd.job]
        if job.round_id == rnd.round_id:
            job.round_id = None
        if outcome != "done":
            self._count(outcome, self.reannounced)

    def _result_round(self, msg: InformDone | Failure) -> _Round | None:
        """The awarded round ``msg`` reports on, or None (counted) if it does not fit."""
        rnd = self.rounds.get(msg.round_id)
        if rnd is None:
            outcome = self.closed.get(msg.round_id)
            done = isinstance(msg, InformDone) and outcome == "done"
            self._count(
                "unknown_round" if outcome is None else "duplicate_done" if done else "stale_result"
            )
            return None
        if rnd.state != "awarded" or rnd.winner != msg.machine:
            self._count("not_awarded")
            return None
        if (rnd.job, rnd.op) != (msg.job, msg.op):
            self._count("wrong_operation")
            return None
        return rnd

    def _done(self, msg: InformDone, now: Now) -> list[Outgoing]:
        if msg.round_id not in self.rounds and msg.round_id in self.withdrawn:
            late = self._late_done(msg, now)
            if late is not None:
                return late
        rnd = self._result_round(msg)
        if rnd is None:
            return []
        self._end(rnd, "done")
        return self._completed(self.jobs[rnd.job], msg, now)

    def _late_done(self, msg: InformDone, now: Now) -> list[Outgoing] | None:
        """A result for a round withdrawn for want of one: the old winner did the work after
        all (its result was delayed, not lost). Take it while the job still waits for that
        operation, and call off the round announced in its place, so the operation is not
        done twice. ``None`` when it does not fit (counted as any stale result)."""
        job = self.jobs.get(msg.job)
        if (
            self.withdrawn.get(msg.round_id) != msg.machine
            or job is None
            or job.finished_at is not None
            or job.next_op != msg.op
        ):
            return None
        del self.withdrawn[msg.round_id]
        self._count("late_result_taken")
        out: list[Outgoing] = []
        current = self.rounds.get(job.round_id) if job.round_id is not None else None
        if current is not None and (current.job, current.op) == (msg.job, msg.op):
            called_off = sorted({*current.bids, *([current.winner] if current.winner else [])})
            if called_off:
                reject = Reject(
                    round_id=current.round_id,
                    machines=called_off,
                    reason="the operation was done in an earlier round",
                )
                out.append(Outgoing(self.subjects.award(current.round_id), reject))
            self._end(current, "superseded")
        return out + self._completed(job, msg, now)

    def _completed(self, job: _Job, msg: InformDone, now: Now) -> list[Outgoing]:
        """Record ``msg``'s operation as done on ``job`` and move the job on."""
        if msg.defect:
            # The part is bad: do the operation again (rework) or the route again with a
            # fresh part (scrap), as the plant does (``on_defect``).
            job.defects += 1
            self._count("defect", self.reannounced)
            if self.on_defect == "scrap":
                # The finished operations of the scrapped part are undone with it.
                job.next_op = 0
                self.completions = [c for c in self.completions if c.job != job.job]
            job.ready_at = msg.finished_at
            return self._announce(job, now)
        self.completions.append(
            Completion(msg.job, msg.op, msg.round_id, msg.machine, msg.started_at, msg.finished_at)
        )
        job.next_op += 1
        job.ready_at = msg.finished_at
        if job.next_op >= len(self.routes[job.product]):
            job.finished_at = msg.finished_at
            return []
        return self._announce(job, now)

    def _failure(self, msg: Failure, now: Now) -> list[Outgoing]:
        rnd = self._result_round(msg)
        if rnd is None:
            return []
        self._end(rnd, "failed")
        return self._announce(self.jobs[rnd.job], now)

    def _awarded(self, job: _Job) -> _Round | None:
        rnd = self.rounds.get(job.round_id) if job.round_id is not None else None
        return rnd if rnd is not None and rnd.state == "awarded" else None

    def _finish_estimate(self, job: _Job, now: Now) -> float:
        if job.finished_at is not None:
            return job.finished_at
        route = self.routes[job.product]
        rnd = self._awarded(job)
        if rnd is not None and rnd.winner is not None:
            at = rnd.expected_finish or rnd.bids[rnd.winner].finish_at
            rest = route[job.next_op + 1 :]
        else:
            at = max(now.plant, job.ready_at)
            rest = route[job.next_op :]
        return at + sum(s.processing_seconds for s in rest)

    # --- State ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "orders": {c: asdict(o) for c, o in self.orders.items()},
            "jobs": {j: asdict(s) for j, s in self.jobs.items()},
            "rounds": {r: _round_state(s) for r, s in self.rounds.items()},
            "closed": dict(self.closed),
            "withdrawn": dict(self.withdrawn),
            "completions": [asdict(c) for c in self.completions],
            "ignored": dict(self.ignored),
            "reannounced": dict(self.reannounced),
            "order_seq": self._order_seq,
            "round_seq": self._round_seq,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.orders = {c: _Order(**o) for c, o in state["orders"].items()}
        self.jobs = {j: _Job(**s) for j, s in state["jobs"].items()}
        self.rounds = {
            r: _Round(**{**s, "bids": {m: Bid.model_validate(b) for m, b in s["bids"].items()}})
            for r, s in state["rounds"].items()
        }
        self.closed = OrderedDict(state["closed"])
        self.withdrawn = OrderedDict(state.get("withdrawn", {}))
        self.completions = [Completion(**c) for c in state["completions"]]
        self.ignored = dict(state["ignored"])
        self.reannounced = dict(state["reannounced"])
        self._order_seq = int(state["order_seq"])
        self._round_seq = int(state["round_seq"]) + _RESTORE_GAP
        self._rebuild_timers()
        self._rebuild_backlog()


def _round_state(rnd: _Round) -> dict[str, Any]:
    """A round as JSON-able data: its bids as plain dicts."""
    state = asdict(replace(rnd, bids={}))
    state["bids"] = {m: b.model_dump() for m, b in rnd.bids.items()}
    return state


def _text(message: MessageBase) -> str:
    """A message as stored text (its wire form), to answer a repeat exactly as before."""
    return encode(message).decode()
