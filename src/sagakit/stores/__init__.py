"""Stores: one service's database behind the :mod:`sagakit.stores.base` protocols."""
