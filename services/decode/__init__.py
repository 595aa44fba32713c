"""skybus: services.decode."""
