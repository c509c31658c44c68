"""The app with a bug planted in its real code, for ``sagakit simulate`` to catch.

sagakit simulate --app sagakit_notifications.planted:retry_without_key --seeds 200
"""

from __future__ import annotations

from sagakit import App

from .app import build_app


def retry_without_key() -> App:
    """The e-mail service gives its provider a fresh key on every try instead of the
    command's idempotency key: a try after an answer that came too late sends the
    confirmation again. The engine's records are all in order (each try is a new
    attempt of one step); only the provider's delivery log shows the customer's two
    e-mails, and the ``at_most_once`` invariant reads it."""
    return build_app(bug="retry_without_key")
