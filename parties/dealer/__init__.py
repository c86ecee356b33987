"""The dealer: its sessions without a transport (core.py), a thin gRPC service over them (service.py), and each party's client of it (client.py)."""
