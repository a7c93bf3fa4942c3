"""Measurements: engine benchmark, streaming-audio drift, resume drift."""
