"""proxytune_jax._quiet: transformers' "PyTorch was not found" notice is gone when torch is missing, and
nothing else transformers logs is hidden."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from proxytune_jax._quiet import TORCH_NOTICE_PREFIX, silence_transformers_torch_notice

REPO = Path(__file__).resolve().parents[1]

# torch hidden from this interpreter: ``sys.modules["torch"] = None`` makes ``importlib.util.find_spec("torch")``
# return None (transformers' availability check) and ``import torch`` raise ImportError.
CHILD = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None
    if sys.argv[1] == "quiet":
        from proxytune_jax._quiet import silence_transformers_torch_notice
        silence_transformers_torch_notice()
    import transformers
    from transformers.utils import is_torch_available
    assert not is_torch_available()
    transformers.utils.logging.get_logger("transformers").warning("another transformers warning")
""")


def _run_child(mode: str) -> str:
    env = dict(os.environ)
    for var in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "CI"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_notice_printed_without_helper_and_gone_with_it():
    loud = _run_child("loud")
    assert TORCH_NOTICE_PREFIX in loud  # the notice this helper exists for (guards against a transformers change)
    quiet = _run_child("quiet")
    assert TORCH_NOTICE_PREFIX not in quiet
    assert "another transformers warning" in quiet  # other warnings still show


def test_filter_drops_only_the_notice_and_is_added_once():
    logger = logging.getLogger("transformers")
    before = list(logger.filters)
    # start without the filter: an earlier test in this process (the demo, an experiment) may have added it
    logger.filters[:] = [f for f in before if type(f).__name__ != "_DropTorchNotice"]
    start = list(logger.filters)
    try:
        silence_transformers_torch_notice()
        silence_transformers_torch_notice()
        added = [f for f in logger.filters if f not in start]
        assert len(added) == 1
        (flt,) = added

        def record(msg):
            return logging.LogRecord("transformers", logging.WARNING, __file__, 1, msg, None, None)
        assert not flt.filter(record(TORCH_NOTICE_PREFIX + " Models won't be available ..."))
        assert flt.filter(record("PyTorch 2.6 or newer is recommended"))
        assert flt.filter(record("some other warning"))
    finally:
        logger.filters[:] = before
