"""Whole negotiations in the in-memory scenario, with faults: nothing lost, nothing twice.

Hypothesis draws small order sets and fault rates; each run injects machines breaking
down mid-operation, calls and bids dropped, bids arriving after the deadline, and any
message (but a setpoint) delivered twice, and may restart an agent from its snapshot in
the middle. Whatever happens, every operation of every accepted job must be completed by
the plant exactly once, recorded by the scheduler exactly once, and in route order.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.machine import Task
from autofab.agents.protocol import (
    MessageBase,
    OrderAck,
    OrderItem,
    OrderStatus,
    OrderStatusQuery,
    OrderSubmit,
    Subjects,
)
from autofab.agents.scenario import RandomFaults, Scenario, subject_matches
from autofab.agents.scheduler import SchedulerAgent
from autofab.envs.plant import load_plant

CONFIG = load_plant("demo")
S = Subjects("demo")
PRODUCTS = [p.name for p in CONFIG.products]
ROUTE_LENGTH = {p.name: len(p.route) for p in CONFIG.products}


def test_subject_matching_follows_nats():
    assert subject_matches("a.*.c", "a.b.c")
    assert not subject_matches("a.*", "a.b.c")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert subject_matches("a.b", "a.b")
    assert not subject_matches("a.b.c", "a.b")


class Echo(Agent):
    """Records what it gets."""

    def __init__(self, name: str, *subscriptions: Subscription) -> None:
        super().__init__(name)
        self.subs, self.got = list(subscriptions), []

    def subscriptions(self) -> list[Subscription]:
        return self.subs

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        self.got.append(message)
        return []


def test_queue_groups_share_and_plain_subscribers_get_everything_once():
    scenario = Scenario()
    a = scenario.add(Echo("a", Subscription(S.orders_query, "q")))
    b = scenario.add(Echo("b", Subscription(S.orders_query, "q")))
    plain = scenario.add(Echo("c", Subscription(S.orders_query), Subscription(S.all)))
    for i in range(4):
        scenario.publish(S.orders_query, OrderStatusQuery(client_order_id=f"c{i}"))
    scenario.run()
    assert isinstance(a, Echo)
    assert isinstance(b, Echo)
    assert isinstance(plain, Echo)
    assert (len(a.got), len(b.got), len(plain.got)) == (2, 2, 4)


def test_commands_older_than_their_ttl_are_dropped():
    scenario = Scenario(latency=2.0)
    scenario.add(Echo("a", Subscription(S.orders_query)))
    scenario._send([Outgoing(S.orders_query, OrderStatusQuery(client_order_id="x"), 1.0)])
    scenario.run()
    assert scenario.dropped == {"ttl": 1}


def submit_orders(scenario: Scenario, orders: list[list[tuple[str, int]]]) -> list:
    acks = scenario.watch("_INBOX.>")
    for i, items in enumerate(orders):
        msg = OrderSubmit(
            client_order_id=f"mes-{i}",
            items=[OrderItem(product=p, quantity=q) for p, q in items],
            due_at=30_000.0,
        )
        scenario.publish(S.orders_submit, msg, reply_to=f"_INBOX.{i}")
        # The MES resends every order once: it must not be made twice.
        scenario.publish(S.orders_submit, msg, reply_to=f"_INBOX.{i}", delay=0.5)
    return acks


def check_exactly_once(scenario: Scenario, acks: list) -> None:
    scheduler = scenario.agents["scheduler"]
    assert isinstance(scheduler, SchedulerAgent)
    jobs = {}
    for _, ack in acks:
        assert isinstance(ack, OrderAck)
        for job in ack.jobs:
            jobs[job] = scheduler.jobs[job].product
    expected = {(j, op) for j, p in jobs.items() for op in range(ROUTE_LENGTH[p])}
    world = scenario.agents["plant"]
    plant_done = Counter((job, op) for job, op, *_ in world.finished)
    assert set(plant_done) == expected
    assert all(n == 1 for n in plant_done.values()), plant_done.most_common(3)
    recorded = Counter((c.job, c.op) for c in scheduler.completions)
    assert recorded == plant_done
    by_job: dict[str, list] = {}
    for c in scheduler.completions:
        by_job.setdefault(c.job, []).append(c)
    for job, done in by_job.items():
        assert [c.op for c in done] == list(range(ROUTE_LENGTH[jobs[job]]))
        for before, after in itertools.pairwise(done):
            assert after.started_at >= before.finished_at
    finished = {(job, op): machine for job, op, machine, *_ in world.finished}
    assert {(c.job, c.op): c.machine for c in scheduler.completions} == finished


def run_to_completion(scenario: Scenario, acks: list, n_orders: int) -> None:
    def done() -> bool:
        scheduler = scenario.agents["scheduler"]
        return len({s for s, _ in acks}) == n_orders and scheduler.all_done()

    assert scenario.run(done, for_seconds=50_000.0, max_steps=400_000)
    scenario.run(for_seconds=5.0)


orders_strategy = st.lists(
    st.lists(st.tuples(st.sampled_from(PRODUCTS), st.integers(1, 2)), min_size=1, max_size=2),
    min_size=1,
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    orders=orders_strategy,
    hosts=st.sampled_from([1, 3, 8]),
    drop=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.3),
    late=st.floats(0.0, 0.3),
    fail=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_operation_is_done_exactly_once_in_route_order(
    orders, hosts, drop, duplicate, late, fail, seed
):
    rng = random.Random(seed)
    faults = RandomFaults(
        rng,
        drop=drop,
        duplicate=duplicate,
        late=late,
        late_seconds=0.5,
        # A lost award is a winner that never confirms: the round times out.
        drop_types=frozenset({"cfp", "proposal", "proposal_batch", "accept"}),
    )

    def failures(machine: str, task: Task) -> float | None:
        return rng.uniform(0.05, 0.95) if rng.random() < fail else None

    scenario = Scenario.from_plant(
        CONFIG,
        hosts=hosts,
        speedup=600.0,
        faults=faults,
        failures=failures,
        scheduler={"bid_window_seconds": 0.05, "retry_seconds": 0.5},
    )
    acks = submit_orders(scenario, orders)
    run_to_completion(scenario, acks, len(orders))
    check_exactly_once(scenario, acks)
    assert scenario.agents["energy"].granted_w == pytest.approx(0.0)
    assert all(q >= 0 for q in scenario.agents["supply"].stock.values())


@settings(max_examples=60, deadline=None)
@given(
    orders=orders_strategy,
    who=st.sampled_from(["scheduler", "energy", "supply", "host-1", "host-2"]),
    at=st.floats(0.01, 6.0),
    duplicate=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**32 - 1),
)
def test_an_agent_restarted_from_its_snapshot_finishes_the_run(orders, who, at, duplicate, seed):
    faults = RandomFaults(random.Random(seed), duplicate=duplicate, late_seconds=0.5)
    scenario = Scenario.from_plant(
        CONFIG, hosts=2, speedup=600.0, faults=faults, scheduler={"bid_window_seconds": 0.05}
    )
    acks = submit_orders(scenario, orders)
    scenario.run(for_seconds=at)
    old = scenario.agents[who]
    fresh = scenario.restart(who)
    assert fresh is not old
    run_to_completion(scenario, acks, len(orders))
    check_exactly_once(scenario, acks)


def test_order_status_over_a_run():
    scenario = Scenario.from_plant(CONFIG, hosts=2, speedup=600.0)
    acks = submit_orders(scenario, [[("shaft", 2)]])
    replies = scenario.watch("_STATUS.1")

    def ask() -> OrderStatus:
        scenario.publish(
            S.orders_query, OrderStatusQuery(client_order_id="mes-0"), reply_to="_STATUS.1"
        )
        scenario.run(lambda: len(replies) > asked, for_seconds=1.0)
        status = replies[-1][1]
        assert isinstance(status, OrderStatus)
        return status

    asked = 0
    scenario.run(lambda: bool(acks), for_seconds=1.0)
    first = ask()
    asked += 1
    assert first.status in ("queued", "in_progress")
    assert first.jobs_total == 2
    assert first.finish_at is not None
    run_to_completion(scenario, acks, 1)
    last = ask()
    assert (last.status, last.jobs_done) == ("done", 2)
    assert [ack.jobs for _, ack in acks] == [["o1-1", "o1-2"]] * 2  # the resend: same answer
