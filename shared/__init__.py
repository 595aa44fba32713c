"""skybus: shared."""
