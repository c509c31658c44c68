"""The exhaustive checker's model participants.

They behave like :class:`~sagakit.runtime.participant.Participant`: inbox dedup, one
outcome recorded per idempotency key, a retryable failure never recorded, tombstones
when a compensation overtakes its action, a definite failure run again only for a
person's retry, status queries answered from what was recorded. Each way a delivery can
go is one move of the exploration (see :mod:`sagakit.testing.checker`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from functools import partial

from sagakit.core.definition import SagaDefinition
from sagakit.core.envelope import Envelope, MessageKind, Outcome, failure, reply_to, success
from sagakit.testing.checker_world import (
    NOW,
    World,
    _generation,
    _latest,
    _records,
    _Violation,
)


class ParticipantModel:
    """The participants' side of the checker; a base of
    :class:`~sagakit.testing.checker.Checker`.

    ``reserve`` names the command type whose success takes one unit of the shared stock
    (and ``release`` the compensation that gives it back); ``envelopes`` maps every
    envelope's JSON (as the world holds it) back to the envelope.
    """

    d: SagaDefinition
    reserve: str | None
    release: str | None
    envelopes: dict[str, Envelope]

    def _register(self, env: Envelope) -> str:
        raw = env.to_json()
        self.envelopes.setdefault(raw, env)
        return raw

    def _participant_outcomes(
        self, w: World, env: Envelope, remember: bool = True
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        endpoint = env.destination or ""
        seen = (endpoint, env.message_id)
        if seen in w.inbox:
            yield "duplicate dropped by inbox", partial(lambda b: b, w)
            return
        if remember:
            w = w._replace(inbox=w.inbox | {seen})
        key = env.idempotency_key or ""
        records = _records(w)
        gen = _generation(env)
        if env.kind is MessageKind.QUERY:
            action = str(env.payload.get("action_key", ""))
            answer = self._answer(_latest(records, endpoint, action, gen))
            yield "status answered", partial(self._reply, w, env, answer)
            return
        recorded = _latest(records, endpoint, key, gen)
        record_key = key
        if recorded is not None:
            name, outcome_json, tomb = recorded
            if tomb:
                outcome = failure("refused: already compensated")
                yield "refused (tombstone)", partial(self._reply, w, env, outcome)
                return
            if json.loads(outcome_json).get("ok") or not gen or name == f"{key}#m{gen}":
                outcome = Outcome.from_payload(json.loads(outcome_json))
                yield "recorded answer", partial(self._reply, w, env, outcome)
                return
            # A definite failure, and a person asked to try again: the handler runs once
            # more and its answer is kept beside the old one; the retries in between are
            # recorded as superseded (as Participant does), so an older retry's command
            # still in flight gets that answer instead of running the handler again.
            record_key = f"{key}#m{gen}"
            start = 0 if name == key else int(name[len(key) + 2 :])
            superseded = json.dumps(failure("superseded").to_payload(), sort_keys=True)
            rows = {(f"{endpoint}:{key}#m{n}", superseded, False) for n in range(start + 1, gen)}
            w = w._replace(records=w.records | rows)
        if env.compensates is not None:
            yield from self._compensations(w, env, endpoint, record_key, records, gen)
            return
        if env.type == self.reserve and w.stock <= 0:
            yield (
                "out of stock",
                partial(self._record, w, env, endpoint, record_key, failure("out of stock")),
            )
            return
        yield "succeeds", partial(self._apply, w, env, endpoint, key, record_key)
        if w.failures > 0:
            spent = w._replace(failures=w.failures - 1)
            yield "fails", partial(self._record, spent, env, endpoint, record_key, failure("no"))
            again = failure("try again", retryable=True)
            yield "fails (retryable)", partial(self._reply, spent, env, again)

    def _apply(self, w: World, env: Envelope, endpoint: str, key: str, record_key: str) -> World:
        effects = dict(w.effects)
        if key in effects:
            raise _Violation(f"effect {key} applied twice ({effects[key]} before)")
        nw = w._replace(effects=w.effects | {(key, "applied")})
        if env.type == self.reserve:
            nw = nw._replace(stock=nw.stock - 1)
            if nw.stock < 0:
                raise _Violation("stock went negative")
        return self._record(nw, env, endpoint, record_key, success({"ref": key}))

    def _compensations(
        self,
        w: World,
        env: Envelope,
        endpoint: str,
        record_key: str,
        records: Mapping[str, tuple[str, bool]],
        gen: int,
    ) -> Iterator[tuple[str, Callable[[], World]]]:
        action = env.compensates or ""
        rec = _latest(records, endpoint, action, gen)
        if rec is not None and not rec[2] and not json.loads(rec[1]).get("ok"):
            yield (
                "nothing to undo",
                partial(self._record, w, env, endpoint, record_key, success()),
            )
            return
        base = w
        if rec is None:
            tomb = (f"{endpoint}:{action}", json.dumps(failure("tombstone").to_payload()), True)
            base = w._replace(records=w.records | {tomb})
        yield (
            "undoes",
            partial(self._record, self._undo(base, env), env, endpoint, record_key, success()),
        )
        if base.failures > 0:
            spent = base._replace(failures=base.failures - 1)
            yield (
                "rung fails",
                partial(self._record, spent, env, endpoint, record_key, failure("refused")),
            )
            again = failure("try again", retryable=True)
            yield "rung fails (retryable)", partial(self._reply, spent, env, again)
            # A provider that undid the effect and then timed out towards the participant:
            # "try again", although the undo went through.
            yield (
                "rung undoes, then fails (retryable)",
                partial(self._reply, self._undo(spent, env), env, again),
            )

    def _undo(self, w: World, env: Envelope) -> World:
        action = env.compensates or ""
        if (action, "applied") not in w.effects:
            return w
        nw = w._replace(effects=(w.effects - {(action, "applied")}) | {(action, "undone")})
        if env.type == self.release:
            nw = nw._replace(stock=nw.stock + 1)
        return nw

    @staticmethod
    def _answer(rec: tuple[str, str, bool] | None) -> Outcome:
        if rec is None or rec[2]:
            return success({"state": "not_found"})
        recorded = json.loads(rec[1])
        if recorded.get("ok"):
            return success({"state": "done", "result": recorded.get("result", {})})
        return success({"state": "failed", "reason": recorded.get("reason", "")})

    def _record(
        self, w: World, env: Envelope, endpoint: str, record_key: str, outcome: Outcome
    ) -> World:
        row = (f"{endpoint}:{record_key}", json.dumps(outcome.to_payload(), sort_keys=True), False)
        return self._reply(w._replace(records=w.records | {row}), env, outcome)

    def _reply(self, w: World, env: Envelope, outcome: Outcome) -> World:
        reply = reply_to(env, outcome, source=env.destination or "", now=NOW)
        return w._replace(net=w.net | {self._register(reply)})
