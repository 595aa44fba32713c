"""skybus: services.ingest."""
