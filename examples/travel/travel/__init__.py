"""The user guide's running example: a travel booking as a sagakit app.

A trip books a flight (a local step: the worker calls the airline), then a hotel room
(a command to the hotel service, a participant in its own process with its own
database), then charges the traveller's card (the pivot: the point of no return) and
finally sends a confirmation e-mail (a retriable step: after the pivot it must happen).

Put ``examples/travel`` on ``PYTHONPATH`` and run it with ``--app travel.app:app``::

    export PYTHONPATH=$PWD/examples/travel
    sagakit demo --app travel.app:app --orders 50

The airline, the card provider and the mail service are fakes of external systems
(:mod:`travel.partners`); the guide (docs/) explains every part.
"""
