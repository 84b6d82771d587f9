"""Evaluation: generated tasks, protocols, metrics, ablations and benchmarks on real models."""
