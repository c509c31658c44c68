"""What ``sagakit demo`` and ``sagakit simulate`` run: the reference data, and a seeded
mix of orders.

Every scenario is chosen by the order's data, never by chance at run time:

* ``sku``: ``sku-limited-1`` has :data:`LIMITED` units for everyone who asks (orders
  race for them; the losers are sold out and undone), ``sku-plenty-1`` never runs out;
* ``card``: ``card-declined-...`` fails the pivot (the hold is released);
* ``email_route`` / ``sms_route``: the providers' weather for the customer
  (:data:`~.provider.ROUTES`): ``ok``, ``slow`` (sent, answered too late: retried,
  deduplicated), ``down`` (a short outage: retried with backoff) or ``outage``
  (longer than the deadline: a person takes over).

The first three orders of every load race for the limited SKU and meet slow providers,
so that even the simulator's three sagas per seed cover the race, retries after a lost
answer, and a failure before or an outage after the pivot.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from . import provider
from .sagas import NAME

if TYPE_CHECKING:
    from sagakit import Deployment

LIMITED = 2
"""Units of ``sku-limited-1`` in stock at the start of a run."""
PLENTY = 1_000_000_000
"""Units of ``sku-plenty-1``."""
STOCK = {"sku-limited-1": LIMITED, "sku-plenty-1": PLENTY}


def load(count: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` orders to start: ``(definition, business key, data)``, same seed,
    same list."""
    rng = random.Random(f"notifications:{seed}")
    orders = []
    for i in range(count):
        n = f"{seed}-{i:05d}"
        data: dict[str, Any] = {
            "customer": f"cus-{n}",
            "sku": "sku-plenty-1",
            "qty": 1,
            "amount": rng.randrange(1_000, 50_000, 50),  # cents
            "card": f"card-ok-{n}",
            "email_route": "ok",
            "sms_route": "ok",
        }
        if i == 0:
            data.update(sku="sku-limited-1", email_route="slow", sms_route="down")
        elif i == 1:
            data.update(sku="sku-limited-1", email_route="slow", sms_route="slow")
        elif i == 2:
            data["sku"] = "sku-limited-1"
            trouble = rng.choice(["declined", "email-outage", "sms-outage"])
            if trouble == "declined":
                data["card"] = f"card-declined-{n}"
            else:
                data[trouble.replace("-outage", "_route")] = "outage"
        else:
            if rng.random() < 0.12:
                data["sku"] = "sku-limited-1"
            if rng.random() < 0.1:
                data["card"] = f"card-declined-{n}"
            data["email_route"] = _route(rng, outage=0.08)
            data["sms_route"] = _route(rng, outage=0.04)
        orders.append((NAME, f"ord-{n}", data))
    return orders


def _route(rng: random.Random, *, outage: float) -> str:
    roll = rng.random()
    if roll < outage:
        return "outage"
    if roll < outage + 0.12:
        return "down"
    if roll < outage + 0.27:
        return "slow"
    return "ok"


async def setup(dep: Deployment) -> None:
    """Stock the SKUs (once: a second call changes nothing) and write the providers'
    weather for the app's time scale."""
    async with dep.store("orders").transaction() as tx:
        for sku, units in sorted(STOCK.items()):
            if await tx.fetchone("SELECT 1 FROM stock WHERE sku = ?", (sku,)) is None:
                await tx.execute(
                    "INSERT INTO stock (sku, total, held, sold) VALUES (?, ?, 0, 0)",
                    (sku, units),
                )
    scale = float(dep.ctx.option("time_scale"))
    for service in ("email", "sms"):
        async with dep.store(service).transaction() as tx:
            await provider.seed_routes(tx, scale)
