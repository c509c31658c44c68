"""Connection limits of ``sagakit serve``: how many, how long a client may take to send
its request headers, how long an idle keep-alive connection stays, how big headers are.

uvicorn on its own never closes a connection that opened and sent nothing (or half a
request header): a few hundred of them use up the process's open files and the next
client (``/healthz`` included) cannot connect. :func:`guarded_protocol` is uvicorn's
h11 protocol with two additions:

* **header timeout**: a connection must deliver a whole request header within
  ``header_timeout`` seconds of connecting (or of its previous response), else it is
  closed. A slow *body* is not timed here (the handler reading it is).
* **connection cap**: beyond ``max_connections`` open connections, the connection that
  has waited longest for its request header is closed to make room (an idle keep-alive
  connection or a client that stalls). A client that sends its request promptly (a
  probe) therefore gets in even while the cap is full of stalled connections. If every
  connection is busy with a request (event streams, say), :data:`PROBE_ROOM` more are
  let in for a probe (``GET /healthz``, ``/readyz``, ``/metrics``) only, and anything
  else gets a 503 with ``Retry-After``.

:class:`HttpLimits` gathers these with the keep-alive timeout, the header size cap,
the listen backlog and uvicorn's own ``limit_concurrency`` (503 beyond), and turns
them into ``uvicorn.Config`` arguments. The event loop accepts connections
:func:`accept_batch` at a time (it would otherwise accept up to the whole backlog at
once and run out of open files), while the kernel queues up to ``backlog``
(:func:`listen_wider`), so a burst waits in the queue instead of being dropped.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sagakit.api.http import request_path
from sagakit.api.limits import PROBES
from sagakit.api.problems import PROBLEM_JSON, problem_bytes, problem_document
from sagakit.errors import ConfigurationError

MAX_CONNECTIONS_CEILING = 1000
"""The default connection cap never exceeds this."""


FILES_KEPT = 64
"""Open files kept for the process itself (SQLite files of every store and reader
thread, logs, the event loop's own) when the connection cap is derived."""


def _open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def busy_reply(path: str | None) -> bytes:
    """The answer to a connection beyond the cap when no stalled one can make room: a
    503 problem document, its ``instance`` the request's path when one was read."""
    body = problem_bytes(
        problem_document(
            503, "not_ready", "the server has no room for another connection now", path
        )
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"content-type: {PROBLEM_JSON}\r\n"
        "retry-after: 1\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def request_target(head: bytes) -> str | None:
    """The path of the request line at the start of ``head`` (None: not a request line)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return None
    return parts[1].split(b"?", 1)[0].decode("latin-1")


PROBE_ROOM = 16
"""Connections beyond the cap let in when every connection is busy, for a probe only
(``GET /healthz``, ``/readyz``, ``/metrics``); anything else gets the 503."""


def asks_for_probe(head: bytes) -> bool:
    """Whether the request that starts with ``head`` is ``GET`` (or ``HEAD``) of a probe."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
        return False
    return parts[1].split(b"?", 1)[0].decode("latin-1") in PROBES


def default_max_connections() -> int:
    """Half of the open-file limit once :data:`FILES_KEPT` are set aside, at most
    :data:`MAX_CONNECTIONS_CEILING`, at least 16."""
    return max(16, min(MAX_CONNECTIONS_CEILING, (_open_file_limit() - FILES_KEPT) // 2))


def accept_batch() -> int:
    """How many connections the event loop accepts in one go: an eighth of the
    open-file limit, 16 to 512. They are accepted before any can be turned away, so a
    burst must fit in the files left beside the connection cap."""
    return max(16, min(512, _open_file_limit() // 8))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What ``sagakit serve`` allows its HTTP clients (defaults safe for the internet)."""

    max_connections: int | None = None
    """Open connections at most (None: :func:`default_max_connections`)."""
    header_timeout: float = 10.0
    """Seconds a connection has to send a whole request header."""
    keep_alive: float = 5.0
    """Seconds an idle keep-alive connection stays open."""
    max_header_bytes: int = 16 * 1024
    """Bytes a request line plus headers may have (larger: 400)."""
    backlog: int = 1024
    """Connections the kernel queues before the server accepts them (the event loop
    takes them :func:`accept_batch` at a time)."""
    limit_concurrency: int | None = None
    """uvicorn's cap on connections plus requests in flight, 503 beyond (None: off; it
    counts stalled connections too, so ``max_connections`` is the better guard)."""

    def __post_init__(self) -> None:
        for name in ("max_connections", "limit_concurrency", "backlog"):
            value = getattr(self, name)
            if (value is not None or name == "backlog") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("header_timeout", "keep_alive"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.max_header_bytes, bool) or not (
            isinstance(self.max_header_bytes, int) and self.max_header_bytes >= 1024
        ):
            raise ConfigurationError(
                f"max_header_bytes must be an integer >= 1024, got {self.max_header_bytes!r}"
            )

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config``."""
        cap = self.max_connections or default_max_connections()
        return {
            "http": guarded_protocol(self.header_timeout, cap),
            "timeout_keep_alive": self.keep_alive,
            "h11_max_incomplete_event_size": self.max_header_bytes,
            # uvicorn's backlog is also the event loop's accept batch; serve() widens the
            # kernel's queue to ``backlog`` once listening (listen_wider).
            "backlog": min(self.backlog, accept_batch()),
            "limit_concurrency": self.limit_concurrency,
        }


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection cap (class
    attributes, set by :func:`guarded_protocol`)."""

    header_timeout: float = 10.0
    max_connections: int = MAX_CONNECTIONS_CEILING

    _header_timer: asyncio.TimerHandle | None = None
    _waiting_since: float = 0.0
    _probe_only = False
    """Let in on the room kept for probes: it may ask for a probe, once."""
    _probe_head: bytes | None = None
    """The start of its request, until the request line is whole."""
    _concurrency: int | None = None
    """uvicorn's ``limit_concurrency``, checked here instead of by uvicorn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn answers a request beyond limit_concurrency with a text/plain 503 of
        # its own making; the same check is made here, so that the answer is the API's
        # problem document like every other error.
        self._concurrency, self.limit_concurrency = self.limit_concurrency, None
        if self._concurrency is not None:
            self.app = self._limited(self.app, self._concurrency)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (a header larger than
        ``max_header_bytes``, say), as a problem document instead of plain text."""
        body = problem_bytes(
            problem_document(
                400,
                "bad_request",
                "the request is not valid HTTP/1.1 (a malformed request line or header, "
                "or a header larger than the server accepts)",
                None,
            )
        )
        headers = [
            (b"content-type", PROBLEM_JSON.encode("ascii")),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the header clock; make room if the cap is exceeded."""
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_header()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        """Feed uvicorn; stop the header clock once a whole request header arrived."""
        if self._probe_head is not None:
            # Let in on the room kept for probes: its request line decides.
            head = self._probe_head + data
            if b"\r\n" not in head and len(head) < 1024:
                self._probe_head = head
                return
            self._probe_head = None
            if not asks_for_probe(head):
                self._turn_away(request_target(head))
                return
            data = head
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_header_clock()
        elif self._header_timer is None and not self.transport.is_closing():
            # The end of a body answered early (a 401 before it was read): what follows
            # is the next request's header, on the clock like any other.
            self._await_header()

    def on_response_complete(self) -> None:
        """After a response, the next request header is on the clock again."""
        super().on_response_complete()
        if self._probe_only:
            self._close()  # the room kept for probes is for one request at a time
        elif not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_header()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the header clock of a connection that is gone."""
        self._stop_header_clock()
        super().connection_lost(exc)

    # -- internals ----------------------------------------------------------------------
    def _limited(self, app: Any, cap: int) -> Any:
        async def limited(scope: Any, receive: Any, send: Any) -> None:
            # uvicorn counts before it adds the request's task; here it is counted.
            if scope["type"] != "http" or (len(self.connections) < cap and len(self.tasks) <= cap):
                await app(scope, receive, send)
                return
            self.logger.warning("Exceeded concurrency limit.")
            body = problem_bytes(
                problem_document(
                    503,
                    "not_ready",
                    f"the server is at its limit of {cap} connections and requests; retry",
                    request_path(scope),
                )
            )
            headers = [
                (b"content-type", PROBLEM_JSON.encode("ascii")),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return limited

    def _await_header(self) -> None:
        self._stop_header_clock()
        self._waiting_since = self.loop.time()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            self._close()

    def _make_room(self) -> None:
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and c._header_timer is not None and c is not self
        ]
        if waiting:
            min(waiting, key=lambda c: c._waiting_since)._close()
            return
        if len(self.connections) - self.max_connections <= PROBE_ROOM:
            # Every other connection is busy with a request: a few more may come in,
            # for a probe only (event streams must not lock the load balancer out).
            self._probe_only, self._probe_head = True, b""
            return
        self._turn_away()

    def _turn_away(self, path: str | None = None) -> None:
        self._stop_header_clock()
        if not self.transport.is_closing():
            self.transport.write(busy_reply(path))
            self.transport.close()

    def _close(self) -> None:
        self._stop_header_clock()
        if not self.transport.is_closing():
            self.transport.close()


def listen_wider(sockets: Iterable[Any], backlog: int) -> None:
    """Let the kernel queue ``backlog`` connections on each listening socket (the event
    loop set its accept batch as the backlog when it started listening)."""
    for sock in sockets:
        # listen() again on a duplicate of the descriptor: the socket is shared, the
        # duplicate is closed; asyncio's own socket object offers no listen().
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.listen(backlog)


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class with these limits (uvicorn builds one
    protocol object per connection from the class it is given)."""
    return type(
        "SagakitH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
