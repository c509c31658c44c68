"""Testing aids: fault injection, invariant checks and (soon) the deterministic simulator."""
