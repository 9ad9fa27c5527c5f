"""Adaptive batching: concurrent requests joined into one model call, and the row arithmetic it needs."""
