import subprocess
import sys

import pytest

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


def test_overrides_may_follow_options(monkeypatch):
    import outlierlab.commands.train as train_cmd

    seen = {}
    monkeypatch.setattr(train_cmd, "run", lambda args: seen.update(vars(args)) or 0)
    from outlierlab.cli import build_parser  # rebuilt so the patched run is registered

    _, extra = build_parser().parse_known_args(["train", "a.b=1", "--quiet", "out=x"])
    assert extra == ["out=x"]  # what argparse alone leaves over
    assert main(["train", "a.b=1", "--quiet", "out=x"]) == 0
    assert seen["overrides"] == ["a.b=1", "out=x"] and seen["quiet"] is True


def test_stray_argument_after_overrides_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "a.b=1", "--quiet", "stray"])
    assert exc.value.code == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def _all_parsers(parser, prefix=()):
    """(argv prefix, parser) for the top parser and every (nested) sub-command."""
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*prefix, name))


def test_every_help_text_is_plain_whole_sentences(capsys):
    from outlierlab.cli import build_parser

    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) >= 10  # outlierlab, 8 commands, data prepare
    for argv, parser in parsers:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for markup in (":mod:", ":func:", ":class:", ":data:", "`"):
            assert markup not in out, (argv, markup)
        text = parser.description
        assert text and text[0].isupper() and text.endswith("."), (argv, text)


def test_exit_codes_are_documented():
    from pathlib import Path

    from outlierlab.cli import DESCRIPTION
    from outlierlab.errors import EXIT_CODES

    doc = (Path(__file__).parents[2] / "docs" / "ARCHITECTURE.md").read_text()
    section = doc[doc.index("exit code") :]
    for code in EXIT_CODES.values():
        assert f"`{code}`" in section, code
        assert f" {code} " in DESCRIPTION, code


def test_plain_text_drops_rest_markup_and_joins_lines():
    from outlierlab.cli import plain_text

    text = "Uses :mod:`outlierlab.commands`,\n  ``x = 1`` and :class:`~outlierlab.monitor.Mon`."
    assert plain_text(text) == "Uses outlierlab.commands, x = 1 and Mon."
