"""The ``moe2`` command line: one console script with subcommands."""
