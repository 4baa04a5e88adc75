"""A learned bidding policy for machine agents: features, the network, its file, training.

Deployment
----------
:class:`LearnedBidding` implements :class:`~autofab.agents.bidding.SpeedBiddingPolicy`.
It prices every bid with :func:`~autofab.agents.bidding.honest_bid`, the same estimate as
the rule, so every field of a bid it sends is one the machine can keep. It comes in two
forms, told apart by :attr:`LearnedBidding.speeds`:

* a **speed chooser** (``speeds`` > 0, format version 2): for each candidate speed (the
  machine's own speed and ``speeds`` speeds evenly spaced in its ``[speed_min,
  speed_max]``) it prices the honest bid at that speed and reads :data:`SPEED_FEATURES`
  (slack to the due date, lateness, energy cost and its saving, breakdown risk, tariff,
  each at that speed...). The network gives each candidate a score and a pass logit; the
  machine bids the best-scoring speed, or passes when that candidate's pass logit is
  positive. The machine then runs the operation at the speed it bid
  (``MachineAgent``, ``Task.speed``).
* a **gate** (``speeds`` = 0, format version 1, ``pretrained/bidding_gate.npz``): it bids
  at the machine's own speed and only learns whether to pass, from :data:`FEATURES`.

So that no operation is starved, a machine passes the same operation at most
``max_passes`` times and then bids, whatever the network says. ``bid`` (without speed)
always prices the machine's own speed, for callers that cannot run another.

The shipped default (:data:`DEFAULT_BIDDING`) is a speed chooser; how it and the gate
compare with the rule is in ``pretrained/README.md`` (``benchmarks/bidding_quality.py``).

Deployment needs only numpy: agents that do not run a learned policy never import this
module, and nothing here imports torch (training imports the in-memory scenario lazily).

The file
--------
A plain ``.npz`` (no pickle), in the dispatcher's house style
(:func:`autofab.agents.policies.dispatcher.save_dispatcher`): ``kind`` = ``"bidding"``,
``format_version``, ``layout`` (the feature names, in order; a file made for another
layout is refused), ``max_passes``, ``meta`` (JSON provenance) and the layers ``w0, b0,
w1, b1...`` (tanh between layers). Version 1 (a gate): :data:`FEATURES`, one output, the
pass logit. Version 2 (a speed chooser) adds ``speeds``: :data:`SPEED_FEATURES`, two
outputs, the candidate's score and its pass logit. Both versions are read, by
:func:`load_bidding_policy` and by :func:`autofab.agents.policies.artifacts.load_policy`.

>>> agent = MachineAgent(name, subjects, spec, tariff, policy=load_bidding_policy("default"))

Training
--------
:func:`train_bidding` searches the weights (of a gate, or with ``speeds`` of a speed
chooser) with the cross-entropy method on whole in-memory negotiations
(:class:`~autofab.agents.scenario.Scenario` of the demo plant, :func:`run_episode`):
orders with due dates, machines of random health that break down by the plant's hazard
law. The objective is :attr:`BiddingKpis.cost`, total tardiness
plus energy cost in the scheduler's exchange rate (``ScoreWeights``), as a paired
difference to :class:`~autofab.agents.bidding.RuleBasedBidding` on the same seeds (the
same seed draws the same orders and the same breakdown chances for both). The search
starts from the network that does what the rule does (bid everything at the machine's own
speed), which is always a candidate. :func:`evaluate_bidding` measures a policy on other
seeds.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from autofab.agents.bidding import BidContext, BiddingPolicy, RuleBasedBidding, honest_bid
from autofab.agents.policies.dispatcher import (
    layer_arrays,
    layers_finite,
    mlp_forward,
    read_layers,
)
from autofab.agents.protocol import Bid, CallForProposals

if TYPE_CHECKING:
    from autofab.agents.machine import Task
    from autofab.envs.plant import PlantConfig

__all__ = [
    "DEFAULT_BIDDING",
    "DEFAULT_NAME",
    "FEATURES",
    "FORMAT_VERSION",
    "KIND",
    "RULES_NAME",
    "SPEED_FEATURES",
    "BiddingKpis",
    "BiddingLoadError",
    "BiddingTraining",
    "LearnedBidding",
    "bid_features",
    "candidate_speeds",
    "evaluate_bidding",
    "is_bidding_file",
    "load_bidding_policy",
    "read_bidding_file",
    "run_episode",
    "save_bidding_policy",
    "speed_features",
    "train_bidding",
]

#: The network's inputs, in order (the ``layout`` stored in the file).
FEATURES: tuple[str, ...] = (
    "queue_wait",  # log1p((start - max(now, ready)) / duration): work ahead in the queue
    "waiting",  # log1p((now - ready) / duration): how long the operation has waited
    "slack_hours",  # (due - finish) / 3600, clipped to [-8, 8]
    "health",  # the machine's health estimate, 0..1
    "risk",  # the bid's breakdown probability
    "price_ratio",  # tariff at the start / the day's mean tariff
    "energy_cost",  # the bid's energy cost (currency), clipped to [0, 10]
    "duration_hours",  # processing / speed / 3600
    "load",  # the operation's relative load
    "speed_ratio",  # speed / nominal speed
)
#: A speed chooser's inputs for one candidate speed ``s``, in order: :data:`FEATURES` of
#: the honest bid at ``s`` (so ``slack_hours``, ``risk``, ``energy_cost``,
#: ``duration_hours`` and ``speed_ratio`` are those of ``s``), then:
#: With ``d`` = s / own speed - 1, a score ``-a d^2 + d (w . x)`` peaks at
#: ``d = (w . x) / 2a``: the ``change_*`` terms let a linear network set the speed as a
#: function of the situation (price, slack, queue...), and the start of the training
#: search (only ``-a d^2``) keeps the machine's own speed, as the rule does.
SPEED_FEATURES: tuple[str, ...] = (
    *FEATURES,
    "late_hours",  # max(finish - due, 0) / 3600 at s, clipped to [0, 8]
    "energy_saving",  # energy cost at the machine's own speed - at s, clipped to [-10, 10]
    "time_saving_hours",  # finish at the machine's own speed - at s, in hours
    "change_sq",  # d^2
    "change",  # d
    "change_x_price",  # d x price_ratio
    "change_x_slack",  # d x slack_hours at the machine's own speed
    "change_x_queue",  # d x queue_wait
    "change_x_health",  # d x health
    "change_x_load",  # d x load
)
#: The newest ``.npz`` layout written by :func:`save_bidding_policy` (a speed chooser;
#: a gate is still written as version 1). :func:`read_bidding_file` reads 1 and 2.
FORMAT_VERSION = 2
#: The layout of each version: its features and its outputs.
_LAYOUTS: dict[int, tuple[tuple[str, ...], int]] = {1: (FEATURES, 1), 2: (SPEED_FEATURES, 2)}
#: The ``kind`` entry that tells a bidding file from a dispatcher file.
KIND = "bidding"
#: The bidding policy shipped with autofab (``pretrained/README.md`` says how it was made).
DEFAULT_BIDDING = Path(__file__).resolve().parent / "pretrained" / "bidding_speed.npz"
#: :func:`load_bidding_policy` names: the shipped file, and the rule.
DEFAULT_NAME = "default"
RULES_NAME = "rules"


class BiddingLoadError(ValueError):
    """A bidding policy file cannot be used; the message names the file and why."""


def bid_features(
    cfp: CallForProposals, context: BidContext, bid: Bid, speed: float | None = None
) -> NDArray[np.float64]:
    """:data:`FEATURES` of the honest ``bid`` for ``cfp`` at ``speed`` (default: the
    machine's own), shape ``(len(FEATURES),)``."""
    spec, tariff = context.spec, context.tariff
    speed = context.speed if speed is None else speed
    duration = cfp.processing_seconds / speed
    start = bid.finish_at - duration
    earliest = max(context.now, cfp.ready_at)
    mean_price = sum(tariff.per_kwh) / len(tariff.per_kwh)
    return np.array(
        [
            math.log1p(min(max(start - earliest, 0.0) / duration, 1e3)),
            math.log1p(min(max(context.now - cfp.ready_at, 0.0) / duration, 1e3)),
            min(max((cfp.due_at - bid.finish_at) / 3600.0, -8.0), 8.0),
            context.health,
            bid.health_risk,
            tariff.per_kwh_at(start) / mean_price if mean_price > 0 else 1.0,
            min(bid.energy_cost, 10.0),
            duration / 3600.0,
            cfp.load,
            speed / spec.speed_nominal,
        ]
    )


def candidate_speeds(context: BidContext, n: int) -> list[float]:
    """The speeds a speed chooser weighs: the machine's own first (it wins ties), then
    ``n`` evenly spaced in ``[speed_min, speed_max]`` (those equal to it left out)."""
    spec = context.spec
    own = context.speed
    if n <= 0:
        return [own]
    grid = [float(v) for v in np.linspace(spec.speed_min, spec.speed_max, n)]
    return [own, *(v for v in grid if abs(v - own) > 1e-9)]


def speed_features(
    cfp: CallForProposals, context: BidContext, speeds: Sequence[float]
) -> tuple[list[Bid], NDArray[np.float64]]:
    """The honest bid at each of ``speeds`` (the first must be the machine's own) and
    their :data:`SPEED_FEATURES`, shape ``(len(speeds), len(SPEED_FEATURES))``."""
    bids = [honest_bid(cfp, context, s) for s in speeds]
    own = bids[0]
    rows = np.empty((len(speeds), len(SPEED_FEATURES)))
    own_features = bid_features(cfp, context, own, speeds[0])
    queue_wait, own_slack, price = (float(own_features[i]) for i in (0, 2, 5))
    for i, (speed, bid) in enumerate(zip(speeds, bids, strict=True)):
        base = own_features if i == 0 else bid_features(cfp, context, bid, speed)
        d = speed / speeds[0] - 1.0
        rows[i, : len(FEATURES)] = base
        rows[i, len(FEATURES) :] = (
            min(max((bid.finish_at - cfp.due_at) / 3600.0, 0.0), 8.0),
            min(max(own.energy_cost - bid.energy_cost, -10.0), 10.0),
            (own.finish_at - bid.finish_at) / 3600.0,
            d * d,
            d,
            d * price,
            d * own_slack,
            d * queue_wait,
            d * context.health,
            d * cfp.load,
        )
    return bids, rows


Layers = list[tuple[NDArray[np.float64], NDArray[np.float64]]]


class LearnedBidding:
    """The learned policy as a :class:`~autofab.agents.bidding.SpeedBiddingPolicy`, in numpy.

    ``speeds`` = 0: a gate over :data:`FEATURES` (one output, the pass logit) that bids
    at the machine's own speed. ``speeds`` > 0: a speed chooser over
    :data:`SPEED_FEATURES` (two outputs per candidate speed: score, pass logit) that bids
    the best-scoring of :func:`candidate_speeds`. Either passes one operation (``job``,
    ``op``) at most ``max_passes`` times, so a round that nobody bids on is announced
    again and then bid on. ``meta`` is the provenance stored with the weights. One
    instance may serve many machines (a host's): passes are kept per machine, for the
    ``memory`` most recent operations.
    """

    def __init__(
        self,
        layers: Sequence[tuple[NDArray[Any], NDArray[Any]]],
        meta: Mapping[str, Any] | None = None,
        *,
        max_passes: int = 2,
        memory: int = 10_000,
        speeds: int = 0,
    ) -> None:
        """``layers``: ``(weight (in, out), bias (out,))`` per layer, tanh between them."""
        if not layers:
            raise ValueError("a bidding policy needs at least one layer")
        if speeds < 0:
            raise ValueError(f"speeds must be >= 0, got {speeds}")
        self.layers: Layers = [
            (np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)) for w, b in layers
        ]
        features, outputs = self.layout_of(speeds)
        first, last = self.layers[0][0], self.layers[-1][0]
        n_in, n_out = first.shape[0], last.shape[-1]
        if first.ndim != 2 or n_in != len(features) or n_out != outputs:
            what = "speed chooser" if speeds else "gate"
            raise ValueError(
                f"a bidding {what} maps {len(features)} features to {outputs} outputs; these "
                f"layers map {n_in} to {n_out}"
            )
        for i, (w, b) in enumerate(self.layers):
            nxt = self.layers[i + 1][0] if i + 1 < len(self.layers) else None
            if (
                w.ndim != 2
                or b.shape != (w.shape[1],)
                or (nxt is not None and nxt.shape[0] != w.shape[1])
            ):
                raise ValueError(f"layer shapes do not chain: {w.shape}, {b.shape}")
        if max_passes < 0:
            raise ValueError(f"max_passes must be >= 0, got {max_passes}")
        self.meta: dict[str, Any] = dict(meta or {})
        self.max_passes = max_passes
        self.memory = memory
        #: Evenly spaced candidate speeds besides the machine's own (0: a gate).
        self.speeds = speeds
        self._passes: OrderedDict[tuple[str, str, int], int] = OrderedDict()
        #: Calls passed so far (all machines this instance serves).
        self.passed = 0

    @staticmethod
    def layout_of(speeds: int) -> tuple[tuple[str, ...], int]:
        """The feature names and the number of outputs of a policy with ``speeds``."""
        return _LAYOUTS[2 if speeds else 1]

    @classmethod
    def always_bid(cls, meta: Mapping[str, Any] | None = None) -> LearnedBidding:
        """A linear gate that never passes: it bids exactly as the rule does."""
        w = np.zeros((len(FEATURES), 1))
        return cls([(w, np.array([-1.0]))], meta)

    def outputs(self, features: NDArray[np.float64]) -> NDArray[np.float64]:
        """The network's outputs for feature rows ``(k, n)`` (or one row): ``(k, out)``."""
        return mlp_forward(self.layers, np.atleast_2d(features))

    def pass_logit(self, features: NDArray[np.float64]) -> float:
        """The pass logit for one feature vector (of the layout): pass when > 0."""
        return float(self.outputs(features)[0, -1])

    def bid(self, cfp: CallForProposals, context: BidContext) -> Bid | None:
        """Bid or pass at the machine's own speed (what a caller that cannot run another
        speed gets)."""
        chosen = self._decide(cfp, context, [context.speed])
        return None if chosen is None else chosen[0]

    def bid_with_speed(
        self, cfp: CallForProposals, context: BidContext
    ) -> tuple[Bid, float] | None:
        """The bid at the chosen speed and that speed, or ``None`` to pass."""
        return self._decide(cfp, context, candidate_speeds(context, self.speeds))

    def _decide(
        self, cfp: CallForProposals, context: BidContext, speeds: Sequence[float]
    ) -> tuple[Bid, float] | None:
        if cfp.capability not in context.spec.capabilities:
            return None
        if self.speeds:
            bids, rows = speed_features(cfp, context, speeds)
            out = self.outputs(rows)
            best = int(np.argmax(out[:, 0]))  # the first (own speed) wins a tie
            bid, speed, logit = bids[best], speeds[best], float(out[best, 1])
        else:
            bid, speed = honest_bid(cfp, context), context.speed
            logit = self.pass_logit(bid_features(cfp, context, bid)) if self.max_passes else 0.0
        if self.max_passes == 0 or logit <= 0.0:
            return bid, speed
        key = (context.machine, cfp.job, cfp.op)
        passed = self._passes.pop(key, 0)
        if passed >= self.max_passes:
            self._passes[key] = passed
            return bid, speed
        self._passes[key] = passed + 1
        self.passed += 1
        while len(self._passes) > self.memory:
            self._passes.popitem(last=False)
        return None

    def fresh(self) -> LearnedBidding:
        """The same weights with an empty pass memory (one per episode or plant)."""
        return self.with_flat(self.flat())

    def flat(self) -> NDArray[np.float64]:
        """All weights as one vector (what the search moves), layer by layer."""
        return np.concatenate([np.concatenate([w.ravel(), b]) for w, b in self.layers])

    def with_flat(self, theta: NDArray[np.float64]) -> LearnedBidding:
        """A copy with the weights ``theta`` (same shapes as :meth:`flat`), no pass memory."""
        layers: Layers = []
        i = 0
        for w, b in self.layers:
            nw = w.size
            layers.append((theta[i : i + nw].reshape(w.shape), theta[i + nw : i + nw + b.size]))
            i += nw + b.size
        if i != theta.size:
            raise ValueError(f"expected {i} weights, got {theta.size}")
        return LearnedBidding(
            layers, self.meta, max_passes=self.max_passes, memory=self.memory, speeds=self.speeds
        )


# --------------------------------------------------------------------------- the file


def save_bidding_policy(
    policy: LearnedBidding, path: str | Path, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the weights, the feature layout, ``max_passes``, ``speeds`` and ``meta``
    (JSON) to ``path``: format version 2 for a speed chooser, 1 for a gate (so a reader
    of version 1 still reads every gate)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    version = 2 if policy.speeds else 1
    arrays: dict[str, Any] = {
        "kind": np.asarray(KIND),
        "format_version": np.asarray(version),
        "layout": np.asarray(_LAYOUTS[version][0]),
        "max_passes": np.asarray(policy.max_passes),
        "meta": np.asarray(json.dumps({**policy.meta, **(meta or {})}, sort_keys=True)),
    }
    if policy.speeds:
        arrays["speeds"] = np.asarray(policy.speeds)
    arrays.update(layer_arrays(policy.layers))
    with out.open("wb") as fh:
        np.savez(fh, **arrays)
    return out


def is_bidding_file(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` that says it holds a bidding policy (never raises)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return "kind" in data.files and str(data["kind"]) == KIND
    except Exception:  # any unreadable file is simply not a bidding file
        return False


def read_bidding_file(path: str | Path) -> LearnedBidding:
    """Read a bidding policy written by :func:`save_bidding_policy` (format version 1, a
    gate, or 2, a speed chooser).

    Raises:
        BiddingLoadError: The file is missing, not an ``.npz``, not a bidding policy, of
            an unknown format version, with a bad ``speeds``, made for another feature
            layout, or holds bad weights. The message names the file and gives what was
            expected and found.
    """
    where = repr(str(path))
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            files = set(data.files)
            kind = str(data["kind"]) if "kind" in files else None
            if kind != KIND:
                raise BiddingLoadError(
                    f"{where} is not a bidding policy: expected kind {KIND!r}, found {kind!r}"
                )
            version = int(data["format_version"]) if "format_version" in files else None
            if version not in _LAYOUTS:
                raise BiddingLoadError(
                    f"{where} has an unknown bidding format: expected format_version "
                    f"{' or '.join(map(str, _LAYOUTS))}, found {version}"
                )
            layout = [str(name) for name in data["layout"]]
            meta = json.loads(str(data["meta"])) if "meta" in files else {}
            max_passes = int(data["max_passes"])
            speeds = int(data["speeds"]) if version >= 2 else 0
            layers = read_layers(data)
    except BiddingLoadError:
        raise
    except FileNotFoundError:
        raise BiddingLoadError(f"{where} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise BiddingLoadError(f"{where} is not a readable bidding policy file: {exc}") from None
    expected = list(_LAYOUTS[version][0])
    if layout != expected:
        raise BiddingLoadError(
            f"{where} was trained on another feature layout: expected {expected}, found {layout}"
        )
    if not layers_finite(layers):
        raise BiddingLoadError(f"{where} holds non-finite weights")
    try:
        return LearnedBidding(layers, meta, max_passes=max_passes, speeds=speeds)
    except ValueError as exc:
        raise BiddingLoadError(f"{where}: {exc}") from None


def load_bidding_policy(spec: str | Path = DEFAULT_NAME) -> BiddingPolicy:
    """The bidding policy a machine agent is built with, from a config value.

    ``"rules"`` is :class:`~autofab.agents.bidding.RuleBasedBidding`; ``"default"`` is the
    shipped :data:`DEFAULT_BIDDING` (unless a file of that name exists); anything else is
    the path of a file written by :func:`save_bidding_policy`.

    Raises:
        BiddingLoadError: as :func:`read_bidding_file`.
    """
    path = Path(spec)
    if str(spec) == RULES_NAME and not path.exists():
        return RuleBasedBidding()
    if str(spec) == DEFAULT_NAME and not path.exists():
        path = DEFAULT_BIDDING
    return read_bidding_file(path)


# --------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class BiddingKpis:
    """What one in-memory negotiation achieved (:func:`run_episode`)."""

    seed: int
    jobs: int
    completed: bool
    tardiness_hours: float
    energy_cost: float
    makespan_hours: float
    breakdowns: int
    #: Calls the policy passed on (0 for a policy that does not count them).
    passes: int = 0
    #: Hours of delay one unit of currency is worth (the scheduler's ``ScoreWeights``).
    energy_hours_per_currency: float = 1.0

    @property
    def cost(self) -> float:
        """Total tardiness (hours) + energy cost in hours: the objective, lower is better."""
        return self.tardiness_hours + self.energy_hours_per_currency * self.energy_cost


def run_episode(
    policy: BiddingPolicy,
    seed: int,
    *,
    config: PlantConfig | None = None,
    orders: tuple[int, int] = (6, 12),
    due_slack: tuple[float, float] = (1.5, 4.0),
    arrivals_hours: float = 2.0,
    machine: Mapping[str, Any] | None = None,
) -> BiddingKpis:
    """One shift of the demo plant (or ``config``) negotiated in memory with ``policy``.

    Seeded workload: ``orders`` (a range) orders of 1-3 units, the products by their
    ``mix``; half arrive at the start, the rest uniformly within ``arrivals_hours``; each
    is due at arrival + ``due_slack`` (a range) x its route time. Every machine starts at
    a health drawn from its type's initial range. When an operation starts, it breaks down
    with the plant's probability ``1 - exp(-hazard(health) x duration)``; the uniform draw
    for that is a function of (seed, job, op, attempt) only, so two policies on one seed
    meet the same luck. Runs until every job is done (or 50,000 wall seconds pass).
    ``machine`` holds other :class:`~autofab.agents.machine.MachineAgent` settings (such
    as ``speed``) for every machine.
    """
    from autofab.agents.protocol import InformDone, OrderItem, OrderSubmit, Subjects
    from autofab.agents.scenario import PlantWorld, Scenario
    from autofab.agents.scheduler import SchedulerAgent, ScoreWeights
    from autofab.envs.plant import compile_plant, load_plant

    config = config or load_plant("demo")
    plant = compile_plant(config)
    rng = random.Random(seed)
    speedup = 600.0
    attempts: dict[tuple[str, int], int] = {}
    holder: list[Scenario] = []

    def failures(name: str, task: Task) -> float | None:
        n = attempts.get((task.job, task.op), 0)
        attempts[(task.job, task.op)] = n + 1
        draw = random.Random(f"{seed}:{task.job}:{task.op}:{n}")
        agent = holder[0].machine(name)
        duration = task.duration(agent.speed)
        p = 1.0 - math.exp(-agent.spec.hazard(agent.health) * duration)
        u, fraction = draw.random(), draw.uniform(0.05, 0.95)
        return fraction if u < p else None

    scenario = Scenario.from_plant(
        config,
        hosts=1,
        speedup=speedup,
        failures=failures,
        machine={**dict(machine or {}), "policy": policy},
        scheduler={"bid_window_seconds": 0.05, "retry_seconds": 0.5},
    )
    holder.append(scenario)
    for i, name in enumerate(plant.machine_names):
        low, high = float(plant.health0_min[i]), float(plant.health0_max[i])
        scenario.machine(name).set_health(rng.uniform(low, high))
    subjects = Subjects(config.name)
    products = list(config.products)
    weights = [p.mix for p in products]
    n_orders = rng.randint(*orders)
    for i in range(n_orders):
        product = rng.choices(products, weights)[0]
        arrival = 0.0 if i < n_orders // 2 else rng.uniform(0.0, arrivals_hours * 3600.0)
        route_s = sum(step.minutes for step in product.route) * 60.0
        due = arrival + rng.uniform(*due_slack) * route_s
        order = OrderSubmit(
            client_order_id=f"mes-{i}",
            items=[OrderItem(product=product.name, quantity=rng.randint(1, 3))],
            due_at=due,
        )
        scenario.publish(
            subjects.orders_submit, order, reply_to=f"_INBOX.{i}", delay=arrival / speedup
        )
    results = scenario.watch(subjects.result_all)
    scheduler = scenario.agents["scheduler"]
    world = scenario.agents["plant"]
    assert isinstance(scheduler, SchedulerAgent)
    assert isinstance(world, PlantWorld)

    def done() -> bool:
        return len(scheduler.orders) == n_orders and scheduler.all_done()

    completed = scenario.run(done, for_seconds=50_000.0, max_steps=2_000_000)
    tariff = scenario.machine(plant.machine_names[0]).tariff
    energy = 0.0
    for _, message in results:
        if isinstance(message, InformDone):
            run = message.finished_at - message.started_at
            if run > 0:
                energy += tariff.cost(message.energy_j / run, message.started_at, run)
    jobs = scheduler.jobs.values()
    end = scenario.plant_at(scenario.wall)
    tardiness = sum(
        max((j.finished_at if j.finished_at is not None else end) - j.due_at, 0.0) for j in jobs
    )
    finished = [j.finished_at for j in jobs if j.finished_at is not None]
    return BiddingKpis(
        seed=seed,
        jobs=len(scheduler.jobs),
        completed=completed,
        tardiness_hours=tardiness / 3600.0,
        energy_cost=energy,
        makespan_hours=(max(finished) if finished else 0.0) / 3600.0,
        breakdowns=len(world.breakdowns),
        passes=int(getattr(policy, "passed", 0)),
        energy_hours_per_currency=ScoreWeights().energy / 3600.0,
    )


def evaluate_bidding(make: Callable[[], BiddingPolicy], seeds: Sequence[int]) -> list[BiddingKpis]:
    """:func:`run_episode` on each seed, each with a fresh policy from ``make`` (so no
    pass memory is carried from one episode to the next)."""
    return [run_episode(make(), seed) for seed in seeds]


# --------------------------------------------------------------------------- training


@dataclass
class BiddingTraining:
    """What :func:`train_bidding` found: the policy and how the search went."""

    policy: LearnedBidding
    #: Mean paired cost difference (learned - rule) on the training seeds, per iteration
    #: (best candidate of the iteration), and of the kept policy.
    history: list[float] = field(default_factory=list)
    best: float = 0.0
    #: The kept policy's mean paired difference on the validation seeds (0 without any).
    validation: float = 0.0
    rule_cost: float = 0.0
    episodes: int = 0
    seconds: float = 0.0


def train_bidding(
    seeds: Sequence[int],
    *,
    iterations: int = 10,
    population: int = 16,
    elite: int = 4,
    init_std: float = 1.0,
    hidden: int = 0,
    max_passes: int = 2,
    speeds: int = 0,
    stay: float = 4.0,
    seed: int = 0,
    validation: Sequence[int] = (),
    progress: Callable[[int, float], None] | None = None,
) -> BiddingTraining:
    """Cross-entropy search of the gate's weights on :func:`run_episode` over ``seeds``.

    Each iteration samples ``population`` weight vectors from a diagonal Gaussian (the
    current mean is always one of them), scores each by the mean over ``seeds`` of its
    episode cost minus the rule's on the same seed, and refits the Gaussian to the
    ``elite`` best. The search starts from a gate that never passes (the rule). Without
    ``validation`` seeds the policy kept is the best candidate ever scored on ``seeds``;
    with them, each iteration's best is scored on ``validation`` too and the one best
    there is kept, which guards against a gate that only fits the training seeds' luck.
    Either way the rule itself is a candidate, so the kept policy is never worse than the
    rule on the seeds it was chosen on. ``hidden`` > 0 puts one tanh layer of that width
    in the network. ``speeds`` > 0 searches a speed chooser over that many evenly spaced
    speeds (besides the machine's own) instead of a gate; its start scores each speed
    ``-stay x change_sq`` (with no hidden layer; 0 with one), so the machine's own speed
    wins, and never passes: the rule again.
    ``progress(iteration, best)`` is called after each iteration.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    features, outputs = LearnedBidding.layout_of(speeds)
    n = len(features)
    never_pass = np.zeros(outputs)
    never_pass[-1] = -1.0
    if hidden > 0:
        shapes: Layers = [
            (np.zeros((n, hidden)), np.zeros(hidden)),
            (np.zeros((hidden, outputs)), never_pass),
        ]
    else:
        w = np.zeros((n, outputs))
        if speeds:
            w[features.index("change_sq"), 0] = -stay
        shapes = [(w, never_pass)]
    template = LearnedBidding(shapes, max_passes=max_passes, speeds=speeds)
    rule = [run_episode(RuleBasedBidding(), s).cost for s in seeds]
    rule_validation = [run_episode(RuleBasedBidding(), s).cost for s in validation]
    episodes = len(seeds) + len(validation)

    def score(theta: NDArray[np.float64], on: Sequence[int], base: Sequence[float]) -> float:
        nonlocal episodes
        costs = [run_episode(template.with_flat(theta), s).cost for s in on]
        episodes += len(on)
        return statistics.fmean(c - r for c, r in zip(costs, base, strict=True))

    mean = template.flat()
    std = np.full(mean.size, init_std)
    # The start never passes: it scores as the rule, 0 on any seeds.
    best_theta, best, best_validation = mean.copy(), 0.0, 0.0
    history: list[float] = []
    for it in range(iterations):
        thetas = [
            mean.copy(),
            *(mean + std * rng.standard_normal(mean.size) for _ in range(population - 1)),
        ]
        scores = np.array([score(t, seeds, rule) for t in thetas])
        order = np.argsort(scores, kind="stable")
        top, top_score = thetas[order[0]], float(scores[order[0]])
        if validation:
            if top_score < 0.0:
                checked = score(top, validation, rule_validation)
                if checked < best_validation:
                    best, best_validation, best_theta = top_score, checked, top.copy()
        elif top_score < best:
            best, best_theta = top_score, top.copy()
        elites = np.stack([thetas[i] for i in order[:elite]])
        mean = elites.mean(axis=0)
        std = elites.std(axis=0) + 0.05 * init_std
        history.append(top_score)
        if progress is not None:
            progress(it, best)
    from autofab.agents.policies.artifacts import package_version

    policy = template.with_flat(best_theta)
    policy.meta = {
        "algo": "cem",
        "autofab_version": package_version(),
        "environment": "in-memory negotiation of the demo plant (bidding_policy.run_episode)",
        "objective": "tardiness_hours + energy_cost (1 currency = 1 h), minus the rule's",
        "train_seeds": list(seeds),
        "iterations": iterations,
        "population": population,
        "elite": elite,
        "init_std": init_std,
        "hidden": hidden,
        "speeds": speeds,
        "stay": stay,
        "max_passes": max_passes,
        "seed": seed,
        "validation_seeds": list(validation),
        "best_mean_delta": best,
        "validation_mean_delta": best_validation,
        "rule_mean_cost": statistics.fmean(rule),
        "episodes": episodes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return BiddingTraining(
        policy=policy,
        history=history,
        best=best,
        validation=best_validation,
        rule_cost=statistics.fmean(rule),
        episodes=episodes,
        seconds=time.perf_counter() - started,
    )
