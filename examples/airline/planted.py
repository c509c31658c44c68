"""Planted bugs: the airline with a seat hold checked by a read, then written without a
condition. Each is a flag of the real code (:func:`sagakit_airline.seats.take_seat`).

* :func:`read_then_write`: the hold trusts the seats left that the booking's quote read
  (a SELECT in the quote's transaction) and adds itself to the flight's held seats
  with no condition. Two bookings quoted the last seat, both hold it: the simulator
  sees the flight oversold (``oversold`` at the moment it happens, and more seats sold
  than the aircraft has at the end)::

      sagakit simulate --app sagakit_airline.planted:read_then_write --seeds 200

* :func:`read_then_write_in_tx`: the same mistake inside the hold's own transaction
  (SELECT the counts, check in Python, write ``held = <count + 1>``). The simulator
  runs one transaction at a time, so it cannot see it; ``sagakit check`` runs the
  hold's real transactions side by side in every interleaving, as PostgreSQL under
  READ COMMITTED may, and finds the lost update::

      sagakit check sagakit_airline.sagas:booking \\
          --races sagakit_airline.planted:read_then_write_in_tx_races
"""

from __future__ import annotations

from sagakit import App
from sagakit.testing.races import Race

from .app import build_app
from .races import races_of


def read_then_write() -> App:
    """The airline whose hold trusts the quote's read (the simulator catches it)."""
    return build_app(bug="read_then_write")


def read_then_write_in_tx() -> App:
    """The airline whose hold reads, then writes, in one transaction (the races do)."""
    return build_app(bug="read_then_write_in_tx")


def read_then_write_in_tx_races() -> list[Race]:
    """The airline's races run against :func:`read_then_write_in_tx`."""
    return races_of(read_then_write_in_tx())
