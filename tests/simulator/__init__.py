"""Tests of skybus simulator (MIPS)."""
