"""Passes over the graph IR that need the op table: ONNX import and export, rewrites, plaintext
evaluation, validation, the numeric range check and the session's encoding."""
