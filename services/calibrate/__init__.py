"""skybus: services.calibrate."""
