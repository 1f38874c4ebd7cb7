"""The fault campaign of the pipeline: load, faults and audit, shared by the short fault tests
(tests/acceptance/test_faults.py) and the long campaign (`make chaos`, docs/faults.md)."""
