"""Benchmarks run by a person: ``python -m ksdk.bench experts`` (CPU routed experts)."""
