"""Side-by-side benchmarks of adaptflow: `python -m benchmarks.run [--smoke] [--only NAME]` (see run.py)."""
