"""The `twinfer` command: the entry point, shared options and one module per subcommand."""
