"""Subcommands of the ``proxytune`` console script (one module each)."""
