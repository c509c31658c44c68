"""Personal data in saga data: declared fields are tokenised or refused, before storage.

A saga's data is kept for good: in the saga row, in its history, in every command
built from it, in the outbox and the broker. So a definition says which of its fields
are personal, and the engine enforces it on every start (``Engine.start``,
``start_many``, ``start_in``, ``App.start``), before anything is written::

    SagaDefinition(
        "signup",
        steps,
        personal={
            "customer": "refuse",  # must already be a token (cust-..., from your vault)
            "email": PersonalField("tokenise", kind="email"),  # the engine tokenises it
            "order_no": "public",  # not personal: never scanned
        },
        tokeniser=HmacTokeniser(lambda: os.environ["SIGNUP_PERSONAL_KEY"]),
    )

``"refuse"``
    The field may only hold a token (``kind-...``, e.g. ``cust-000123``): the service
    that owns the person's data keeps it and hands out the token, as the checkout's
    order service does (``examples/checkout/personal.py``). A value in clear is
    refused with :class:`~sagakit.errors.PersonalDataRefused`.
``"tokenise"``
    The engine replaces the value (a string or an integer) by an opaque token before it
    is stored, made by the definition's (or the field's) ``tokeniser``: a stable
    ``HMAC-SHA256(key, kind, value)`` with your deployment's secret key
    (:class:`HmacTokeniser`), or a vault of yours (``(kind, value) -> token``). A value
    that already is a token of the field's kind is kept, so a start retried with
    tokenised data is the same start.
``"public"``
    Not personal data, though it looks like some (a numeric id that passes the card
    checksum): kept as it is, never scanned.

Every other string of the data (nested mappings and lists included) and the business
key are scanned with :func:`~sagakit.redaction.personal_data_in`: an e-mail address, a
card number or a street address there refuses the start, naming the field and what was
found, never the value. ``scan_personal=False`` on the definition turns the scan off.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

from sagakit.errors import ConfigurationError, DefinitionError, PersonalDataRefused
from sagakit.redaction import personal_data_in

__all__ = [
    "TOKEN",
    "Handling",
    "HmacTokeniser",
    "PersonalField",
    "PersonalPolicy",
    "Tokeniser",
    "refuse_personal_text",
]

TOKEN = re.compile(r"[a-z][a-z0-9]*-[A-Za-z0-9_.:\-]*[0-9][A-Za-z0-9_.:\-]*")
"""A token: a lower-case kind, ``-``, an opaque id with a digit (the API's rule too)."""

_KIND = re.compile(r"[a-z][a-z0-9]{0,19}")
_TOKEN_CHARS = r"[A-Za-z0-9_.:\-]+"
_MIN_KEY = 16

Tokeniser: TypeAlias = Callable[[str, str], "str | Awaitable[str]"]
"""``(kind, value) -> token``: sync, or async (not under ``App.start``'s sync path)."""


class Handling(StrEnum):
    """What the engine does with a declared field of saga data."""

    REFUSE = "refuse"
    """Only a token is taken; a value in clear refuses the start."""
    TOKENISE = "tokenise"
    """The engine replaces the value by a stable opaque token."""
    PUBLIC = "public"
    """Not personal data: kept as is and never scanned."""


@dataclass(frozen=True, slots=True)
class PersonalField:
    """How one field of saga data is handled; see the module docstring.

    ``kind`` is the token's prefix (``cust`` for ``cust-...``): a ``refuse`` field with
    a kind takes only tokens of that kind; a ``tokenise`` field makes tokens of it
    (default ``tok``). ``tokeniser`` replaces the definition's for this field.
    """

    handling: Handling | str
    kind: str | None = None
    tokeniser: Tokeniser | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "handling", Handling(self.handling))
        except ValueError:
            raise DefinitionError(
                f"personal data handling {self.handling!r} is not one of "
                f"{', '.join(h.value for h in Handling)}"
            ) from None
        if self.kind is not None and not _KIND.fullmatch(self.kind):
            raise DefinitionError(
                f"token kind {self.kind!r} must be 1-20 lower case letters or digits, "
                "starting with a letter (it prefixes the tokens: cust-...)"
            )
        if self.tokeniser is not None and not callable(self.tokeniser):
            raise DefinitionError(f"tokeniser {self.tokeniser!r} is not callable")
        if self.tokeniser is not None and self.handling is not Handling.TOKENISE:
            raise DefinitionError("only a 'tokenise' field takes a tokeniser")


KeySource: TypeAlias = "bytes | str | Callable[[], bytes | str]"
"""A secret key, or a function returning it (called at each use)."""


class HmacTokeniser:
    """Stable opaque tokens: ``kind-`` and the first ``length`` hex digits of
    ``HMAC-SHA256(key, kind NUL value)``.

    The same value gives the same token (sagas of one customer can be found together,
    a retried start is the same start) and nobody without the key can tell the value
    from the token. Whoever has the key can test guesses (is this the token of
    ``jane@example.com``?): keep it as secret as a password, the same in every process
    that starts sagas; changing it changes every token from then on. ``key``: bytes or
    text of at least 16 characters, or a function returning it, called at each use, so
    that a definition can be built before its process reads its secrets (sagakit reads
    no environment variable of its own for it: ``lambda: os.environ["MY_KEY"]``, or an
    :class:`~sagakit.app.AppOption` of your app).
    """

    def __init__(self, key: KeySource, *, length: int = 24) -> None:
        if not 16 <= length <= 64:
            raise ConfigurationError(f"token length must be 16..64 hex digits, got {length}")
        if callable(key):
            self._source: Callable[[], bytes | str] | None = key
            self._key = b""
        else:
            self._source, self._key = None, self._checked(key)
        self.length = length

    @staticmethod
    def _checked(key: object) -> bytes:
        raw = key.encode() if isinstance(key, str) else key
        if not isinstance(raw, bytes) or len(raw) < _MIN_KEY:
            raise ConfigurationError(
                f"the tokenising key must be bytes or text of at least {_MIN_KEY} characters "
                "(a random secret: python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return raw

    def key(self) -> bytes:
        """The key (from the function given, if one was); ConfigurationError if none."""
        if self._source is None:
            return self._key
        try:
            return self._checked(self._source())
        except LookupError as exc:  # os.environ["..."] unset
            raise ConfigurationError(
                f"the tokenising key is not set ({type(exc).__name__}: {exc}): saga data has "
                "a field to tokenise; give every process that starts sagas the same secret"
            ) from None

    def __call__(self, kind: str, value: str) -> str:
        digest = hmac.new(self.key(), f"{kind}\x00{value}".encode(), hashlib.sha256)
        return f"{kind}-{digest.hexdigest()[: self.length]}"

    def __repr__(self) -> str:  # never show the key
        return f"HmacTokeniser(length={self.length})"


def refuse_personal_text(text: object, field: str = "reason") -> None:
    """Raise :class:`~sagakit.errors.PersonalDataRefused` if the free ``text`` of
    ``field`` (an operator's reason) holds personal data; the message names the field
    and what was found, never the text."""
    found = personal_data_in(text) if isinstance(text, str) else None
    if found is not None:
        raise PersonalDataRefused(
            f"the {field} holds {found}: it would be kept for good (the saga's history, "
            "the audit, the log), so write it without personal data and name the customer "
            "by their token (cust-000123)",
            where=field,
            found=found,
        )


class PersonalPolicy:
    """A definition's rules for personal data in its starts (see the module docstring)."""

    __slots__ = ("fields", "saga", "scan", "tokeniser")

    def __init__(
        self,
        saga: str,
        personal: Mapping[str, Handling | str | PersonalField] | None,
        *,
        tokeniser: Tokeniser | None = None,
        scan: bool = True,
    ) -> None:
        if tokeniser is not None and not callable(tokeniser):
            raise DefinitionError(f"saga {saga!r}: tokeniser {tokeniser!r} is not callable")
        if personal is not None and not isinstance(personal, Mapping):
            raise DefinitionError(
                f"saga {saga!r}: personal= maps field names to 'refuse', 'tokenise', "
                f"'public' or a PersonalField, got {type(personal).__name__}"
            )
        fields: dict[tuple[str, ...], PersonalField] = {}
        for name, spec in (personal or {}).items():
            path = tuple(name.split(".")) if isinstance(name, str) else ()
            if not path or not all(path):
                raise DefinitionError(
                    f"saga {saga!r}: personal field {name!r} must be a field name "
                    "(a dotted path for nested mappings: 'customer.email')"
                )
            try:
                field = spec if isinstance(spec, PersonalField) else PersonalField(spec)
            except DefinitionError as exc:
                raise DefinitionError(f"saga {saga!r}: personal field {name!r}: {exc}") from None
            fields[path] = field
        for path, field in fields.items():
            if field.handling is Handling.TOKENISE and field.tokeniser is None and not tokeniser:
                raise DefinitionError(
                    f"saga {saga!r}: personal field {'.'.join(path)!r} is to be tokenised but "
                    "the definition has no tokeniser: give tokeniser=HmacTokeniser(key) "
                    "(your deployment's secret) or your vault's (kind, value) -> token"
                )
        self.saga = saga
        self.fields = fields
        self.tokeniser = tokeniser
        self.scan = scan

    async def admit(self, business_key: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` as it may be stored: declared fields checked or tokenised, the rest
        scanned. Raises :class:`~sagakit.errors.PersonalDataRefused` (the value is never
        in the message) or ConfigurationError (no tokenising key). ``data`` itself is
        left as it was: the mappings on a tokenised field's path are copied."""
        where = f"saga {self.saga!r} (business key {_shown(business_key)})"
        if self.scan:
            found = personal_data_in(business_key)
            if found is not None:
                raise PersonalDataRefused(
                    f"saga {self.saga!r}: the business key holds {found}: it is kept, "
                    "indexed and logged in clear, so key the saga by an order id or a token",
                    where="business_key",
                    found=found,
                )
        out = dict(data)
        for path, field in self.fields.items():
            parent = out
            for part in path[:-1]:
                child = parent.get(part)
                if not isinstance(child, Mapping):
                    break
                parent[part] = parent = dict(child)  # copied: the caller's data stays
            else:
                if parent.get(path[-1]) is not None:
                    name = ".".join(path)
                    parent[path[-1]] = await self._handle(where, name, field, parent[path[-1]])
        if self.scan:
            self._scan(where, out)
        return out

    async def _handle(self, where: str, name: str, field: PersonalField, value: Any) -> Any:
        h = Handling(field.handling)
        if h is Handling.PUBLIC:
            return value
        if h is Handling.REFUSE:
            if isinstance(value, str) and _is_token(value, field.kind):
                return value
            found = (personal_data_in(value) if isinstance(value, str) else None) or (
                "a value in clear"
            )
            token = f"a {field.kind}-... token" if field.kind else "a token (cust-000123)"
            raise PersonalDataRefused(
                f"{where}: data field {name!r} is personal (refuse) and holds {found}, "
                f"not {token}: keep the person's data in the service that owns it and "
                "start the saga with its token",
                where=f"data.{name}",
                found=found,
            )
        kind = field.kind or "tok"
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise PersonalDataRefused(
                f"{where}: data field {name!r} is personal (tokenise) and holds a "
                f"{type(value).__name__}: only a string or an integer is tokenised",
                where=f"data.{name}",
                found=f"a {type(value).__name__}",
            )
        if isinstance(value, str) and _is_token(value, kind):
            return value  # tokenised already (a retried start, or your own vault's)
        tokenise = field.tokeniser or self.tokeniser
        assert tokenise is not None  # checked when the definition was built
        made = tokenise(kind, str(value))
        token = await made if inspect.isawaitable(made) else made
        if not isinstance(token, str) or not _is_token(token, kind) or personal_data_in(token):
            raise ConfigurationError(
                f"{where}: the tokeniser of {name!r} returned no {kind}-... token "
                "(a string of letters, digits and _.:- after the prefix, without personal data)"
            )
        return token

    def _scan(self, where: str, data: Mapping[str, Any]) -> None:
        # With a stack, not recursion: data nested deeper than Python recurses is valid.
        todo: list[tuple[tuple[str, ...], object]] = [((), data)]
        while todo:
            path, value = todo.pop()
            if path in self.fields:
                continue  # declared: handled already (a public one is never scanned)
            found, what = None, ""
            if isinstance(value, str):
                found, what = personal_data_in(value), "holds"
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    key = str(k)
                    if found is None and personal_data_in(key) is not None:
                        found, what = personal_data_in(key), "has a key that holds"
                    todo.append(((*path, key), v))
            elif isinstance(value, list | tuple):
                todo.extend((path, v) for v in value)
            if found is not None:
                name = ".".join(path)
                shown = repr(name[:200]) if name else "(the data)"
                raise PersonalDataRefused(
                    f"{where}: data field {shown} {what} {found}: saga data is kept for "
                    "good (the saga, its history, its commands), so declare the field in "
                    "the definition's personal= ('tokenise', or 'refuse' and pass a token), "
                    "or 'public' if it is not personal data",
                    where=f"data.{name}" if name else "data",
                    found=found,
                )


def _is_token(value: str, kind: str | None) -> bool:
    if kind is None:
        return TOKEN.fullmatch(value) is not None
    return re.fullmatch(re.escape(kind) + "-" + _TOKEN_CHARS, value) is not None


def _shown(key: str) -> str:
    """The business key for a message, unless it holds personal data itself."""
    return repr(key) if personal_data_in(key) is None else "<withheld>"
