"""Benchmark scenarios: each module defines `run(quick: bool) -> list[harness.Row]`."""
