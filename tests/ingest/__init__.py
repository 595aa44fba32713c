"""Tests of skybus ingest (MIPS)."""
