"""skybus: simulator."""
