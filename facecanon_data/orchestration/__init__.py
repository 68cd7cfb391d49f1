"""Scheduling: which stage runs where (Dask) — never geometry."""
