"""One-question benchmarks, each its own `python -m bench.probes.X`: Python calls and files per
request (calls), the cost of TLS (tls), batch rows/s against online requests/s (throughput)."""
