"""The seeded scheduler: one action per step, faults within a budget, then fair to quiescence."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.core.machine import ManualAction
from sagakit.errors import ManualActionRefused, SagaNotFound
from sagakit.testing.faults import InjectedCrash
from sagakit.testing.sim.network import (
    EPOCH,
    STEP_COST,
    InFlight,
)
from sagakit.testing.sim.world import (
    DECISIONS,
    FAULT_KINDS,
    MANUAL_ACTIONS,
    OPERATOR,
    RETRY_THEN_CANCEL,
    RETRY_THEN_CANCEL_COUNT,
    Action,
    RunResult,
    SimConfig,
    Verdict,
    World,
    WorldFactory,
)

__all__ = [
    "DECISIONS",
    "FAULT_KINDS",
    "MANUAL_ACTIONS",
    "OPERATOR",
    "RETRY_THEN_CANCEL",
    "RETRY_THEN_CANCEL_COUNT",
    "Action",
    "RunResult",
    "Scheduler",
    "SimConfig",
    "Verdict",
    "World",
    "WorldFactory",
    "replay",
    "simulate",
]


class Scheduler:
    """Runs one world: random (seeded) or from a schedule, then fair to quiescence."""

    def __init__(self, world: World, seed: int, config: SimConfig | None = None) -> None:
        self.w = world
        self.seed = seed
        self.cfg = config or SimConfig()
        self.rng = random.Random(seed)
        self.schedule: list[Action] = []
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.seen: set[str] = set()
        """Violations :meth:`World.watch` reported so far (each is reported once)."""
        self.steps = 0
        self.decisions = 0
        self.decided: str | None = None
        """The store the last decision that the machine accepted wrote to."""
        self.replaying = False
        self.dirty: set[str] = set()
        self.store_of = {ep: s.name for ep, s in world.routes.items()}
        self.timer_point = world.timers.point

    # -- running ----------------------------------------------------------------------------
    async def run(self, replay: Sequence[Action] | None = None) -> RunResult:
        """Run the world to quiescence and check it."""
        sagas = await self.w.begin()
        self.dirty |= {name for name, r in self.w.relays.items() if await r.store.outbox_pending()}
        applied: list[Action] = []
        if replay is None:
            await self._random_phase()
        else:
            self.replaying = True
            for action in replay:
                self.steps += 1
                done = await self.apply(action)
                if done is not None:
                    applied.append(done)
        quiet = await self._fair_phase()
        verdict = await self.w.check()
        if not quiet:
            verdict.violations.append(
                f"liveness: not quiescent after {self.cfg.fair_steps} fair steps"
            )
        verdict.violations.extend(self.errors)
        return RunResult(
            seed=self.seed,
            schedule=self.schedule,
            faults=self.counts,
            verdict=verdict,
            sagas=sagas,
            steps=self.steps,
            fingerprint=await self.w.fingerprint() if self.cfg.fingerprint else "",
            applied=applied,
        )

    async def _random_phase(self) -> None:
        cfg, rng, net = self.cfg, self.rng, self.w.network
        budget, cancels = cfg.budget, 0
        for _ in range(cfg.max_steps):
            self.steps += 1
            ready = net.deliverable()
            pending = sorted(self.dirty)
            if not ready and not pending:
                if not net.in_flight and await self.w.all_terminal():
                    return
                if await self.apply(Action("tick")) is None:
                    return
                continue
            if (
                self.decisions < cfg.max_decisions
                and rng.random() < cfg.operator_rate
                and await self._operate()
            ):
                continue
            if cancels < cfg.max_cancels and rng.random() < cfg.cancel_rate:
                running = await self.w.running()
                if running:
                    victim = rng.choice(running)
                    await self.apply(Action("cancel", (victim,)))
                    cancels += 1
                    continue
            if budget > 0 and rng.random() < cfg.fault_rate:
                action = await self._pick_fault(ready, pending)
                if action is not None and await self.apply(action) is not None:
                    budget -= 1
                    continue
            if ready and (not pending or rng.random() < 0.75):
                first = ready[-1] if rng.random() < cfg.newest_rate else rng.choice(ready)
                items = [first]
                if rng.random() < cfg.batch_rate:
                    same = [m for m in ready if m.endpoint == first.endpoint and m is not first]
                    rng.shuffle(same)
                    items += same[: rng.randrange(cfg.max_batch)]
                await self.apply(Action("deliver", tuple(m.address for m in items)))
            else:
                await self.apply(Action("relay", (rng.choice(pending),)))

    async def _operate(self) -> bool:
        """Let the operator decide on a saga waiting for a person; False if none waits.

        After a :data:`RETRY_THEN_CANCEL` the retried command is published (it is on its
        way), held back by a delay with :attr:`SimConfig.overtake_rate`, and the customer
        cancels: every part is an action of its own in the schedule (a replay needs no
        more), the delay a fault like any other.
        """
        picked = await self._decide()
        if picked is None:
            return False
        decision, then_cancel = picked
        self.decided = None
        await self.apply(decision)
        if not then_cancel or self.decided is None:
            return True  # refused: the saga still waits, nothing to cancel
        self.counts[RETRY_THEN_CANCEL_COUNT] += 1
        saga_id, net = decision.target[0], self.w.network
        before = set(net.in_flight)
        await self.apply(Action("relay", (self.decided,)))
        retried = [
            m
            for seq, m in net.in_flight.items()
            if seq not in before
            and m.kind is MessageKind.COMMAND
            and Envelope.from_json(m.body).saga_id == saga_id
        ]
        if retried and self.rng.random() < self.cfg.overtake_rate:
            delay = round(self.rng.uniform(*self.cfg.delay), 3)
            await self.apply(Action("delay", (retried[-1].address,), delay))
        await self.apply(Action("cancel", (saga_id,)))
        return True

    async def _decide(self) -> tuple[Action, bool] | None:
        """The operator's next decision on a saga waiting for a person, if any waits,
        and whether its customer then cancels (:data:`RETRY_THEN_CANCEL`)."""
        rng = self.rng
        waiting = await self.w.manual()
        if not waiting:
            return None
        saga_id = rng.choice(waiting)
        options = await self.w.manual_options(saga_id)
        if options and rng.random() >= self.cfg.refused_rate:
            # Each accepted action about as likely as any other, whatever its number of
            # rungs; those only some cases accept twice as likely (retry and
            # accept_partial fit nearly every case: they would crowd the others out).
            kinds = sorted({a for a, _ in options}, key=DECISIONS.index)
            weights = [1 if k in ("retry", "accept_partial") else 2 for k in kinds]
            if RETRY_THEN_CANCEL in kinds:
                # As likely as all the others together: a case a person can send forward
                # and its customer can still cancel is rare (a step before the pivot
                # whose outcome is unknown), and the only one where a compensation can
                # overtake a person's retry.
                i = kinds.index(RETRY_THEN_CANCEL)
                weights[i] = sum(weights) - weights[i]
            kind = rng.choices(kinds, weights)[0]
            action, rung = rng.choice([o for o in options if o[0] == kind])
        else:
            action, rung = rng.choice(MANUAL_ACTIONS), rng.randrange(3)
        then_cancel = action == RETRY_THEN_CANCEL
        if then_cancel:
            action = ManualAction.RETRY.value
        target = (saga_id, action) if action != "use_rung" else (saga_id, action, str(rung))
        return Action("operator", target), then_cancel

    async def _pick_fault(self, ready: list[InFlight], pending: list[str]) -> Action | None:
        rng, cfg = self.rng, self.cfg
        replies = [m for m in ready if m.kind is MessageKind.REPLY]
        others = [m for m in ready if m.kind is not MessageKind.REPLY]
        kinds = ["partition"]
        if ready:
            kinds += ["duplicate", "delay", "crash_before_commit", "crash_after_commit"]
            kinds += ["timeout"]
        kinds += ["lost_reply"] if replies else []
        kinds += ["drop"] if others else []
        kinds += ["ack_lost", "publish_lost"] if pending else []
        kinds += ["stale_timer", "late_timer"] if self.w.timers.fenced else []
        kind = rng.choice(kinds)
        if kind == "late_timer":
            late = await self.w.timers.superseded()
            return Action(kind, rng.choice(late[-3:])) if late else None
        if kind == "stale_timer":
            # Mostly one of the last few: a timer of a saga still at that step, where
            # only the finer checks of its fence stand in the way (a saga long gone
            # from the step is stale on every count).
            timers = await self.w.timers.fired()
            if not timers:
                return None
            recent = timers[-3:] if rng.random() < 0.75 else timers
            return Action(kind, rng.choice(recent))
        if kind == "partition":
            # Cut off where a message is about to go: that is where it hurts.
            pool = [m.endpoint for m in ready] or sorted(self.w.network.handlers)
            endpoint = rng.choice(pool)
            span = cfg.long_partition if rng.random() < cfg.long_partition_rate else cfg.partition
            return Action(kind, (endpoint,), round(rng.uniform(*span), 3))
        if kind in ("ack_lost", "publish_lost"):
            return Action(kind, (rng.choice(pending),))
        if kind == "timeout":
            return Action(kind)
        if kind == "crash_before_commit" and rng.random() < 0.25:
            return Action(kind, (self.timer_point,))  # crash while firing timers
        victims = replies if kind == "lost_reply" else others if kind == "drop" else ready
        target = (rng.choice(victims).address,)
        if kind == "delay":
            return Action(kind, target, round(rng.uniform(*cfg.delay), 3))
        return Action(kind, target)

    async def _fair_phase(self) -> bool:
        """Oldest message first, relays next, timers last, until nothing is left to do."""
        net, w = self.w.network, self.w
        for _ in range(self.cfg.fair_steps):
            self.steps += 1
            ready = net.deliverable()
            if ready:
                await self.apply(Action("deliver", (ready[0].address,)))
                continue
            if not self.dirty:
                self.dirty = {
                    name for name, r in w.relays.items() if await r.store.outbox_pending()
                }
            if self.dirty:
                await self.apply(Action("relay", (min(self.dirty),)))
                continue
            release = net.next_release()
            # Once every saga ended, only what still waits counts (a sweeper's next
            # expiry); saga timers and jobs that merely run every few seconds do not.
            due = (
                await w.timers.due_after_end()
                if await w.all_terminal()
                else await self._next_timer()
            )
            times = [t for t in (release, due) if t is not None]
            if not times:
                # Quiet. A person may still decide on a saga in the manual queue (not in
                # a replay: its schedule holds the decisions); one sent back to running
                # or compensating must then end terminal again.
                if (
                    self.replaying
                    or self.decisions >= self.cfg.max_decisions
                    or self.rng.random() >= self.cfg.fair_decision_rate
                ):
                    return True
                if not await self._operate():
                    return True
                continue
            await self.apply(Action("tick", (), min(times) - EPOCH))
        return False

    async def _next_timer(self) -> float | None:
        return await self.w.timers.next_due()

    # -- one action -------------------------------------------------------------------------
    async def apply(self, action: Action) -> Action | None:
        """Apply ``action`` if it still applies (a replay may have diverged); record it.

        Returns the action as recorded (a tick that fired while messages were waiting is
        recorded as a ``timeout``), or None if it no longer applied.
        """
        net, w, kind = self.w.network, self.w, action.kind
        timers_crash = kind == "crash_before_commit" and action.target == (self.timer_point,)
        if timers_crash:
            pass  # below, with the ticks
        elif kind in ("deliver", "duplicate", "crash_before_commit", "crash_after_commit"):
            items = net.find(action.target)
            if not items:
                return None
            if len(items) > 1 or items[0] is not min(
                (m for m in net.deliverable() if m.endpoint == items[0].endpoint),
                key=lambda m: m.seq,
            ):
                self.counts["reorder"] += 1
            endpoint = items[0].endpoint
            if kind == "duplicate":
                copy = net.add(endpoint, items[0].message_id, items[0].kind, items[0].body)
                copy.deliveries = items[0].deliveries
            if kind == "crash_before_commit":
                w.hook.armed = endpoint
            try:
                await net.deliver(items, keep=kind == "crash_after_commit")
            except Exception as exc:  # a consumer must settle everything itself
                self.errors.append(f"engine_error: consumer {endpoint} raised {exc!r}")
            finally:
                w.hook.armed = None
            self.dirty.add(self.store_of[endpoint])
        elif kind in ("drop", "lost_reply", "delay"):
            items = net.find(action.target)
            if not items:
                return None
            if kind == "delay":
                items[0].not_before = w.clock.now + (action.value or 0.0)
            else:
                net.drop(items[0])
        elif kind == "partition":
            if not action.target or action.target[0] not in net.handlers:
                return None
            net.partitions[action.target[0]] = w.clock.now + (action.value or 0.0)
        elif kind in ("relay", "ack_lost", "publish_lost"):
            relay = w.relays.get(action.target[0]) if action.target else None
            if relay is None:
                return None
            if kind != "relay":
                net.publish_fault = kind
            try:
                published = await relay.relay_once()
            except Exception as exc:
                self.errors.append(f"engine_error: relay {relay.store.name} raised {exc!r}")
                published = 0
            net.publish_fault = None
            if kind == "relay" and published < relay.batch_size:
                self.dirty.discard(relay.store.name)
            else:
                self.dirty.add(relay.store.name)
        elif kind == "cancel":
            if not action.target:
                return None
            try:
                wrote = await w.cancel(action.target[0], "simulated: the customer cancelled")
            except SagaNotFound:
                return None
            except Exception as exc:
                self.errors.append(f"engine_error: cancel raised {exc!r}")
                wrote = w.timers.stores[0]
            self.dirty.add(wrote)
            self.counts["cancel"] += 1
        elif kind == "operator":
            if len(action.target) < 2:
                return None
            saga_id, what = action.target[0], action.target[1]
            rung = int(action.target[2]) if len(action.target) > 2 else None
            self.decisions += 1
            try:
                wrote = await w.resolve(saga_id, what, rung, "simulated: a person decided")
            except SagaNotFound:
                return None
            except ManualActionRefused:
                self.counts["operator_refused"] += 1  # a person's mistake changes nothing
            except Exception as exc:
                self.errors.append(f"engine_error: {what} on {saga_id} raised {exc!r}")
            else:
                self.dirty.add(wrote)
                self.decided = wrote
                self.counts[f"operator_{what}"] += 1
        elif kind in ("stale_timer", "late_timer"):
            fire = w.timers.fire_again if kind == "stale_timer" else w.timers.fire_late
            try:
                again = await fire(action.target)
            except Exception as exc:
                self.errors.append(f"engine_error: a {kind} raised {exc!r}")
                again = True
            if not again:
                return None
            self.dirty.update(w.timers.stores)
        elif kind not in ("tick", "timeout"):
            raise ValueError(f"unknown schedule action {kind!r}")
        if kind in ("tick", "timeout") or timers_crash:
            # Timers that fire while a message could still be delivered or relayed hide
            # its success: that is a fault, whatever the schedule called it.
            kind = "timeout" if self.dirty or net.deliverable() else "tick"
            due = await self._next_timer()
            release = net.next_release()
            nxt = min((t for t in (due, release) if t is not None), default=None)
            if nxt is None:
                return None
            w.clock.advance_to(nxt)
            fired, crashes = 0, w.hook.crashes
            if due is not None and due <= w.clock.now:
                if timers_crash:
                    w.hook.armed = self.timer_point
                try:
                    fired = await w.timers.fire()
                except InjectedCrash:
                    pass  # rolled back: the timers are still due
                except Exception as exc:
                    self.errors.append(f"engine_error: timers raised {exc!r}")
                finally:
                    w.hook.armed = None
            if fired:
                self.dirty.update(w.timers.stores)
            target: tuple[str, ...] = ()
            if w.hook.crashes > crashes:
                kind, target = "crash_before_commit", (self.timer_point,)
            action = Action(kind, target, round(w.clock.elapsed, 6))
        w.clock.advance_to(w.clock.now + STEP_COST)
        self.schedule.append(action)
        if action.fault:
            self.counts[kind] += 1
        for problem in await w.watch():
            if problem not in self.seen:
                self.seen.add(problem)
                name, _, text = problem.partition(": ")
                self.errors.append(f"{name}: at step {len(self.schedule)}: {text}")
        return action


async def simulate(
    factory: WorldFactory,
    seed: int,
    *,
    config: SimConfig | None = None,
    schedule: Sequence[Action] | None = None,
) -> RunResult:
    """Run one seed (or replay ``schedule`` on the seed's world) and check it."""
    world = await factory(seed)
    try:
        return await Scheduler(world, seed, config).run(schedule)
    finally:
        await world.close()


async def replay(
    factory: WorldFactory,
    seed: int,
    schedule: Sequence[Action],
    *,
    config: SimConfig | None = None,
) -> RunResult:
    """Replay ``schedule`` on the world of ``seed``, then complete fairly; check it."""
    return await simulate(factory, seed, config=config, schedule=schedule)
