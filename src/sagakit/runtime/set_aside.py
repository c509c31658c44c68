"""Inputs of sagas whose definition version this process lacks: set aside, resumed later.

A saga runs the definition version it started with. A worker deployed without that
version (``travel@2`` only, while ``travel@1`` sagas are in flight) cannot compute
their transitions. Retrying would spin, and dead-lettering would lose them; instead,
each input of such a saga (a reply, a local step's command, a fired timer) is **set
aside** in the orchestrator store's ``set_aside`` table, in the transaction that
records it in the inbox (or takes the timer), so:

* nothing else waits: the batch it came in commits, other sagas' replies and timers go
  on, and the timer loop never meets the timer again;
* duplicates are still recognised (the inbox entry is there) and nothing is lost (the
  row is as durable as the saga);
* any process that has the version, on any host, applies it: at its start, when a
  commit that set something aside notifies it (PostgreSQL), or at its next poll. It
  claims the rows for a lease (so two such processes do not run one local step twice),
  runs the local steps among them outside any transaction, and applies everything in
  one transaction that deletes the rows it applies; the saga's version check (fencing)
  judges a stale input as it would judge a late message.

Why a table and not the broker: a message handed back to the broker may reach the
same worker again (or only workers without the version); a timer has no message at
all; and the embedded engine has no broker. The table works the same way for all of
them, and a saga's inputs keep their order (the row ids).

One log line per missing version and process says what happened and what to do; the
count of every input set aside is the ``sagakit_inputs_set_aside_total`` metric, and
the API shows the saga as ``waiting_for: name@N``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sagakit.core.envelope import Envelope, Outcome, reply_to
from sagakit.core.instance import SagaInstance, Timer
from sagakit.errors import MessageError, VersionMissing
from sagakit.metrics import INPUTS_RESUMED, INPUTS_SET_ASIDE
from sagakit.runtime.consumer import PERMANENT
from sagakit.stores.base import SetAside, Store, Tx

if TYPE_CHECKING:
    from sagakit.runtime.orchestrator import Orchestrator

log = logging.getLogger(__name__)

REPLY, LOCAL, TIMER = "reply", "local", "timer"
"""The kinds of input set aside (:data:`sagakit.stores.base.SET_ASIDE_KINDS`)."""
_WORDS = {REPLY: "reply", LOCAL: "local step's command", TIMER: "fired timer"}


def timer_to_json(timer: Timer) -> str:
    """A timer as the ``body`` of a set-aside row."""
    return json.dumps(
        {"saga_id": timer.saga_id, "name": timer.name, "due_at": timer.due_at, "fence": timer.fence}
    )


def timer_from_json(body: str) -> Timer:
    """The timer a set-aside row holds; :class:`MessageError` if it holds none."""
    try:
        d = json.loads(body)
        return Timer(
            saga_id=str(d["saga_id"]),
            name=str(d["name"]),
            due_at=float(d["due_at"]),
            fence=str(d["fence"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise MessageError(f"not a timer: {body[:200]!r} ({exc!r})") from exc


async def waiting_for(store: Store, saga_id: str) -> str | None:
    """``name@N`` when inputs of ``saga_id`` wait for a process with that version."""
    rows = await store.set_aside_of_saga(saga_id)
    return rows[0].waiting_for if rows else None


class SetAsideDesk:
    """Sets aside one orchestrator's inputs for missing versions, and resumes them.

    ``lease``: how long a claimed row is kept from other processes (it must cover the
    local steps among them); a process that dies holding a claim delays those rows by
    that much.
    """

    def __init__(self, orchestrator: Orchestrator, *, lease: float = 30.0) -> None:
        self.orchestrator = orchestrator
        self.lease = lease
        self._told: set[str] = set()

    # -- setting aside ------------------------------------------------------------------
    def lacks(self, definition: str, version: int) -> bool:
        """Whether this process lacks ``definition@version``."""
        return (definition, version) not in self.orchestrator.machines

    def local_version(self, env: Envelope) -> tuple[str, int] | None:
        """The missing version a local step's command needs, or None.

        None too when the command does not say (a malformed one is refused as before).
        """
        payload = env.payload
        name, version = payload.get("definition"), payload.get("definition_version")
        if not isinstance(name, str) or not isinstance(version, int):
            return None
        return (name, version) if self.lacks(name, version) else None

    async def put(
        self,
        tx: Tx,
        saga_id: str,
        definition: str,
        version: int,
        kind: str,
        body: str,
        now: float,
    ) -> None:
        """Set an input aside in ``tx`` (the transaction that took it)."""
        await tx.set_aside_add(saga_id, definition, version, kind, body, now)
        key = f"{definition}@{version}"
        INPUTS_SET_ASIDE.labels(key, kind).inc()
        extra = {"saga_id": saga_id, "waiting_for": key, "kind": kind}
        if key in self._told:
            log.debug("%s of saga %s set aside for %s", kind, saga_id, key, extra=extra)
            return
        self._told.add(key)
        log.warning(
            "saga %s runs definition %s, which this process does not have (it has %s): its "
            "%s is set aside, and so will be every input of %s sagas, until a process that "
            "has %s runs (deploy both versions side by side; see `sagakit versions`)",
            saga_id,
            key,
            ", ".join(sorted(f"{n}@{v}" for n, v in self.orchestrator.machines)) or "none",
            _WORDS.get(kind, kind),
            key,
            key,
            extra=extra,
        )

    async def put_saga(self, tx: Tx, inst: SagaInstance, kind: str, body: str, now: float) -> None:
        """:meth:`put` for an input of ``inst`` (loaded in ``tx``)."""
        await self.put(tx, inst.saga_id, inst.definition, inst.definition_version, kind, body, now)

    async def put_local(self, tx: Tx, env: Envelope, now: float) -> bool:
        """Set a local step's command aside if its version is missing; True if it was."""
        missing = self.local_version(env)
        if missing is None:
            return False
        await self.put(tx, env.saga_id or "", missing[0], missing[1], LOCAL, env.to_json(), now)
        return True

    # -- resuming -------------------------------------------------------------------------
    async def waiting(self) -> dict[tuple[str, int], int]:
        """Inputs waiting for versions this process has, per version."""
        counts = await self.orchestrator.store.set_aside_counts()
        return {v: n for v, n in counts.items() if not self.lacks(*v)}

    async def resume(self, limit: int = 256) -> int:
        """Apply up to ``limit`` inputs waiting for versions this process has.

        Returns how many it claimed (0: nothing waits for this process). A read when
        nothing waits; call it again while it returns ``limit``.
        """
        o = self.orchestrator
        versions = sorted(await self.waiting())
        if not versions:
            return 0
        rows = await o.store.set_aside_claim(versions, limit, o.clock(), self.lease)
        if not rows:
            return 0
        outcomes, poison = await self._run_local_steps(rows)
        try:
            await self._apply(rows, outcomes, poison)
        except Exception as exc:
            if len(rows) == 1:
                await self._failed(rows[0], outcomes, exc)
            else:
                log.debug("resuming %d inputs failed (%r); one by one", len(rows), exc)
                for row in rows:
                    try:
                        await self._apply([row], outcomes, poison)
                    except Exception as one_exc:
                        await self._failed(row, outcomes, one_exc)
        return len(rows)

    async def _run_local_steps(
        self, rows: Sequence[SetAside]
    ) -> tuple[dict[int, Outcome], dict[int, str]]:
        """Run the local steps among ``rows`` outside any transaction, as the mailbox
        consumer would; a command that cannot run is poison (row id -> why)."""
        outcomes: dict[int, Outcome] = {}
        poison: dict[int, str] = {}
        for row in rows:
            if row.kind != LOCAL:
                continue
            try:
                env = Envelope.from_json(row.body)
                outcomes[row.id] = await self.orchestrator.local._run_callable(env)
            except MessageError as exc:
                poison[row.id] = f"{type(exc).__name__}: {exc}"
        return outcomes, poison

    async def _apply(
        self, rows: Sequence[SetAside], outcomes: Mapping[int, Outcome], poison: Mapping[int, str]
    ) -> None:
        """One transaction: take the rows still there and apply them in order; poison
        ones are parked as dead letters instead."""
        o = self.orchestrator
        now = o.clock()
        applied: list[SetAside] = []
        async with o.transaction() as tx:
            taken = await tx.set_aside_take([r.id for r in rows])
            todo = [r for r in rows if r.id in taken]
            loaded = await tx.saga_get_many(sorted({r.saga_id for r in todo}))
            for row in todo:
                if row.id in poison:
                    await self._dead_letter(tx, row, poison[row.id], now)
                elif row.saga_id not in loaded:
                    log.warning(
                        "%s set aside for saga %s dropped: the saga is gone",
                        row.kind,
                        row.saga_id,
                        extra={"saga_id": row.saga_id, "kind": row.kind},
                    )
                elif row.kind == TIMER:
                    await o._apply_timer(tx, timer_from_json(row.body), now, loaded)
                    applied.append(row)
                else:
                    env = Envelope.from_json(row.body)
                    endpoint = o.endpoint
                    if row.kind == LOCAL:
                        endpoint = o.local_endpoint
                        env = reply_to(env, outcomes[row.id], source=endpoint, now=now)
                    await o.apply_replies(tx, [env], now, endpoint, loaded=loaded)
                    applied.append(row)
            for row in applied:
                INPUTS_RESUMED.labels(row.waiting_for, row.kind).inc()
        if todo:
            o.after_commit()
        if applied:
            log.info(
                "applied %d input(s) set aside for %s",
                len(applied),
                ", ".join(sorted({r.waiting_for for r in applied})),
            )

    async def _failed(self, row: SetAside, outcomes: Mapping[int, Outcome], exc: Exception) -> None:
        """A row that failed on its own: parked if it never can apply, else left to be
        claimed again when its lease ends."""
        extra = {"saga_id": row.saga_id, "kind": row.kind, "waiting_for": row.waiting_for}
        if isinstance(exc, VersionMissing) or not isinstance(exc, PERMANENT):
            log.warning(
                "applying a %s set aside for saga %s failed (%r); it is tried again in %.0fs",
                row.kind,
                row.saga_id,
                exc,
                self.lease,
                extra=extra,
            )
            return
        reason = f"{type(exc).__name__}: {exc}"
        log.warning(
            "parking a %s set aside for saga %s: %s", row.kind, row.saga_id, reason, extra=extra
        )
        await self._apply([row], outcomes, {row.id: reason})

    async def _dead_letter(self, tx: Tx, row: SetAside, reason: str, now: float) -> None:
        o = self.orchestrator
        if row.kind == TIMER:
            log.error(
                "timer set aside for saga %s dropped: %s",
                row.saga_id,
                reason,
                extra={"saga_id": row.saga_id},
            )
            return
        endpoint = o.local_endpoint if row.kind == LOCAL else o.endpoint
        try:
            message_id: str | None = Envelope.from_json(row.body).message_id
        except MessageError:
            message_id = None  # parked all the same, with the body as it was
        await tx.dead_letter(endpoint, message_id, row.body, reason, now)
