"""What `twinfer bench` runs: latency under network profiles, and sweeps of models x batches x networks."""
