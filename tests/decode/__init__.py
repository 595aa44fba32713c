"""Tests of skybus decode (MIPS)."""
