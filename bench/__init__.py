"""skybus: bench."""
