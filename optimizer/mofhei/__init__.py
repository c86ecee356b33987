"""MOFHEI: HE/2PC-friendly conversion and packing-aware block pruning, with the cost report."""
