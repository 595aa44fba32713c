"""skybus: shared.instruments."""
