"""One exception tree for everything sagakit raises.

Each class's docstring is its default message, so ``raise StoreError()`` still says
something useful; driver errors are kept in ``__cause__`` (``raise ... from exc``).
"""

from __future__ import annotations


class SagakitError(Exception):
    """A sagakit operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__class__.__doc__ or "").strip())


class DefinitionError(SagakitError):
    """The saga definition is invalid."""


class MessageError(SagakitError):
    """The message is malformed: it cannot be parsed as a sagakit envelope."""


class UnknownMessageType(MessageError):
    """No handler is registered for this message type."""


class StoreError(SagakitError):
    """The store failed to read or write."""


class ConcurrencyError(StoreError):
    """Another worker changed the saga first; the transition was not applied."""


class SagaNotFound(SagakitError):
    """No saga instance has that id."""


class TransportError(SagakitError):
    """The transport could not publish or consume the message."""


class StepFailed(SagakitError):
    """A step reported a business failure.

    Raised by local step callables and participant handlers to fail a step with a
    reason the saga records. ``retryable=True`` asks for another attempt (a carrier
    that is down); the default is a final answer (a card declined).
    """

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class ConfigurationError(SagakitError):
    """The runtime is configured inconsistently."""


class UnroutableMessage(TransportError):
    """The transport has no route for the message's destination."""

    def __init__(self, message: str, message_ids: list[str]) -> None:
        super().__init__(message)
        self.message_ids = message_ids


class ManualActionRefused(SagakitError):
    """That manual action does not apply to the saga in its current state."""


class NoDriver(ManualActionRefused):
    """The saga is a choreography's view: nothing drives it, so only a record of what a
    person did by hand applies (mark_done, mark_compensated, accept_partial)."""
