"""Versioned message schemas: a pydantic model per (type, version), upcasters, a registry.

Every event and command type has a name, a version and a model. A new version of a
type comes with an *upcaster* from the previous one, so a consumer on the current
version still understands messages written before it (stored in an outbox, parked in a
dead-letter table, replayed). Give the registry to a participant and it validates
every payload it emits and every message it handles (upcast first); an invalid payload
raises :class:`~sagakit.errors.MessageError`, so the message is parked with the reason::

    registry = SchemaRegistry("shop")

    @registry.event("ItemSold")
    class ItemSoldV1(Payload):
        sku: str

    shop = Participant("shop", store, schemas=registry)

:func:`compare` checks the registry against a committed baseline (``sagakit schemas
check``): removing a type, a version or a field, changing a field's type, or adding a
required field without a default breaks consumers and is refused; adding a type, a
version (with its upcaster) or an optional field is not. Within one version, consumers
deploy before producers: a consumer that forbids unknown fields must know the new
optional field before the first message carries it.

Needs the ``schemas`` extra (pydantic 2). The core never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sagakit.core.envelope import Envelope, MessageKind
from sagakit.errors import ConfigurationError, MessageError

__all__ = [
    "Comparison",
    "MessageSchema",
    "Payload",
    "SchemaRegistry",
    "compare",
    "load_baseline",
    "write_baseline",
]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
M = TypeVar("M", bound=type[BaseModel])
BASELINE_FORMAT = 1


class Payload(BaseModel):
    """Base of message payload models: immutable, unknown fields refused.

    Refusing unknown fields keeps personal data from riding along in a field nobody
    declared.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class MessageSchema:
    """One version of one message type."""

    name: str
    version: int
    kind: MessageKind
    model: type[BaseModel]
    upcast: Upcaster | None = None
    """Turns a payload of ``version - 1`` into one of this version."""

    def fields(self) -> dict[str, dict[str, Any]]:
        """Each field's JSON-schema type and whether it is required (for baselines)."""
        schema = self.model.model_json_schema()
        defs = schema.get("$defs", {})
        required = set(schema.get("required", []))
        return {
            name: {"type": _normalise(prop, defs), "required": name in required}
            for name, prop in sorted(schema.get("properties", {}).items())
        }


class SchemaRegistry:
    """Every message type's versions, with validation and upcasting."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._schemas: dict[str, dict[int, MessageSchema]] = {}

    # -- registration -----------------------------------------------------------------
    def event(
        self, name: str, version: int = 1, *, upcast: Upcaster | None = None
    ) -> Callable[[M], M]:
        """Class decorator: ``model`` is version ``version`` of event ``name`` (a fact)."""
        return self._decorator(name, version, MessageKind.EVENT, upcast)

    def command(
        self, name: str, version: int = 1, *, upcast: Upcaster | None = None
    ) -> Callable[[M], M]:
        """Class decorator: ``model`` is version ``version`` of command ``name``."""
        return self._decorator(name, version, MessageKind.COMMAND, upcast)

    def _decorator(
        self, name: str, version: int, kind: MessageKind, upcast: Upcaster | None
    ) -> Callable[[M], M]:
        def register(model: M) -> M:
            self.add(MessageSchema(name, version, kind, model, upcast))
            return model

        return register

    def add(self, schema: MessageSchema) -> None:
        """Register one version; versions are added in order, each after the first with
        an upcaster from the one before."""
        versions = self._schemas.setdefault(schema.name, {})
        if schema.version in versions:
            raise ConfigurationError(f"{schema.name} v{schema.version} is registered twice")
        expected = max(versions, default=0) + 1
        if schema.version != expected:
            raise ConfigurationError(f"{schema.name} v{schema.version}: register v{expected} first")
        if versions and schema.kind is not versions[1].kind:
            raise ConfigurationError(f"{schema.name} is a {versions[1].kind.value}, not both")
        if schema.version > 1 and schema.upcast is None:
            raise ConfigurationError(
                f"{schema.name} v{schema.version} needs upcast=... from v{schema.version - 1}, "
                "or consumers could not read messages written before it"
            )
        versions[schema.version] = schema

    # -- lookups ----------------------------------------------------------------------
    def names(self, kind: MessageKind | None = None) -> list[str]:
        """Registered type names (of one kind), sorted."""
        return sorted(n for n, v in self._schemas.items() if kind is None or v[1].kind is kind)

    def current(self, name: str) -> MessageSchema:
        """The newest version of ``name``."""
        versions = self._schemas.get(name)
        if not versions:
            raise MessageError(f"no schema for message type {name!r} in registry {self.name!r}")
        return versions[max(versions)]

    def __contains__(self, name: object) -> bool:
        return name in self._schemas

    # -- validation -------------------------------------------------------------------
    def validate(
        self, name: str, version: int | None, payload: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Validate a payload of ``name`` at ``version`` (default: current) and upcast it.

        Returns ``(current version, payload)``. :class:`MessageError` names the fields
        that are wrong, never their values (they could be personal data).
        """
        current = self.current(name)
        version = current.version if version is None else version
        versions = self._schemas[name]
        if version not in versions:
            raise MessageError(
                f"{name} v{version} is unknown here (known: v1..v{current.version}); "
                "deploy consumers before producers"
            )
        data = _check(versions[version], payload)
        for v in range(version + 1, current.version + 1):
            upcast = versions[v].upcast
            assert upcast is not None  # add() refuses a later version without one
            data = _check(versions[v], upcast(dict(data)))
        return current.version, data

    def incoming(self, envelope: Envelope) -> Envelope:
        """The envelope with its payload validated and upcast to the current version."""
        schema = self.current(envelope.type)
        if envelope.kind is not schema.kind and envelope.kind is not MessageKind.QUERY:
            raise MessageError(
                f"{envelope.type} is a {schema.kind.value}, but arrived as a {envelope.kind.value}"
            )
        version, payload = self.validate(envelope.type, envelope.version, envelope.payload)
        if version == envelope.version and payload == envelope.payload:
            return envelope
        return envelope.with_changes(version=version, payload=payload)

    def outgoing(
        self, message_type: str, version: int | None, payload: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Validate a payload about to be emitted (at the current version by default)."""
        schema = self.current(message_type)
        if version is not None and version != schema.version:
            raise MessageError(
                f"emit {message_type} v{version}: the current version is v{schema.version}; "
                "producers write the current version"
            )
        return schema.version, _check(schema, payload)

    # -- baselines --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The registry as JSON-ready data (what ``sagakit schemas dump`` writes)."""
        return {
            "format": BASELINE_FORMAT,
            "registry": self.name,
            "messages": {
                name: {
                    "kind": versions[1].kind.value,
                    "versions": {
                        str(v): {"fields": s.fields(), "upcast": s.upcast is not None}
                        for v, s in sorted(versions.items())
                    },
                }
                for name, versions in sorted(self._schemas.items())
            },
        }


def _check(schema: MessageSchema, payload: Mapping[str, Any]) -> dict[str, Any]:
    try:
        model = schema.model.model_validate(dict(payload))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(payload)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        raise MessageError(
            f"{schema.name} v{schema.version} payload is invalid: {problems}"
        ) from None  # the pydantic error repeats the input values: keep them out of logs
    data: dict[str, Any] = model.model_dump(mode="json")
    return data


def _normalise(prop: Any, defs: Mapping[str, Any]) -> Any:
    """A field's JSON schema without titles, descriptions and defaults, refs inlined."""
    if isinstance(prop, dict):
        if "$ref" in prop:
            return _normalise(defs.get(prop["$ref"].rsplit("/", 1)[-1], {}), defs)
        return {
            k: _normalise(v, defs)
            for k, v in sorted(prop.items())
            if k not in ("title", "description", "default", "examples")
        }
    if isinstance(prop, list):
        return [_normalise(v, defs) for v in prop]
    return prop


# -- compatibility ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """What changed since the baseline: ``breaking`` fails ``sagakit schemas check``."""

    breaking: list[str]
    compatible: list[str]

    @property
    def ok(self) -> bool:
        """True when nothing breaks."""
        return not self.breaking


def compare(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> Comparison:
    """Compare two snapshots (:meth:`SchemaRegistry.snapshot`)."""
    breaking: list[str] = []
    compatible: list[str] = []
    old_msgs: Mapping[str, Any] = baseline.get("messages", {})
    new_msgs: Mapping[str, Any] = current.get("messages", {})
    for name in sorted(set(new_msgs) - set(old_msgs)):
        compatible.append(f"{name}: new {new_msgs[name]['kind']}")
    for name, old in sorted(old_msgs.items()):
        new = new_msgs.get(name)
        if new is None:
            breaking.append(f"{name}: message type removed (consumers and stored messages use it)")
            continue
        if new["kind"] != old["kind"]:
            breaking.append(f"{name}: kind changed from {old['kind']} to {new['kind']}")
        for v in sorted(set(new["versions"]) - set(old["versions"]), key=int):
            compatible.append(f"{name} v{v}: new version (upcast from v{int(v) - 1})")
        for v, old_version in sorted(old["versions"].items(), key=lambda kv: int(kv[0])):
            new_version = new["versions"].get(v)
            if new_version is None:
                breaking.append(f"{name} v{v}: version removed (messages of it may still arrive)")
                continue
            _compare_fields(
                f"{name} v{v}", old_version["fields"], new_version["fields"], breaking, compatible
            )
    return Comparison(breaking, compatible)


def _compare_fields(
    where: str,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    breaking: list[str],
    compatible: list[str],
) -> None:
    for field in sorted(set(old) - set(new)):
        breaking.append(f"{where}: field {field!r} removed or renamed")
    for field in sorted(set(new) - set(old)):
        if new[field]["required"]:
            breaking.append(f"{where}: new required field {field!r} without a default")
        else:
            compatible.append(f"{where}: new optional field {field!r}")
    for field in sorted(set(old) & set(new)):
        if old[field]["type"] != new[field]["type"]:
            before = json.dumps(old[field]["type"], sort_keys=True)
            after = json.dumps(new[field]["type"], sort_keys=True)
            breaking.append(f"{where}: field {field!r} changed type from {before} to {after}")
        if new[field]["required"] and not old[field]["required"]:
            breaking.append(f"{where}: field {field!r} became required")


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read a baseline written by :func:`write_baseline`."""
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


def write_baseline(registry: SchemaRegistry, path: str | Path) -> None:
    """Write the registry's snapshot as the new baseline (sorted, stable JSON)."""
    text = json.dumps(registry.snapshot(), indent=2, sort_keys=True)
    Path(path).write_text(text + "\n", encoding="utf-8")
