"""Measurement: decoding benchmarks, their plots, and weight drift."""
