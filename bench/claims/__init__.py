"""The field's claims reproduced at small scale: one script per claim (``python -m
bench.claims.<name>``), each printing a table and writing a PNG; figures in BENCHMARKS.md."""
