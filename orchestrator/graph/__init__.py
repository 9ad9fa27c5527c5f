"""The graph, without a wire: a checked spec compiled into a plan (plan.py), run by the engine
(deadlines, retries, partial results), its aggregators, and the span of each model step."""
