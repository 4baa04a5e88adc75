"""The supply agent: raw-material stock, reservations, reorders and deliveries.

Why it works this way
---------------------
* A reservation takes the material out of stock at once: the protocol has no "consumed"
  message, and an operation consumes its material when it starts, so the only way back
  is :class:`MaterialRelease`, which a machine sends when the operation did *not* start.
* Reorders follow the plant config's reorder-point policy on the *inventory position*
  (stock on hand plus deliveries on their way): whenever it is at or below
  ``reorder_point`` the agent orders ``reorder_quantity`` and publishes
  :class:`MaterialReorder`. A reservation that cannot be met also orders enough to cover
  it, so no request waits on a delivery that was never placed.
* A delivery arrives after the supplier's nominal lead time (plant time). The agent is
  deterministic; a plant whose supplier slips tells it through a later delivery, which is
  the runtime's business.
* :class:`MaterialUnavailable` carries ``available_at``: the arrival of the first pending
  delivery that, with the free stock, covers the request.

Requests are idempotent by request id: a repeated reserve gets the same answer, and a
reserve or release for a request id already released is ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from autofab.agents.base import Agent, Now, Outgoing, Subscription
from autofab.agents.energy import bounded_add, plant_to_wall
from autofab.agents.protocol import (
    MaterialRelease,
    MaterialReorder,
    MaterialReserve,
    MaterialReserved,
    MaterialUnavailable,
    MessageBase,
    Subjects,
)
from autofab.envs.plant import MaterialSpec, PlantConfig

__all__ = ["Delivery", "MaterialPolicy", "SupplyAgent"]


@dataclass(frozen=True)
class MaterialPolicy:
    """How one material is restocked (the plant config's numbers, lead time in seconds)."""

    reorder_point: float
    reorder_quantity: float
    lead_seconds: float

    @classmethod
    def from_spec(cls, spec: MaterialSpec) -> MaterialPolicy:
        return cls(spec.reorder_point, spec.reorder_quantity, spec.lead_time_hours * 3600.0)


@dataclass
class Delivery:
    """A reorder on its way: ``quantity`` of ``material`` arriving at plant time ``at``."""

    material: str
    quantity: float
    at: float


@dataclass
class _Reservation:
    machine: str
    material: str
    quantity: float


class SupplyAgent(Agent):
    """Reserves material per operation and keeps stock above the reorder points."""

    def __init__(
        self,
        name: str,
        subjects: Subjects,
        stock: Mapping[str, float],
        policies: Mapping[str, MaterialPolicy],
        *,
        speedup: float = 1.0,
        memory: int = 10_000,
    ) -> None:
        super().__init__(name)
        if set(stock) != set(policies):
            raise ValueError(
                f"stock and policies must name the same materials: {sorted(stock)} vs "
                f"{sorted(policies)}"
            )
        self.subjects = subjects
        self.policies = dict(policies)
        self.speedup = speedup
        self.memory = memory
        self.stock: dict[str, float] = {m: float(q) for m, q in stock.items()}
        self.pending: list[Delivery] = []
        self.reservations: dict[str, _Reservation] = {}
        self.released: OrderedDict[str, None] = OrderedDict()
        self._reorders_due: list[MaterialReorder] = []
        self._timer_wall: float | None = None

    @classmethod
    def from_plant(cls, name: str, config: PlantConfig, *, speedup: float = 1.0) -> SupplyAgent:
        """The agent for ``config``'s materials, starting from their initial stock."""
        return cls(
            name,
            Subjects(config.name),
            {m.name: m.initial_stock for m in config.materials},
            {m.name: MaterialPolicy.from_spec(m) for m in config.materials},
            speedup=speedup,
        )

    def subscriptions(self) -> list[Subscription]:
        return [
            Subscription(self.subjects.material_reserve),
            Subscription(self.subjects.material_release),
        ]

    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        self._receive(now)
        if isinstance(message, MaterialReserve):
            out = self._reserve(message, now, reply_to)
        elif isinstance(message, MaterialRelease):
            out = self._release(message)
        else:
            self._count(f"unexpected_{message.type}")
            out = []
        return out + self._flush_reorders()

    def next_timer(self) -> float | None:
        if not self.pending:
            return None
        return self._timer_wall

    def on_timer(self, now: Now) -> list[Outgoing]:
        self._receive(now)
        return self._flush_reorders()

    def free(self, material: str) -> float:
        """Stock on hand that no reservation holds."""
        return self.stock[material]

    def position(self, material: str) -> float:
        """Inventory position: stock on hand plus deliveries on their way."""
        on_the_way = sum(d.quantity for d in self.pending if d.material == material)
        return self.stock[material] + on_the_way

    def _reserve(self, req: MaterialReserve, now: Now, reply_to: str | None) -> list[Outgoing]:
        to = reply_to or self.subjects.material_reply(req.machine)
        held = self.reservations.get(req.request_id)
        if held is not None:
            self._count("duplicate_reserve")
            reply = MaterialReserved(
                request_id=req.request_id,
                machine=held.machine,
                material=held.material,
                quantity=held.quantity,
            )
            return [Outgoing(to, reply)]
        if req.request_id in self.released:
            self._count("released_request")
            return []
        if req.material not in self.stock:
            self._count("unknown_material")
            reply_u = MaterialUnavailable(
                request_id=req.request_id,
                machine=req.machine,
                material=req.material,
                quantity=req.quantity,
            )
            return [Outgoing(to, reply_u)]
        if self.stock[req.material] + 1e-9 >= req.quantity:
            self.stock[req.material] -= req.quantity
            self.reservations[req.request_id] = _Reservation(
                req.machine, req.material, req.quantity
            )
            self._reorder(req.material, 0.0, now)
            reply_r = MaterialReserved(
                request_id=req.request_id,
                machine=req.machine,
                material=req.material,
                quantity=req.quantity,
            )
            return [Outgoing(to, reply_r)]
        self._reorder(req.material, req.quantity, now)
        reply_u = MaterialUnavailable(
            request_id=req.request_id,
            machine=req.machine,
            material=req.material,
            quantity=req.quantity,
            available_at=self._available_at(req.material, req.quantity),
        )
        return [Outgoing(to, reply_u)]

    def _available_at(self, material: str, quantity: float) -> float | None:
        have = self.stock[material]
        for delivery in sorted(self.pending, key=lambda d: d.at):
            if delivery.material == material:
                have += delivery.quantity
                if have + 1e-9 >= quantity:
                    return delivery.at
        return None

    def _reorder(self, material: str, need: float, now: Now) -> None:
        """Order until the position is above the reorder point and covers ``need``."""
        policy = self.policies[material]
        while (
            self.position(material) <= policy.reorder_point or self.position(material) + 1e-9 < need
        ):
            delivery = Delivery(material, policy.reorder_quantity, now.plant + policy.lead_seconds)
            self.pending.append(delivery)
            self._reorders_due.append(
                MaterialReorder(
                    material=material,
                    quantity=delivery.quantity,
                    ordered_at=now.plant,
                    available_at=delivery.at,
                )
            )
        self._set_timer(now)

    def _release(self, rel: MaterialRelease) -> list[Outgoing]:
        held = self.reservations.pop(rel.request_id, None)
        if held is None:
            self._count("unknown_release")
        else:
            self.stock[held.material] += held.quantity
        bounded_add(self.released, rel.request_id, self.memory)
        return []

    def _receive(self, now: Now) -> None:
        """Book every delivery due by ``now.plant`` into stock."""
        due = [d for d in self.pending if d.at <= now.plant]
        if due:
            self.pending = [d for d in self.pending if d.at > now.plant]
            for d in due:
                self.stock[d.material] += d.quantity
        self._set_timer(now)

    def _set_timer(self, now: Now) -> None:
        self._timer_wall = (
            plant_to_wall(min(d.at for d in self.pending), now, self.speedup)
            if self.pending
            else None
        )

    def _flush_reorders(self) -> list[Outgoing]:
        out = [Outgoing(self.subjects.material_reorder, r) for r in self._reorders_due]
        self._reorders_due = []
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "stock": dict(self.stock),
            "pending": [asdict(d) for d in self.pending],
            "reservations": {r: asdict(v) for r, v in self.reservations.items()},
            "released": list(self.released),
            "ignored": dict(self.ignored),
            "timer": self._timer_wall,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.stock = {m: float(q) for m, q in state["stock"].items()}
        self.pending = [Delivery(**d) for d in state["pending"]]
        self.reservations = {r: _Reservation(**v) for r, v in state["reservations"].items()}
        self.released = OrderedDict.fromkeys(str(r) for r in state["released"])
        self.ignored = dict(state["ignored"])
        self._timer_wall = state["timer"]
