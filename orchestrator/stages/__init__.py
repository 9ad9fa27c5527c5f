"""What stands under a model step: the Stage protocol (base.py), and the Stages stacked on it,
outermost first: response caches, coalescing, every replica of a service as one Stage, and the
retry budget that pays for retries, fail-overs and hedges."""
