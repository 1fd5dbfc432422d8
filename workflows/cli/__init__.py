"""The ``cai`` command: one registry entry per command (:mod:`workflows.cli.registry`), the parser built from it."""
