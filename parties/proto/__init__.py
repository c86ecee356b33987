"""Generated protobuf and gRPC code for the twinfer wire format (see twinfer.proto)."""
