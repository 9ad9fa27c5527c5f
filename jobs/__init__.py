"""Batch and asynchronous serving through the same graphs as online serving.

store     the job and prediction store (SQLAlchemy: SQLite by default, PostgreSQL for replicas)
datasets  NPY / NPZ / CSV / Parquet rows with keys
batch     a dataset through a graph into `predictions`, resumable and idempotent
service   the jobs gRPC service (proto/jobs/jobs.proto): submit now, fetch or stream later
worker    runs queued jobs through the orchestrator over OIP, with leases
client    the jobs service's client; cli: the `batch`, `submit`, `result`, `jobs` commands
"""
