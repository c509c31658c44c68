"""The runtime: orchestrator, participants, relay, timers and the loops that drive them."""
