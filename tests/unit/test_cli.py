import subprocess
import sys

from outlierlab.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: outlierlab" in out


def test_unknown_command_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "outlierlab", "no-such-command"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_import_does_not_pull_transformers():
    code = "import outlierlab, sys; outlierlab.metrics; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
