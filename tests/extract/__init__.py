"""Tests of services.extract."""
