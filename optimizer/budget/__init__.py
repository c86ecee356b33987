"""Optimizing what the user pays for: predicted latency and bytes per layer, and the budget search."""
