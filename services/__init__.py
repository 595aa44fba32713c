"""skybus: services."""
