"""The reference checkout: Order, Payment, Inventory and Shipping, each with its own database.

``sagakit_checkout:app`` is the checkout as a sagakit app (see :mod:`.app`): every
``sagakit`` process command runs it with ``--app sagakit_checkout:app``.
"""

from .app import app

__all__ = ["app"]
