"""Measuring the engine: labelled data sets, accuracy metrics and side-by-side speed benchmarks."""
