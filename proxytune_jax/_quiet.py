"""Silence the one import-time notice of ``transformers`` that means nothing to a JAX user.

Without PyTorch installed, ``import transformers`` prints to stderr

    [transformers] PyTorch was not found. Models won't be available and only tokenizers, configuration and
    file/data utilities can be used.

(``transformers/__init__.py``, through ``logger.warning_advice`` on the library's root logger
``"transformers"``, whose stderr handler transformers installs itself). This library uses transformers only for tokenizers, configurations and
checkpoint files, so the notice is noise for it.

:func:`silence_transformers_torch_notice` adds a :class:`logging.Filter` to that logger which drops exactly
this message and nothing else: every other transformers warning still shows, no environment variable is
changed (``TRANSFORMERS_VERBOSITY=error`` or ``TRANSFORMERS_NO_ADVISORY_WARNINGS=1`` would hide other
messages too, and would leak into child processes). It uses only the standard ``logging`` module, so it can
run **before** transformers is imported, which it must: the notice is printed once, at the first import.
"""
from __future__ import annotations

import logging

TRANSFORMERS_LOGGER = "transformers"
TORCH_NOTICE_PREFIX = "PyTorch was not found."


class _DropTorchNotice(logging.Filter):
    """Rejects the records whose message starts with :data:`TORCH_NOTICE_PREFIX`; passes every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a malformed record is not ours to judge
            return True
        return not message.startswith(TORCH_NOTICE_PREFIX)


def silence_transformers_torch_notice() -> None:
    """Drop transformers' "PyTorch was not found" notice. Call it before the first ``import transformers``
    (directly or through a module that imports it); calling it again is harmless (one filter at most)."""
    logger = logging.getLogger(TRANSFORMERS_LOGGER)
    if not any(isinstance(f, _DropTorchNotice) for f in logger.filters):
        logger.addFilter(_DropTorchNotice())
