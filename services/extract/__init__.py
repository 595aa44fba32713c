"""skybus: services.extract."""
