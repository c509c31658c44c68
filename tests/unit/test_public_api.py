"""The public names of ``sagakit``: pinned, so that adding or dropping one is a decision."""

from __future__ import annotations

import inspect

import sagakit

PUBLIC = {
    # apps and deployments
    "App", "AppContext", "AppOption", "Deployment", "Service", "load_app", "now", "DEFER",
    # definitions
    "CommandAction", "LocalAction", "RetryPolicy", "Rung", "SagaDefinition", "SagaView",
    "Step", "StepContext", "StepKind", "command", "local",
    # personal data in saga data
    "HmacTokeniser", "PersonalField",
    # messages and outcomes
    "Envelope", "MessageKind", "Outcome", "failure", "success",
    # instances
    "HistoryEntry", "ManualAction", "SagaInstance", "SagaState", "StepState", "StepStatus",
    # running
    "Engine", "Participant", "embedded",
    # your own transaction
    "OwnTx", "start_in", "start_in_sync",
    # errors
    "ConcurrencyError", "ConfigurationError", "DefinitionError", "ManualActionRefused",
    "MessageError", "PersonalDataRefused", "SagaNotFound", "SagakitError", "StepFailed",
    "StoreError", "TransportError", "UnknownMessageType", "VersionMissing",
}  # fmt: skip


def test_the_public_names_are_pinned() -> None:
    assert set(sagakit.__all__) == PUBLIC
    assert len(sagakit.__all__) == len(set(sagakit.__all__))


def test_every_public_name_exists_and_says_what_it_is() -> None:
    for name in sagakit.__all__:
        obj = getattr(sagakit, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"sagakit.{name} has no docstring"


def test_errors_form_one_tree() -> None:
    errors = [getattr(sagakit, n) for n in sagakit.__all__ if n.endswith(("Error", "Refused"))]
    errors += [sagakit.SagaNotFound, sagakit.StepFailed, sagakit.VersionMissing]
    for err in errors:
        assert issubclass(err, sagakit.SagakitError), err
