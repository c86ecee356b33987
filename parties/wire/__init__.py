"""The wire: the gRPC transport and its framing, mutual TLS, network shaping."""
