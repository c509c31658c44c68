"""The reference checkout: Order, Payment, Inventory and Shipping, each with its own database."""
