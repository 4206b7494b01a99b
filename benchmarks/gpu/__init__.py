"""The GPU check (``make gpu-check``): real-size networks on one GPU, and the same code tiny on CPU."""
