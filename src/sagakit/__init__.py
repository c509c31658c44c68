"""sagakit: durable sagas that make business operations across services all-or-nothing."""

from __future__ import annotations

from sagakit.app import App, AppContext, AppOption, load_app
from sagakit.clock import now
from sagakit.core.definition import (
    CommandAction,
    LocalAction,
    RetryPolicy,
    Rung,
    SagaDefinition,
    SagaView,
    Step,
    StepContext,
    StepKind,
    command,
    local,
)
from sagakit.core.envelope import Envelope, MessageKind, Outcome, failure, success
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepState, StepStatus
from sagakit.core.machine import ManualAction
from sagakit.core.personal import HmacTokeniser, PersonalField
from sagakit.deployment import Deployment
from sagakit.errors import (
    ConcurrencyError,
    ConfigurationError,
    DefinitionError,
    ManualActionRefused,
    MessageError,
    PersonalDataRefused,
    SagakitError,
    SagaNotFound,
    StepFailed,
    StoreError,
    TransportError,
    UnknownMessageType,
    VersionMissing,
)
from sagakit.runtime.engine import Engine, embedded
from sagakit.runtime.own_tx import OwnTx, start_in, start_in_sync
from sagakit.runtime.participant import DEFER, Participant
from sagakit.service import Service

__all__ = [
    "DEFER",
    "App",
    "AppContext",
    "AppOption",
    "CommandAction",
    "ConcurrencyError",
    "ConfigurationError",
    "DefinitionError",
    "Deployment",
    "Engine",
    "Envelope",
    "HistoryEntry",
    "HmacTokeniser",
    "LocalAction",
    "ManualAction",
    "ManualActionRefused",
    "MessageError",
    "MessageKind",
    "Outcome",
    "OwnTx",
    "Participant",
    "PersonalDataRefused",
    "PersonalField",
    "RetryPolicy",
    "Rung",
    "SagaDefinition",
    "SagaInstance",
    "SagaNotFound",
    "SagaState",
    "SagaView",
    "SagakitError",
    "Service",
    "Step",
    "StepContext",
    "StepFailed",
    "StepKind",
    "StepState",
    "StepStatus",
    "StoreError",
    "TransportError",
    "UnknownMessageType",
    "VersionMissing",
    "command",
    "embedded",
    "failure",
    "load_app",
    "local",
    "now",
    "start_in",
    "start_in_sync",
    "success",
]
