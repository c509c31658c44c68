"""The travel agency's partners: an airline, a card provider and a mail service.

They stand for external systems that the worker calls from local steps. Like real
providers, each one keeps what it did under the idempotency key it was given, so a
request repeated with the same key gets the first answer instead of a second effect.
Each keeps its books in a SQLite file of its own in one directory.

They fail the way real ones do, chosen by the trip's data (see :mod:`travel.demo`):

* flight ``XX0000`` is sold out; a ticket on ``XX0001`` cannot be cancelled, only
  turned into a voucher;
* card ``card-declined-*`` is declined; the provider charges ``card-slow-*`` but loses
  its first two answers, and charges ``card-lost-*`` but never answers at all;
* the mail server is busy for the first two tries of every mail to ``trv-flaky-*``,
  and has no address for ``trv-nomail-*`` (after the pivot: a person decides).

Nothing here knows sagakit: the saga's steps (:mod:`travel.trip`) turn :class:`Refused`
and :class:`Unavailable` into step outcomes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SOLD_OUT = "XX0000"
"""A flight with no seat left."""
NON_REFUNDABLE = "XX0001"
"""A flight whose tickets the airline refuses to cancel (a voucher is the way back)."""


class Refused(Exception):
    """A definite no: asking again with the same key gets the same answer."""


class Unavailable(Exception):
    """No answer: the request may or may not have had its effect; ask again, same key."""


@contextmanager
def _transaction(path: Path, schema: str) -> Iterator[sqlite3.Connection]:
    """One write transaction on the partner's file (created on first use)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(schema.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


class Airline:
    """Flight bookings by key: BOOKED, then CANCELLED or VOUCHER (or REFUSED).

    A cancellation that arrives before its booking leaves a tombstone
    (CANCELLED_FIRST): the booking, if it comes later, is refused.
    """

    SCHEMA = """
        CREATE TABLE bookings (
            key TEXT PRIMARY KEY, trip TEXT NOT NULL, flight TEXT, status TEXT NOT NULL
        );
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def book(self, key: str, trip: str, flight: str) -> dict[str, Any]:
        """Book a seat on ``flight`` for ``trip`` (once per key)."""
        with _transaction(self.path, self.SCHEMA) as db:
            row = db.execute("SELECT status FROM bookings WHERE key = ?", (key,)).fetchone()
            if row is None:
                status = "REFUSED" if flight == SOLD_OUT else "BOOKED"
                db.execute(
                    "INSERT INTO bookings (key, trip, flight, status) VALUES (?, ?, ?, ?)",
                    (key, trip, flight, status),
                )
            else:
                status = row[0]
        if status == "BOOKED":
            return {"ticket": f"TK-{trip}", "flight": flight}
        if status == "REFUSED":
            raise Refused(f"flight {flight} is sold out")
        raise Refused(f"booking {key} was cancelled before it was made")

    def cancel(self, key: str, trip: str) -> dict[str, Any]:
        """Cancel the booking made under ``key``; with none yet, refuse it for good."""
        with _transaction(self.path, self.SCHEMA) as db:
            row = db.execute("SELECT flight, status FROM bookings WHERE key = ?", (key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO bookings (key, trip, flight, status) "
                    "VALUES (?, ?, NULL, 'CANCELLED_FIRST')",
                    (key, trip),
                )
                return {"cancelled": False}
            flight, status = row
            if status != "BOOKED":
                return {"cancelled": False}  # nothing held: refused, or undone already
            if flight == NON_REFUNDABLE:
                raise Refused(f"tickets on flight {flight} cannot be cancelled")
            db.execute("UPDATE bookings SET status = 'CANCELLED' WHERE key = ?", (key,))
            return {"cancelled": True}

    def voucher(self, key: str) -> dict[str, Any]:
        """Turn a booked ticket into a voucher for a later flight."""
        with _transaction(self.path, self.SCHEMA) as db:
            changed = db.execute(
                "UPDATE bookings SET status = 'VOUCHER' WHERE key = ? AND status = 'BOOKED'",
                (key,),
            ).rowcount
            return {"voucher": bool(changed)}

    def statuses(self) -> dict[str, str]:
        """Trip -> the status of its booking (for the invariants)."""
        with _transaction(self.path, self.SCHEMA) as db:
            return dict(db.execute("SELECT trip, status FROM bookings").fetchall())


class CardProvider:
    """Charges by key: CHARGED or DECLINED; ``status`` tells what became of a key."""

    SCHEMA = """
        CREATE TABLE charges (
            key TEXT PRIMARY KEY, trip TEXT NOT NULL, amount INTEGER NOT NULL,
            status TEXT NOT NULL, requests INTEGER NOT NULL
        );
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def charge(self, key: str, trip: str, card: str, amount: int) -> dict[str, Any]:
        """Charge ``amount`` cents to ``card`` (once per key)."""
        with _transaction(self.path, self.SCHEMA) as db:
            row = db.execute(
                "SELECT status, requests FROM charges WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                status = "DECLINED" if card.startswith("card-declined-") else "CHARGED"
                requests = 1
                db.execute(
                    "INSERT INTO charges (key, trip, amount, status, requests) "
                    "VALUES (?, ?, ?, ?, 1)",
                    (key, trip, amount, status),
                )
            else:
                status, requests = row[0], row[1] + 1
                db.execute("UPDATE charges SET requests = ? WHERE key = ?", (requests, key))
        if status == "DECLINED":
            raise Refused("card declined")
        if card.startswith("card-lost-") or (card.startswith("card-slow-") and requests <= 2):
            raise Unavailable("the card provider did not answer in time")
        return {"charge": f"CH-{trip}", "amount": amount}

    def status(self, key: str) -> dict[str, Any]:
        """What became of the charge under ``key``, as a sagakit status answer."""
        with _transaction(self.path, self.SCHEMA) as db:
            row = db.execute(
                "SELECT trip, amount, status FROM charges WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return {"state": "not_found"}
        trip, amount, status = row
        if status == "DECLINED":
            return {"state": "failed", "reason": "card declined"}
        return {"state": "done", "result": {"charge": f"CH-{trip}", "amount": amount}}

    def charged(self) -> dict[str, int]:
        """Trip -> cents charged (for the invariants)."""
        with _transaction(self.path, self.SCHEMA) as db:
            rows = db.execute("SELECT trip, amount FROM charges WHERE status = 'CHARGED'")
            return {trip: amount for trip, amount in rows.fetchall()}


class Mailer:
    """Sends each mail once per key; busy for the first tries to ``trv-flaky-*``."""

    SCHEMA = """
        CREATE TABLE mails (
            key TEXT PRIMARY KEY, trip TEXT NOT NULL, traveller TEXT NOT NULL,
            sent INTEGER NOT NULL, requests INTEGER NOT NULL
        );
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, key: str, trip: str, traveller: str) -> dict[str, Any]:
        """Send the confirmation of ``trip`` to the traveller's address on file."""
        if traveller.startswith("trv-nomail-"):
            raise Refused(f"no e-mail address on file for {traveller}")
        with _transaction(self.path, self.SCHEMA) as db:
            db.execute(
                "INSERT INTO mails (key, trip, traveller, sent, requests) VALUES (?, ?, ?, 0, 0) "
                "ON CONFLICT (key) DO NOTHING",
                (key, trip, traveller),
            )
            db.execute("UPDATE mails SET requests = requests + 1 WHERE key = ?", (key,))
            (requests,) = db.execute("SELECT requests FROM mails WHERE key = ?", (key,)).fetchone()
            busy = traveller.startswith("trv-flaky-") and requests <= 2
            if not busy:
                db.execute("UPDATE mails SET sent = 1 WHERE key = ?", (key,))
        if busy:
            raise Unavailable("the mail server is busy")
        return {"mail": f"M-{trip}"}

    def sent(self) -> dict[str, int]:
        """Trip -> confirmations sent (for the invariants)."""
        with _transaction(self.path, self.SCHEMA) as db:
            rows = db.execute("SELECT trip, SUM(sent) FROM mails GROUP BY trip").fetchall()
        return {trip: int(n) for trip, n in rows if n}


class Partners:
    """The three partners, with their files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.airline = Airline(directory / "airline.db")
        self.cards = CardProvider(directory / "cards.db")
        self.mailer = Mailer(directory / "mail.db")
