"""SQL scripts of the stores, loaded with importlib.resources."""
