"""Testing aids: the kit for your own sagas (a harness on a virtual clock, and its pytest
plugin), fault injection, invariant checks, the deterministic simulator and the checker."""
