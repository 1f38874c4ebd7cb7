"""`python -m bench`: measures the sequencer + ledger pipeline against its own ceilings.

See docs/benchmark.md. The command starts everything itself (PostgreSQL unless DATABASE_URL is
set, a fresh database, both services as subprocesses, a raw gRPC echo server, a load generator
process and pgbench), runs the workloads, audits every one for exactness, and writes a report.
"""
