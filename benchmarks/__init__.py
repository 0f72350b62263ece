"""Benchmarks: nccl-tests style bus-bandwidth sweeps (``python -m benchmarks.busbw``) and their plots."""
