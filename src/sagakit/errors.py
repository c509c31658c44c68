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


class VersionMissing(DefinitionError):
    """The saga runs a definition version this process does not have.

    Not a defect of the saga or its messages: a process that has the version can act
    on it. The runtime sets the saga's inputs aside for such a process (see
    :mod:`sagakit.runtime.set_aside`); a manual action is refused with this error.
    ``waiting_for`` is the ``name@version`` it needs.
    """

    def __init__(self, message: str | None = None, *, waiting_for: str = "") -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


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
    """The transport has no route for the destination of some of the messages.

    ``copies`` names each unroutable copy as ``(message_id, destination)``: the copies
    of one fanned-out event share their message id, and only the copies whose
    destination has no route failed (the others were published).
    """

    def __init__(self, message: str, copies: list[tuple[str, str | None]]) -> None:
        super().__init__(message)
        self.copies = copies

    @property
    def message_ids(self) -> list[str]:
        """The message ids of the unroutable copies (a fanned-out id may repeat)."""
        return [message_id for message_id, _ in self.copies]


class ManualActionRefused(SagakitError):
    """That manual action does not apply to the saga in its current state."""


class SagaMoved(SagakitError):
    """The saga changed since the decision was made on it: look at it again, then decide.

    A person's decision carries the saga version it was made on (``expected_version``);
    when the saga is at another version by the time the decision is applied, applying
    it would act on a state its author never saw. ``expected`` is the version the
    decision was made on, ``current`` the saga's version now.
    """

    def __init__(self, message: str | None = None, *, expected: int, current: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.current = current


class OpenHolds(ManualActionRefused):
    """``accept_partial`` was refused: a compensation or a hold is still open.

    Accepting the saga as it stands would leave those effects in place for good (an
    authorisation never voided, stock never released). ``holds`` lists ``(step,
    what)``; a person who means it passes ``force`` with a reason.
    """

    def __init__(self, message: str, *, holds: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.holds = holds


class DeadLetterNotFound(SagakitError):
    """No dead letter has that id in that store."""


class DeadLetterRefused(SagakitError):
    """That action does not apply to the dead letter (settled already, or pointless)."""


class NoDriver(ManualActionRefused):
    """The saga is a choreography's view: nothing drives it, so only a record of what a
    person did by hand applies (mark_done, mark_compensated, accept_partial)."""


class PersonalDataRefused(SagakitError, ValueError):
    """Personal data where it would be kept for good: a reason, a business key, saga data.

    Raised before anything is stored. ``where`` names the place (``"reason"``, ``"data
    field 'email'"``) and ``found`` what was found (``"an e-mail address"``); neither
    the message nor the attributes hold the personal data itself.
    """

    def __init__(self, message: str, *, where: str, found: str) -> None:
        super().__init__(message)
        self.where = where
        self.found = found
