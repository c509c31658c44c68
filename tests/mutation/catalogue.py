"""The catalogue of planted bugs the proofs must catch (see ``run.py``).

Each :class:`Mutant` is one realistic slip: an exact snippet of the engine or of the
reference checkout and what a developer might have written instead. The snippet must
occur exactly once in its file, so the catalogue breaks loudly (the runner refuses the
entry) when the code it plants into changes, instead of silently planting nothing.

``covers`` names what the mutant attacks: a row of the table of planted bugs the proofs
once missed (``table:...``, listed in :data:`TABLE_ROWS`), or a guard of the state
machine, the participant runtime or the relay (``guard:...``).

``known_hole`` marks a mutant no proof kills yet, with the proof that is missing; the
runner fails when an unmarked mutant survives and when a marked one is killed (the mark
is then stale and must go).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TABLE_ROWS: dict[str, str] = {
    "table:forward-order": "compensations run in forward order instead of reverse",
    "table:unknown-rung": "a compensation rung whose outcome stays unknown moves down the "
    "ladder instead of going to a person (the failed-retry and the timed-out paths)",
    "table:late-step-timer": "a step timer that fires after the step succeeded still acts",
    "table:fence-floor": "the fence-floor check dropped (a reply from before a person "
    "resumed the step is accepted)",
    "table:action-attempt": "the attempt check on action replies dropped",
    "table:reservation-race": "the reservation as read-then-write instead of one "
    "conditional UPDATE",
    "table:completed-early": "COMPLETED shown as soon as payment is captured",
    "table:pivot-ignored": "the pivot ignored (a failure after it compensates)",
    "table:inbox-dedup": "inbox dedup skipped",
    "table:recorded-answer": "the participant's recorded answer not read",
}
"""The planted bugs of the issue that asked for this suite: every row needs a mutant."""

MIN_PER_ROW: dict[str, int] = {"table:unknown-rung": 2}
"""Rows whose bug lives on more than one code path, each path with its own mutant."""


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``old`` (exactly once in ``path``) with ``new``."""

    name: str
    path: str  # relative to the repository: src/sagakit/... or examples/checkout/...
    old: str
    new: str
    bug: str  # one line: what the slip does
    covers: str  # a TABLE_ROWS key, or "guard:<where>"
    known_hole: str | None = None  # the proof that is missing, while none kills it


MACHINE = "src/sagakit/core/machine.py"
DEFINITION = "src/sagakit/core/definition.py"
PARTICIPANT = "src/sagakit/runtime/participant.py"
RELAY = "src/sagakit/runtime/relay.py"
INVENTORY = "examples/checkout/inventory.py"
SAGAS = "examples/checkout/sagas.py"

MUTANTS: tuple[Mutant, ...] = (
    # -- the table of the issue ------------------------------------------------------
    Mutant(
        "comp_forward_order",
        MACHINE,
        old="        for k in range(start, -1, -1):\n",
        new="        for k in range(len(self.inst.steps)):\n",
        bug="compensations run in step order (first step first) instead of in reverse",
        covers="table:forward-order",
    ),
    Mutant(
        "rung_unknown_after_retries_moves_down",
        MACHINE,
        old='        if outcome.retryable:\n            # Out of attempts on "try again"',
        new="        if outcome.retryable and ts.rung + 1 >= len(step.ladder):\n"
        '            # Out of attempts on "try again"',
        bug="a rung that failed retryably on every attempt (outcome unknown) moves down "
        "the ladder; only the last rung goes to a person",
        covers="table:unknown-rung",
    ),
    Mutant(
        "rung_timed_out_moves_down",
        MACHINE,
        old="        t.inst.steps[index].status = StepStatus.COMPENSATION_FAILED\n",
        new="        if rung + 1 < len(step.ladder):\n"
        '            self._next_rung(t, index, f"timed out {attempt} times")\n'
        "            return t.decision()\n"
        "        t.inst.steps[index].status = StepStatus.COMPENSATION_FAILED\n",
        bug="a rung that timed out on every attempt (outcome unknown) moves down the "
        "ladder; only the last rung goes to a person",
        covers="table:unknown-rung",
    ),
    Mutant(
        "step_timer_acts_after_success",
        MACHINE,
        old="                or st.status is not expect\n"
        "                or st.attempt != attempt\n",
        new="                or st.attempt != attempt\n",
        bug="an action timer acts whatever the step's status (succeeded, querying, "
        "waiting for its retry)",
        covers="table:late-step-timer",
    ),
    Mutant(
        "fence_floor_dropped",
        MACHINE,
        old="        if reply.fence < st.fence_floor:\n"
        '            why = "answers a try sent before a person resumed the step"\n'
        "            return self._stale(t, key.step, why, reply, outcome)\n",
        new="",
        bug="a reply to a try sent before a person resumed the step is accepted",
        covers="table:fence-floor",
    ),
    Mutant(
        "timer_fence_floor_dropped",
        MACHINE,
        old="        if floor < st.fence_floor:\n"
        '            return self._stale_timer(t, timer, "set before a person decided on the '
        'step")\n',
        new="",
        bug="a step timer set before a person's decision (a second worker still holds it) "
        "acts on the try the decision started",
        covers="guard:machine.on_timer fence floor",
    ),
    Mutant(
        "deadline_fence_ignored",
        MACHINE,
        old="            if set_for is not None and set_for != inst.deadline_at:\n",
        new="            if False:\n",
        bug="a deadline timer read before a person's decision ends the new deadline's "
        "window at once",
        covers="guard:machine.on_timer deadline replaced",
    ),
    Mutant(
        "action_attempt_check_dropped",
        MACHINE,
        old="and (reply.attempt != st.attempt or st.status is not StepStatus.RUNNING)",
        new="and st.status is not StepStatus.RUNNING",
        bug="a failure reply of an earlier attempt counts for the attempt in flight",
        covers="table:action-attempt",
    ),
    Mutant(
        "reservation_read_then_write",
        INVENTORY,
        old='    changed = await tx.execute(\n        "UPDATE stock SET available = available - ?, '
        'reserved = reserved + ? "\n        "WHERE sku = ? AND available >= ?",\n'
        "        (qty, qty, sku, qty),\n    )\n    if changed == 0:\n"
        '        if await tx.fetchone("SELECT 1 FROM stock WHERE sku = ?", (sku,)) is None:\n'
        '            raise StepFailed(f"unknown sku {sku}")\n'
        "        raise StepFailed(OUT_OF_STOCK)\n",
        new='    row = await tx.fetchone("SELECT available, reserved FROM stock WHERE sku = ?", '
        "(sku,))\n"
        "    if row is None:\n"
        '        raise StepFailed(f"unknown sku {sku}")\n'
        "    if row[0] < qty:\n"
        "        raise StepFailed(OUT_OF_STOCK)\n"
        "    await tx.execute(\n"
        '        "UPDATE stock SET available = ?, reserved = ? WHERE sku = ?",\n'
        "        (row[0] - qty, row[1] + qty, sku),\n"
        "    )\n",
        bug="the reservation reads the stock, checks it in Python and writes the computed "
        "numbers back: two concurrent orders both get the last item",
        covers="table:reservation-race",
    ),
    Mutant(
        "settle_ignores_status",
        INVENTORY,
        old='        "UPDATE reservations SET status = ?, updated_at = ? "\n'
        "        \"WHERE order_id = ? AND status = 'RESERVED'\",\n",
        new='        "UPDATE reservations SET status = ?, updated_at = ? "\n'
        '        "WHERE order_id = ?",\n',
        bug="a commit or release settles the reservation it read as RESERVED even if the "
        "sweeper expired it since: its units go back to stock and are shipped too",
        covers="guard:inventory.settle only what is still RESERVED",
    ),
    Mutant(
        "sweeper_ignores_status",
        INVENTORY,
        old="                \"WHERE order_id = ? AND status = 'RESERVED'\",\n"
        "                (now, order_id),\n",
        new='                "WHERE order_id = ?",\n                (now, order_id),\n',
        bug="the sweeper expires what it read as due even if it was committed or released "
        "since: the units come back to stock a second time",
        covers="guard:inventory.sweeper expires only what is still RESERVED",
    ),
    Mutant(
        "completed_at_capture",
        SAGAS,
        old='                command("inventory", "CommitReservation", _ref),\n',
        new='                command("inventory", "CommitReservation", _ref),\n'
        '                status="COMPLETED",\n',
        bug="the customer sees COMPLETED as soon as the payment is captured, before the "
        "goods are committed and the order completed",
        covers="table:completed-early",
    ),
    Mutant(
        "pivot_ignored",
        DEFINITION,
        old="        return self.pivot_index is not None and index > self.pivot_index\n",
        new="        return self.pivot_index is None and index > self.pivot_index\n",
        bug="past_pivot is never true: a definite failure after the pivot compensates "
        "the steps before it although the money is taken",
        covers="table:pivot-ignored",
    ),
    Mutant(
        "inbox_dedup_skipped",
        PARTICIPANT,
        old="                    if env.message_id not in fresh:\n"
        "                        self.duplicates.inc()\n"
        "                        continue\n",
        new="                    if env.message_id not in fresh:\n"
        "                        self.duplicates.inc()\n",
        bug="a message the inbox already holds is counted as a duplicate but handled again",
        covers="table:inbox-dedup",
    ),
    Mutant(
        "recorded_answer_not_read",
        PARTICIPANT,
        old='            if recorded.outcome.get("ok") or not generation or '
        "recorded.key == this_generation:\n",
        new="            if recorded.key == this_generation:\n",
        bug="a repeated command does not get the answer recorded the first time: the "
        "handler runs again",
        covers="table:recorded-answer",
    ),
    # -- the state machine's other guards --------------------------------------------
    Mutant(
        "comp_attempt_check_dropped",
        MACHINE,
        old="and (reply.attempt != st.rung_attempt or st.status is not StepStatus.COMPENSATING)",
        new="and st.status is not StepStatus.COMPENSATING",
        bug="a failure reply of an earlier compensation attempt counts for the attempt in flight",
        covers="guard:machine.on_reply compensation attempt",
    ),
    Mutant(
        "comp_rung_check_dropped",
        MACHINE,
        old="            and st.rung == key.rung\n",
        new="",
        bug="a reply of an earlier rung of the ladder counts for the rung in flight",
        covers="guard:machine.on_reply compensation rung",
    ),
    Mutant(
        "duplicate_action_failure_reschedules",
        MACHINE,
        old="and (reply.attempt != st.attempt or st.status is not StepStatus.RUNNING)",
        new="and reply.attempt != st.attempt",
        bug="a duplicate of the failure that put the step in WAITING_RETRY schedules the "
        "retry again",
        covers="guard:machine.on_reply action status RUNNING",
    ),
    Mutant(
        "duplicate_comp_failure_reschedules",
        MACHINE,
        old="and (reply.attempt != st.rung_attempt or st.status is not StepStatus.COMPENSATING)",
        new="and reply.attempt != st.rung_attempt",
        bug="a duplicate of the failure that put a compensation in COMPENSATION_WAITING "
        "counts again (reschedules, or moves down the ladder)",
        covers="guard:machine.on_reply compensation status COMPENSATING",
    ),
    Mutant(
        "query_answer_attempt_dropped",
        MACHINE,
        old="                and reply.attempt == st.queries\n",
        new="",
        bug="the answer to an earlier status query counts for the query in flight",
        covers="guard:machine.on_reply query attempt",
    ),
    Mutant(
        "query_answer_while_retry_waiting",
        MACHINE,
        old="                and st.next_retry_at is None\n",
        new="",
        bug="a late status answer is taken while the next query waits for its retry timer",
        covers="guard:machine.on_reply query retry wait",
    ),
    Mutant(
        "comp_timer_status_dropped",
        MACHINE,
        old="            or st.status is not expect\n            or st.rung != rung\n",
        new="            or st.rung != rung\n",
        bug="a compensation timer acts whatever the compensation's status (a timeout "
        "after its success, a retry timer while an attempt is in flight)",
        covers="guard:machine.on_timer comp status",
    ),
    Mutant(
        "comp_timer_rung_dropped",
        MACHINE,
        old="            or st.rung != rung\n            or st.rung_attempt != attempt\n",
        new="            or st.rung_attempt != attempt\n",
        bug="a timer of an earlier rung acts on the rung in flight",
        covers="guard:machine.on_timer comp rung",
    ),
    Mutant(
        "query_timer_attempt_dropped",
        MACHINE,
        old="                or st.queries != attempt\n",
        new="",
        bug="a timer of an earlier status query acts on the query in flight",
        covers="guard:machine.on_timer query attempt",
    ),
    Mutant(
        "deadline_at_pivot_compensates",
        MACHINE,
        old="                and inst.cursor >= p\n",
        new="                and inst.cursor > p\n",
        bug="a deadline that passes while the pivot is in flight compensates instead of "
        "asking a person (the capture may have happened)",
        covers="guard:machine.on_timer deadline at/after the pivot",
    ),
    Mutant(
        "deadline_restarts_compensation",
        MACHINE,
        old="            if inst.state is SagaState.COMPENSATING:\n"
        "                return t.decision()  # compensation keeps going; it is never skipped\n",
        new="",
        bug="a deadline that passes during a compensation starts the compensation over",
        covers="guard:machine.on_timer deadline while compensating",
    ),
    Mutant(
        "timer_on_terminal_saga_acts",
        MACHINE,
        old="        if inst.terminal:\n"
        '            return self._stale_timer(t, timer, f"saga is already {inst.state.value}")\n',
        new="",
        bug="a late timer (a deadline) acts on a saga that already ended",
        covers="guard:machine.on_timer terminal",
    ),
    Mutant(
        "cancel_after_pivot_accepted",
        MACHINE,
        old="        if t.pivot_passed():\n"
        '            why = "the saga is past its point of no return"\n'
        '            return t.unchanged("cancel.refused", None, reason=reason, why=why)\n',
        new="",
        bug="a cancel after the pivot succeeded is accepted (compensates the steps the "
        "money paid for)",
        covers="guard:machine.on_cancel after the pivot",
    ),
    Mutant(
        "cancel_pivot_in_flight_compensates",
        MACHINE,
        old="        if p is not None and inst.cursor == p:\n",
        new="        if p is not None and inst.cursor > p:\n",
        bug="a cancel while the pivot is in flight compensates at once instead of "
        "waiting for the pivot's outcome",
        covers="guard:machine.on_cancel pivot in flight",
    ),
    Mutant(
        "unknown_after_pivot_compensates",
        MACHINE,
        old="        elif self.d.pivot_index is not None and index >= self.d.pivot_index:\n",
        new="        elif self.d.pivot_index is not None and index == self.d.pivot_index:\n",
        bug="a step after the pivot whose outcome stays unknown compensates instead of "
        "going to a person",
        covers="guard:machine.outcome_unknown at/after the pivot",
    ),
    Mutant(
        "not_found_at_pivot_compensates",
        MACHINE,
        old="            if d.pivot_index is None or index < d.pivot_index:\n",
        new="            if d.pivot_index is None or index <= d.pivot_index:\n",
        bug="a status query saying the pivot never happened compensates (no tombstone "
        "for the pivot's key: a late capture still takes the money)",
        covers="guard:machine.status answer not_found at the pivot",
    ),
    Mutant(
        "exhausted_retryable_failure_definite",
        MACHINE,
        old="        if outcome.retryable and (step.status_query is not None or not "
        "d.past_pivot(index)):\n",
        new="        if outcome.retryable and step.status_query is not None:\n",
        bug="a step that failed retryably on every attempt is taken as definitely failed "
        "(not compensated itself, although a try may have had an effect)",
        covers="guard:machine.action outcome unknown after retryable failures",
    ),
    # -- the participant runtime -----------------------------------------------------
    Mutant(
        "tombstone_not_written",
        PARTICIPANT,
        old="                await records.put(\n"
        "                    env.compensates,\n"
        "                    failure(REFUSED_AFTER_COMPENSATION).to_payload(),\n"
        "                    now,\n"
        "                    tombstone=True,\n"
        "                )\n",
        new="                pass  # the handler undoes whatever it finds\n",
        bug="a compensation that overtakes its action leaves no tombstone: the late "
        "action is applied after its undo",
        covers="guard:participant.tombstone",
    ),
    Mutant(
        "tombstone_ignored_on_manual_retry",
        PARTICIPANT,
        old="            if recorded.tombstone:\n"
        "                return failure(REFUSED_AFTER_COMPENSATION)\n",
        new="",
        bug="a tombstone does not refuse a person's retry of the action (the action runs "
        "after its undo)",
        covers="guard:participant.tombstone refusal",
    ),
    Mutant(
        "comp_handler_for_failed_action",
        PARTICIPANT,
        old='            elif not action.tombstone and not action.outcome.get("ok"):\n',
        new='            elif action.tombstone and not action.outcome.get("ok"):\n',
        bug="the compensation handler runs for an action that failed for good (nothing "
        "to undo, but the handler undoes something)",
        covers="guard:participant.definite failure has nothing to undo",
    ),
    Mutant(
        "retryable_failure_recorded",
        PARTICIPANT,
        old="        # A retryable failure is not an answer: the next attempt must run the "
        "handler again.\n"
        "        if result.ok or not result.retryable:\n",
        new="        if True:\n",
        bug="a retryable failure is recorded as the command's answer: every retry gets "
        "it back without running the handler",
        covers="guard:participant.retryable failure not recorded",
    ),
    # -- the relay -------------------------------------------------------------------
    Mutant(
        "relay_marks_failed_publish",
        RELAY,
        old='            log.warning("publish of %d messages failed: %s", len(rows), exc)\n'
        "            return None\n",
        new='            log.warning("publish of %d messages failed: %s", len(rows), exc)\n'
        "            return []\n",
        bug="rows are marked published although the publish raised (the messages are lost)",
        covers="guard:relay.mark only acknowledged rows",
    ),
    Mutant(
        "relay_fanout_first_subscriber",
        RELAY,
        old="                envelopes.extend(env.with_changes(destination=e) for e in "
        "subscribers)\n",
        new="                envelopes.extend(env.with_changes(destination=e) for e in "
        "subscribers[:1])\n",
        bug="an event is sent to its first subscriber only, not fanned out to every one",
        covers="guard:relay.fan-out",
    ),
)


def target(root: Path, mutant: Mutant) -> Path:
    """The file ``mutant`` plants into, under ``root`` (the repository)."""
    return root / mutant.path


def entry_problems(root: Path, mutant: Mutant) -> list[str]:
    """What is wrong with one entry against the code under ``root`` (empty: nothing).

    Its path lies in the engine or the checkout and exists, its ``old`` occurs exactly
    once there and differs from ``new``, the patched file still compiles, and it covers
    a table row or a guard.
    """
    m = mutant
    if not (m.path.startswith("src/sagakit/") or m.path.startswith("examples/checkout/")):
        return [f"{m.name}: path {m.path!r} is outside src/sagakit and examples/checkout"]
    path = target(root, m)
    if not path.is_file():
        return [f"{m.name}: {m.path} does not exist"]
    text = path.read_text()
    count = text.count(m.old) if m.old else 0
    if count != 1:
        return [f"{m.name}: its snippet occurs {count} times in {m.path}, not once"]
    found: list[str] = []
    if m.old == m.new:
        found.append(f"{m.name}: new is the same as old")
    try:
        compile(text.replace(m.old, m.new), str(path), "exec")
    except SyntaxError as exc:
        found.append(f"{m.name}: the patched {m.path} does not compile: {exc}")
    if not (m.covers in TABLE_ROWS or m.covers.startswith("guard:")):
        found.append(f"{m.name}: covers {m.covers!r} is no table row and no guard")
    if not m.bug.strip() or (m.known_hole is not None and not m.known_hole.strip()):
        found.append(f"{m.name}: bug and known_hole must say something")
    return found


def problems(root: Path = ROOT, mutants: tuple[Mutant, ...] = MUTANTS) -> list[str]:
    """What is wrong with the catalogue against the code under ``root`` (empty: nothing):
    :func:`entry_problems` of every entry, duplicate names, and table rows without
    their mutants."""
    found: list[str] = []
    names = [m.name for m in mutants]
    found += [f"duplicate name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        found += entry_problems(root, m)
    for row in TABLE_ROWS:
        have = sum(1 for m in mutants if m.covers == row)
        need = MIN_PER_ROW.get(row, 1)
        if have < need:
            found.append(f"table row {row!r} has {have} mutants, needs {need}")
    return found
