"""What a node tells about itself: Prometheus metrics, OpenTelemetry tracing and structured logs."""
