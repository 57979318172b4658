"""Job specs: small per-component configs composed by `JobSpec` (see job.py)."""
