"""Benchmarks of brainloop's components (run as modules: ``python -m bench.<name>``)."""
