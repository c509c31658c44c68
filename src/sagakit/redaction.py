"""Log redaction: personal data never reaches a log line.

Messages carry tokens, never personal data, and the library never logs payloads; this
filter is the second line of defence for what slips through anyway (a driver error
that quotes a row, a reason written by a handler). The library installs no handlers:
the CLI and ``sagakit serve`` add :class:`RedactPersonalData` to the handlers they
create, and so can any application::

    handler.addFilter(RedactPersonalData())
"""

from __future__ import annotations

import logging
import re

__all__ = ["EMAIL", "RedactPersonalData", "personal_data_in", "redact"]

EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
"""An e-mail address."""

_CARD = re.compile(r"(?<![\w-])\d(?:[ \-]?\d){12,18}(?![\w-])")
"""13 to 19 digits, optionally grouped with spaces or dashes; a card number if it has a
card's length and first digit and passes the Luhn check (:func:`_card_digits`)."""

_ADDRESS = re.compile(
    r"\b\d{1,5}[A-Za-z]?,?\s+(?:[A-Z][A-Za-z'\-]*\s+){1,3}"
    r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Boulevard|Blvd|Drive|Dr|Way|Court|Ct|Place|"
    r"Pl|Square|Sq|Terrace|Close|Crescent|Gardens|Parkway|Highway|Hwy)\b\.?"
)
"""A street address: a house number, capitalised words and a street type (``12 Fake Street``)."""


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_digits(digits: str) -> bool:
    """Whether ``digits`` can be a payment card's number.

    The Luhn check passes for one number in ten, so it alone would call every tenth
    numeric id of card length a card. Cards issued today have 14 to 19 digits and start
    with 2 to 6 (Mastercard, American Express, Diners, JCB, Visa, Discover, UnionPay,
    Maestro), which rules out the commonest long numbers that are not cards: product
    barcodes (EAN-13) and epoch timestamps in milliseconds (13 digits), nanosecond
    timestamps and snowflake ids (they start with 1 for decades yet).
    """
    return 14 <= len(digits) <= 19 and digits[0] in "23456" and _luhn(digits)


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    # Only numbers that can be cards are masked: ids and timestamps of the same length
    # mostly cannot, and stay readable.
    return f"[card ****{digits[-4:]}]" if _card_digits(digits) else match.group(0)


def _is_card(match: re.Match[str]) -> bool:
    return _card_digits(re.sub(r"\D", "", match.group(0)))


def redact(text: str) -> str:
    """``text`` with e-mail addresses, card numbers and street addresses masked."""
    return _ADDRESS.sub("[address]", _CARD.sub(_mask_card, EMAIL.sub("[email]", text)))


def personal_data_in(text: str) -> str | None:
    """What personal data free ``text`` holds, or None: what :func:`redact` would mask.

    Each kind found, in words: ``"an e-mail address, a card number and a postal
    address"``. A name on its own is not found: in free text it cannot be told from a
    service's or a product's.
    """
    found = [
        kind
        for kind, present in (
            ("an e-mail address", EMAIL.search(text) is not None),
            ("a card number", any(_is_card(m) for m in _CARD.finditer(text))),
            ("a postal address", _ADDRESS.search(text) is not None),
        )
        if present
    ]
    if not found:
        return None
    return found[0] if len(found) == 1 else f"{', '.join(found[:-1])} and {found[-1]}"


_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}
"""A log record's own attributes; the others came in ``extra``."""


class RedactPersonalData(logging.Filter):
    """Masks e-mails, card numbers and street addresses in a record's message, its
    exception text and its string ``extra`` fields (a JSON formatter writes those).

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
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = redact(value)
        return True
