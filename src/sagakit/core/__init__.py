"""The pure core: definitions, envelopes, instances and the state machine (no I/O)."""
