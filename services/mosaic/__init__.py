"""skybus: services.mosaic."""
