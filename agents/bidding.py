"""How a machine agent prices an operation: the pluggable bidding policy and its rule default.

A machine bids in Contract Net with three numbers (:class:`autofab.agents.protocol.Bid`):
when it would finish, what the energy would cost, and the chance it breaks down doing it.
The agent gathers what it knows into a :class:`BidContext`; a :class:`BiddingPolicy` turns
that and the call into a bid, or ``None`` to stay out of the round. A learned policy plugs
in by implementing the same one method.

A policy may also choose the speed the operation runs at: one that has
``bid_with_speed`` (:class:`SpeedBiddingPolicy`) returns the bid with its speed, priced by
:func:`honest_bid` at that speed, and the machine runs the operation at it if awarded. A
policy with only ``bid`` bids at the machine's own speed (``BidContext.speed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from autofab.agents.energy import Tariff
from autofab.agents.protocol import Bid, CallForProposals
from autofab.envs.plant import PlantArrays

__all__ = [
    "BidContext",
    "BiddingPolicy",
    "MachineSpec",
    "RuleBasedBidding",
    "SpeedBiddingPolicy",
    "honest_bid",
]


@dataclass(frozen=True)
class MachineSpec:
    """One machine's datasheet, from the plant config, in SI units (seconds, watts).

    The formulas are the plant model's (``envs/plant.py`` documents them), so a bid prices
    the same physics the plant will run.
    """

    capabilities: frozenset[str]
    speed_min: float
    speed_nominal: float
    speed_max: float
    idle_w: float
    load_w: float
    power_exponent: float
    power_wear_gain: float
    wear_per_s: float
    wear_speed_exponent: float
    hazard_per_s: float
    hazard_sensitivity: float
    repair_mean_s: float

    @classmethod
    def from_plant(cls, plant: PlantArrays, machine: str) -> MachineSpec:
        """The spec of ``machine`` (by name) in a compiled plant."""
        i = plant.machine_names.index(machine)
        return cls(
            capabilities=plant.machine_capabilities[i],
            speed_min=float(plant.speed_min[i]),
            speed_nominal=float(plant.speed_nominal[i]),
            speed_max=float(plant.speed_max[i]),
            idle_w=float(plant.idle_w[i]),
            load_w=float(plant.load_w[i]),
            power_exponent=float(plant.power_exponent[i]),
            power_wear_gain=float(plant.power_wear_gain[i]),
            wear_per_s=float(plant.wear_per_s[i]),
            wear_speed_exponent=float(plant.wear_speed_exponent[i]),
            hazard_per_s=float(plant.hazard_per_s[i]),
            hazard_sensitivity=float(plant.hazard_sensitivity[i]),
            repair_mean_s=float(plant.repair_mean_s[i]),
        )

    def running_power_w(self, speed: float, load: float, health: float) -> float:
        """Power while running an operation of relative ``load`` at ``speed``."""
        wear = 1.0 + self.power_wear_gain * (1.0 - health)
        return self.idle_w + self.load_w * load * speed**self.power_exponent * wear

    def hazard(self, health: float) -> float:
        """Breakdown hazard per running second at ``health``."""
        return self.hazard_per_s * math.exp(self.hazard_sensitivity * (1.0 - health))

    def wear_rate(self, speed: float, load: float) -> float:
        """Health lost per running second."""
        return self.wear_per_s * load * speed**self.wear_speed_exponent


@dataclass(frozen=True)
class BidContext:
    """What a machine knows when it is asked to bid."""

    machine: str
    spec: MachineSpec
    #: The machine's own speed: what an operation runs at unless the policy chooses one.
    speed: float
    health: float
    #: Plant time at which the machine's queue of awarded work runs out.
    queue_end_at: float
    #: Plant time now.
    now: float
    tariff: Tariff


@runtime_checkable
class BiddingPolicy(Protocol):
    """Turns a call for proposals into this machine's bid, or ``None`` to pass."""

    def bid(self, cfp: CallForProposals, context: BidContext) -> Bid | None: ...


@runtime_checkable
class SpeedBiddingPolicy(BiddingPolicy, Protocol):
    """A bidding policy that also chooses the speed the operation runs at.

    ``bid_with_speed`` returns the bid and its speed, or ``None`` to pass. The bid must be
    the one the machine can keep at that speed (:func:`honest_bid` with ``speed``), and the
    speed must lie in ``[spec.speed_min, spec.speed_max]``: the machine clamps one outside
    and prices the bid again at the clamped speed. ``bid`` stays the answer for callers
    that run at the machine's own speed.
    """

    def bid_with_speed(
        self, cfp: CallForProposals, context: BidContext
    ) -> tuple[Bid, float] | None: ...


def honest_bid(cfp: CallForProposals, context: BidContext, speed: float | None = None) -> Bid:
    """The bid the machine can keep for ``cfp`` at ``speed`` (default: the machine's own,
    ``context.speed``), no strategy in it.

    * finish = max(now, ready, queue end) + processing / speed;
    * energy cost = running power at that speed and load, priced by the tariff hour by
      hour over the run;
    * health risk = 1 - exp(-hazard x duration), the hazard taken at the health expected
      halfway through the operation (wear rises while it runs).

    Every policy prices its bids here, so whatever a policy decides (bid or pass, and at
    which speed), a bid it sends is the machine's own honest estimate.

    Raises:
        ValueError: ``speed`` is outside the machine's ``[speed_min, speed_max]``.
    """
    spec = context.spec
    speed = context.speed if speed is None else speed
    if not spec.speed_min <= speed <= spec.speed_max:
        raise ValueError(
            f"speed {speed} of {context.machine} is outside [{spec.speed_min}, {spec.speed_max}]"
        )
    duration = cfp.processing_seconds / speed
    start = max(context.now, cfp.ready_at, context.queue_end_at)
    power = spec.running_power_w(speed, cfp.load, context.health)
    mid_health = context.health - spec.wear_rate(speed, cfp.load) * duration / 2
    risk = 1.0 - math.exp(-spec.hazard(max(mid_health, 0.0)) * duration)
    return Bid(
        machine=context.machine,
        finish_at=start + duration,
        energy_cost=context.tariff.cost(power, start, duration),
        health_risk=min(max(risk, 0.0), 1.0),
    )


class RuleBasedBidding:
    """The default rule: bid on every call the machine is capable of, with
    :func:`honest_bid`'s estimate."""

    def bid(self, cfp: CallForProposals, context: BidContext) -> Bid | None:
        if cfp.capability not in context.spec.capabilities:
            return None
        return honest_bid(cfp, context)
