"""Tally's benchmark harness (``python -m benchmarks``; see docs/performance.md).

Not part of the installed packages: it runs from a source checkout, drives Tally through its public
surface (HTTP ingest and usage queries) and touches the broker and the store directly only to
measure ceilings and to write history.
"""
