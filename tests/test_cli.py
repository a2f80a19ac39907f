import subprocess
import sys

from proxytune_jax import cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_console_script_help_runs():
    res = subprocess.run([sys.executable, "-m", "proxytune_jax.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "generate" in res.stdout
