"""Errors a user can cause and fix. The message always names the fix."""


class UserError(ValueError):
    """A wrong path, mismatched tokenizers, bad hyperparameters, ... (the CLI prints it without a traceback)."""
