"""The dealer: its gRPC service, and each party's client of it."""
