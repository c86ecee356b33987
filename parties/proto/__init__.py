"""twinfer.parties.proto."""
