"""Tests of the peer benchmarks (smoke only: timings are reported, never asserted)."""
