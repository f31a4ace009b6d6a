"""Metric writers (console, JSONL, TensorBoard), the status heartbeat, MFU and profiling."""
