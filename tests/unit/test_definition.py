"""Saga definitions: validation, retry policies and compensation ladders."""

from __future__ import annotations

import math

import pytest

from sagakit.core.definition import (
    CommandAction,
    LocalAction,
    RetryPolicy,
    Rung,
    SagaDefinition,
    SagaView,
    Step,
    StepKind,
    command,
    local,
)
from sagakit.errors import DefinitionError


def act(name: str = "Do", endpoint: str = "svc") -> CommandAction:
    return command(endpoint, name)


def undo(name: str = "Undo", endpoint: str = "svc") -> CommandAction:
    return command(endpoint, name)


def noop_local(ctx: object) -> None:
    return None


def saga(*steps: Step, **kw: object) -> SagaDefinition:
    return SagaDefinition("checkout", list(steps), **kw)  # type: ignore[arg-type]


# --- names and versions -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "1pay", "_pay", "pay:card", "pay card", "pay/x", "é", "a" * 101, None, 42],
)
def test_bad_step_name_is_rejected(name: object) -> None:
    with pytest.raises(DefinitionError, match="step name"):
        Step(name, act())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["", "1checkout", "check out", "a:b", "a" * 101, None, 3],
)
def test_bad_saga_name_is_rejected(name: object) -> None:
    with pytest.raises(DefinitionError, match="saga name"):
        SagaDefinition(name, [Step("a", act())])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "Pay", "pay_card", "pay.card", "pay-card", "a" * 100, "A9"])
def test_good_names_are_accepted(name: str) -> None:
    d = SagaDefinition(name, [Step(name, act())])
    assert d.name == name
    assert d.steps[0].name == name


@pytest.mark.parametrize("factory", ["step", "saga"])
def test_name_with_trailing_newline_is_rejected(factory: str) -> None:
    with pytest.raises(DefinitionError):
        if factory == "step":
            Step("pay\n", act())
        else:
            SagaDefinition("checkout\n", [Step("a", act())])


@pytest.mark.parametrize("version", [0, -1, 1.5, "1", True, None])
def test_bad_version_is_rejected(version: object) -> None:
    with pytest.raises(DefinitionError, match="version"):
        saga(Step("a", act()), version=version)


def test_version_and_key() -> None:
    d = saga(Step("a", act()), version=7)
    assert d.version == 7
    assert d.key == "checkout@7"
    assert "checkout@7" in repr(d)


@pytest.mark.parametrize("deadline", [0, -5, float("nan")])
def test_bad_deadline_is_rejected(deadline: float) -> None:
    with pytest.raises(DefinitionError, match="deadline"):
        saga(Step("a", act()), deadline=deadline)


def test_empty_saga_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="no steps"):
        SagaDefinition("checkout", [])


@pytest.mark.parametrize("item", [act(), "a", None, 42])
def test_non_step_items_are_rejected(item: object) -> None:
    with pytest.raises(DefinitionError, match="is not a Step"):
        SagaDefinition("checkout", [Step("a", act()), item])  # type: ignore[list-item]


def test_duplicate_step_names_are_rejected_and_named() -> None:
    with pytest.raises(DefinitionError, match="duplicate step name 'pay'"):
        saga(Step("pay", act()), Step("ship", act()), Step("pay", act()))


# --- kinds and the pivot ----------------------------------------------------------------


def test_more_than_one_pivot_is_rejected_and_names_them() -> None:
    with pytest.raises(DefinitionError, match="more than one pivot") as exc:
        saga(Step("a", act(), kind="pivot"), Step("b", act(), kind=StepKind.PIVOT))
    assert "'a'" in str(exc.value)
    assert "'b'" in str(exc.value)


def test_compensation_on_pivot_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="pivot step 'charge' cannot have a compensation"):
        saga(Step("reserve", act(), undo()), Step("charge", act(), undo(), kind="pivot"))


def test_retriable_before_pivot_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="retriable step 'notify' must come after the pivot"):
        saga(Step("notify", act(), kind="retriable"), Step("charge", act(), kind="pivot"))


def test_retriable_without_pivot_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="retriable step 'notify' must come after the pivot"):
        saga(Step("reserve", act()), Step("notify", act(), kind="retriable"))


def test_retriable_with_compensation_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="retriable step 'ship' cannot have a compensation"):
        saga(Step("charge", act(), kind="pivot"), Step("ship", act(), undo(), kind="retriable"))


def test_compensatable_after_pivot_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="step 'ship' comes after the pivot 'charge'"):
        saga(Step("charge", act(), kind="pivot"), Step("ship", act(), undo()))


def test_compensatable_without_ladder_after_pivot_is_rejected_too() -> None:
    with pytest.raises(DefinitionError, match=r"'ship'.*must be kind='retriable'"):
        saga(Step("charge", act(), kind="pivot"), Step("ship", act()))


@pytest.mark.parametrize(
    ("steps", "offender"),
    [
        (lambda: [Step("charge", act(), kind="pivot", optional=True)], "charge"),
        (
            lambda: [
                Step("charge", act(), kind="pivot"),
                Step("ship", act(), kind="retriable", optional=True),
            ],
            "ship",
        ),
    ],
)
def test_optional_on_non_compensatable_is_rejected(steps: object, offender: str) -> None:
    with pytest.raises(
        DefinitionError, match=f"only compensatable steps can be optional.*'{offender}'"
    ):
        saga(*steps())  # type: ignore[operator]


def test_optional_compensatable_step_is_accepted() -> None:
    d = saga(Step("coupon", act(), optional=True), Step("charge", act(), kind="pivot"))
    assert d.steps[0].optional
    assert not d.steps[1].optional


def test_bad_kind_is_rejected_and_named() -> None:
    with pytest.raises(DefinitionError, match="step 'pay': kind 'final'"):
        Step("pay", act(), kind="final")


def test_kinds_accept_strings_and_pivot_index() -> None:
    d = saga(
        Step("reserve", act(), undo()),
        Step("charge", act(), kind="pivot"),
        Step("ship", act(), kind="retriable"),
    )
    assert [s.kind for s in d.steps] == [
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
        StepKind.RETRIABLE,
    ]
    assert d.pivot_index == 1
    assert [d.past_pivot(i) for i in range(3)] == [False, False, True]


def test_no_pivot_means_nothing_is_past_it() -> None:
    d = saga(Step("a", act()), Step("b", act()))
    assert d.pivot_index is None
    assert not d.past_pivot(0)
    assert not d.past_pivot(1)


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_bad_timeout_is_rejected_and_named(timeout: float) -> None:
    with pytest.raises(DefinitionError, match="step 'pay': timeout must be > 0"):
        Step("pay", act(), timeout=timeout)


def test_timeout_is_a_float() -> None:
    s = Step("pay", act(), timeout=5)
    assert s.timeout == 5.0
    assert isinstance(s.timeout, float)


# --- actions ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [42, "svc.Do", None])
def test_bad_action_is_rejected_and_named(bad: object) -> None:
    with pytest.raises(DefinitionError, match="step 'pay' action"):
        Step("pay", bad)  # type: ignore[arg-type]


def test_bad_status_query_is_rejected_and_named() -> None:
    with pytest.raises(DefinitionError, match="step 'pay' status_query"):
        Step("pay", act(), status_query=42)  # type: ignore[arg-type]


def test_callable_action_becomes_local_action() -> None:
    s = Step("pay", noop_local, status_query=noop_local)
    assert isinstance(s.action, LocalAction)
    assert s.action.fn is noop_local
    assert s.action.label == "noop_local"
    assert isinstance(s.status_query, LocalAction)


def test_local_action_label() -> None:
    assert local(noop_local, "charge_card").label == "charge_card"
    assert local(noop_local).label == "noop_local"


def test_command_action_label_version_and_payload() -> None:
    a = command("payment", "AuthorizePayment", version=2)
    assert a.label == "payment.AuthorizePayment"
    assert a.version == 2
    view = SagaView("s1", "o1", {"amount": 10}, {})
    built = a.build(view)
    assert built == {"amount": 10}
    assert built is not view.data  # a copy


def test_command_payload_builder_sees_the_view() -> None:
    a = command(
        "payment", "Capture", lambda v: {"auth": v.results["pay"]["auth"], "k": v.business_key}
    )
    view = SagaView("s1", "o1", {}, {"pay": {"auth": "A1"}})
    assert a.build(view) == {"auth": "A1", "k": "o1"}


@pytest.mark.parametrize(
    ("comp", "match"),
    [
        ("svc.Undo", "is not an action"),
        (42, "is not an action"),
        ([], "compensation ladder is empty"),
        ((), "compensation ladder is empty"),
        ([undo(), 42], "compensation rung 1"),
        (["svc.Undo"], "compensation rung 0"),
    ],
)
def test_non_action_compensation_is_rejected_and_named(comp: object, match: str) -> None:
    with pytest.raises(DefinitionError, match=f"step 'pay'.*{match}"):
        Step("pay", act(), comp)  # type: ignore[arg-type]


def test_step_repr_names_step() -> None:
    assert repr(Step("pay", act("Charge", "payment"), kind="pivot")) == (
        "Step('pay', payment.Charge, kind=pivot)"
    )


# --- ladders ----------------------------------------------------------------------------


def test_retry_policy_timeouts_grow_to_the_cap() -> None:
    fixed = RetryPolicy()
    assert [fixed.timeout(2, a) for a in (1, 2, 5)] == [2, 2, 2]
    growing = RetryPolicy(timeout_multiplier=2, max_timeout=30)
    assert [growing.timeout(2, a) for a in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert RetryPolicy(timeout_multiplier=2).timeout(1, 11) == 1024  # no cap
    assert growing.timeout(40, 3) == 40  # a cap below the first timeout never shortens it
    assert RetryPolicy(timeout_multiplier=10, max_timeout=60).timeout(1, 10_000) == 60


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"timeout_multiplier": 0.5}, "timeout_multiplier"),
        ({"timeout_multiplier": float("nan")}, "timeout_multiplier"),
        ({"max_timeout": 0}, "max_timeout"),
        ({"max_timeout": float("inf")}, "max_timeout"),
    ],
)
def test_retry_policy_refuses_bad_timeout_growth(kw: dict[str, float], match: str) -> None:
    with pytest.raises(DefinitionError, match=match):
        RetryPolicy(**kw)  # type: ignore[arg-type]


def test_single_action_compensation_is_one_rung_with_step_policy() -> None:
    policy = RetryPolicy(max_attempts=5)
    s = Step("pay", act(), undo("Void"), retry=policy, timeout=7)
    assert len(s.ladder) == 1
    assert s.compensatable
    rung = s.ladder[0]
    assert rung.action == undo("Void")
    assert rung.retry is policy
    assert rung.timeout == 7.0
    assert rung.label == "svc.Void"


def test_ladder_from_list_of_actions_keeps_order_and_inherits_policy() -> None:
    policy = RetryPolicy(max_attempts=4)
    s = Step(
        "pay",
        act(),
        [undo("Void"), undo("Refund"), noop_local],
        retry=policy,
        timeout=3,
    )
    assert [r.label for r in s.ladder] == ["svc.Void", "svc.Refund", "noop_local"]
    assert all(r.retry is policy and r.timeout == 3.0 for r in s.ladder)
    assert isinstance(s.ladder[2].action, LocalAction)


def test_ladder_from_rungs_keeps_their_own_policy() -> None:
    fast = RetryPolicy(max_attempts=1)
    slow = RetryPolicy(max_attempts=9, initial_backoff=1)
    s = Step(
        "pay",
        act(),
        [Rung(undo("Void"), retry=fast, timeout=1), undo("Refund"), Rung(undo("Credit"), slow)],
        timeout=12,
    )
    assert [r.label for r in s.ladder] == ["svc.Void", "svc.Refund", "svc.Credit"]
    assert s.ladder[0].retry is fast and s.ladder[0].timeout == 1
    assert s.ladder[1].retry == RetryPolicy() and s.ladder[1].timeout == 12.0
    assert s.ladder[2].retry is slow and s.ladder[2].timeout == 30.0


def test_single_rung_compensation() -> None:
    rung = Rung(undo("Void"), timeout=2)
    s = Step("pay", act(), rung)
    assert s.ladder == (rung,)


def test_no_compensation_means_not_compensatable() -> None:
    s = Step("pay", act())
    assert s.ladder == ()
    assert not s.compensatable


def test_default_retry_policy() -> None:
    s = Step("pay", act())
    assert s.retry == RetryPolicy()
    assert s.retry.max_attempts == 3


# --- retry policy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"initial_backoff": -0.1}, "backoffs"),
        ({"max_backoff": -1}, "backoffs"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": -0.01}, "jitter"),
        ({"jitter": 1.01}, "jitter"),
        ({"jitter": float("nan")}, "jitter"),
    ],
)
def test_bad_retry_policy_is_rejected(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(DefinitionError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["initial_backoff", "max_backoff", "multiplier"])
def test_nan_retry_policy_values_are_rejected(field: str) -> None:
    with pytest.raises(DefinitionError):
        RetryPolicy(**{field: float("nan")})  # type: ignore[arg-type]


def test_backoff_grows_by_multiplier_without_jitter() -> None:
    p = RetryPolicy(initial_backoff=0.5, multiplier=3, max_backoff=100, jitter=0)
    assert [p.backoff(a, "s") for a in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 13.5]


def test_backoff_is_capped() -> None:
    p = RetryPolicy(initial_backoff=1, multiplier=2, max_backoff=5, jitter=0)
    assert [p.backoff(a, "s") for a in (1, 2, 3, 4, 10)] == [1, 2, 4, 5, 5]


def test_backoff_multiplier_one_is_constant() -> None:
    p = RetryPolicy(initial_backoff=2, multiplier=1, jitter=0)
    assert {p.backoff(a, "s") for a in range(1, 20)} == {2}


def test_zero_backoff_is_zero_even_with_jitter() -> None:
    p = RetryPolicy(initial_backoff=0, jitter=0.5)
    assert p.backoff(3, "s") == 0


def test_backoff_does_not_overflow_for_large_attempts() -> None:
    p = RetryPolicy(max_attempts=10**6, jitter=0)
    assert p.backoff(5000, "s") == p.max_backoff


def test_jitter_is_deterministic_bounded_and_seeded() -> None:
    p = RetryPolicy(initial_backoff=1, multiplier=2, max_backoff=100, jitter=0.25)
    for attempt in range(1, 8):
        base = min(100, 2 ** (attempt - 1))
        values = {p.backoff(attempt, "saga-1:pay") for _ in range(3)}
        assert len(values) == 1  # the same (seed, attempt) always gives the same delay
        (value,) = values
        assert base * 0.75 <= value < base * 1.25
    seeds = {p.backoff(3, f"saga-{i}:pay") for i in range(50)}
    assert len(seeds) > 40  # different sagas are spread out
    attempts = {p.backoff(a, "saga-1:pay") / min(100, 2 ** (a - 1)) for a in range(1, 8)}
    assert len(attempts) > 1  # the spread is per attempt too


def test_jitter_does_not_depend_on_process_hash_seed() -> None:
    # blake2b, not hash(): a replay in another process computes the same delay.
    p = RetryPolicy(initial_backoff=1, multiplier=1, jitter=1)
    value = p.backoff(1, "fixed-seed")
    assert 0 <= value < 2
    assert math.isclose(
        value, RetryPolicy(initial_backoff=1, multiplier=1, jitter=1).backoff(1, "fixed-seed")
    )


def test_full_jitter_range() -> None:
    p = RetryPolicy(initial_backoff=10, multiplier=1, jitter=1)
    values = [p.backoff(1, f"s{i}") for i in range(200)]
    assert all(0 <= v < 20 for v in values)
    assert min(values) < 5 and max(values) > 15


# --- definition accessors ---------------------------------------------------------------


def test_step_index_and_unknown_step() -> None:
    d = saga(Step("a", act()), Step("b", act()))
    assert d.step_index("a") == 0
    assert d.step_index("b") == 1
    with pytest.raises(DefinitionError, match="no step 'zzz'"):
        d.step_index("zzz")


def test_endpoints_cover_actions_ladders_and_status_queries() -> None:
    d = saga(
        Step(
            "pay",
            command("payment", "Authorize"),
            [command("payment", "Void"), command("ledger", "CreditNote"), noop_local],
            status_query=command("payment-status", "GetPaymentStatus"),
        ),
        Step("note", noop_local),
        Step("ship", command("shipping", "Ship"), kind="pivot"),
    )
    assert d.endpoints() == {"payment", "ledger", "payment-status", "shipping"}


def test_statuses_and_defaults() -> None:
    d = saga(Step("a", act(), status="PENDING_PAYMENT"))
    assert d.steps[0].status == "PENDING_PAYMENT"
    assert (
        d.started_status,
        d.completed_status,
        d.cancelling_status,
        d.cancelled_status,
        d.attention_status,
        d.deadline,
    ) == ("PENDING", "COMPLETED", "CANCELLING", "CANCELLED", "NEEDS_ATTENTION", None)


def test_steps_are_a_tuple_and_input_list_is_not_kept() -> None:
    steps = [Step("a", act())]
    d = SagaDefinition("checkout", steps)
    steps.append(Step("b", act()))
    assert len(d.steps) == 1
    assert isinstance(d.steps, tuple)
