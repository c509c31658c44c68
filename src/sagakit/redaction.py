"""Log redaction: personal data never reaches a log line.

Messages carry tokens, never personal data, and the library never logs payloads; this
filter is the second line of defence for what slips through anyway (a driver error
that quotes a row, a reason written by a handler). The library installs no handlers:
the CLI adds :class:`RedactPersonalData` to the handlers it creates, and so can any
application::

    handler.addFilter(RedactPersonalData())
"""

from __future__ import annotations

import logging
import re

__all__ = ["EMAIL", "RedactPersonalData", "redact"]

EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
"""An e-mail address."""

_CARD = re.compile(r"(?<![\w-])\d(?:[ \-]?\d){12,18}(?![\w-])")
"""13 to 19 digits, optionally grouped with spaces or dashes (card-number length)."""


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    # Only numbers that pass the Luhn check look like cards; ids and timestamps of the
    # same length mostly do not, and stay readable.
    return f"[card ****{digits[-4:]}]" if _luhn(digits) else match.group(0)


def redact(text: str) -> str:
    """``text`` with e-mail addresses and card-number-like digit runs masked."""
    return _CARD.sub(_mask_card, EMAIL.sub("[email]", text))


class RedactPersonalData(logging.Filter):
    """Masks e-mails and card numbers in a record's message and exception text.

    The message is formatted here (``msg % args``) and the result masked, so values
    passed as arguments are covered too. Records are never dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a broken format string: keep what was given
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
