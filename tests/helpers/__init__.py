"""Test-only helpers: party processes started as a user would, an in-memory transport, an audit hook."""
