"""The ops' secure evaluations run on other domains than shares, for the range check.

Each module holds one backend that implements the `Backend` interface without a peer, so that
`Op.secure` runs on it unchanged and what an op truncates, divides and compares is written
once, in its secure evaluation:

- `plain.py`: float64 values: what calibration samples (or a client's own inputs) reach;
- `interval.py`: elementwise intervals: a sound bound for every input of a declared range;
- `error.py`: per-element magnitudes and mean-square errors: a statistical error estimate;
- `fixed_point.py`: the fixed-point computation itself, without the shares (the shares'
  randomness enters only as the truncations' stochastic rounding): a run's error, simulated.

Every one of them records, per node (`records.py`), what the secure protocol would truncate,
divide and compare. Ops whose secure structure gives a loose bound on a domain refine it in
their own `interval` / `error` methods (`ops.registry.Op`).
"""
