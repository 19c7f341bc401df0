"""Benchmark harness: runs tritonize and the PyTorch engines it must beat side by side on one GPU."""
