"""The README's commands are accepted as written: every `distiller ...` and `python bench/*.py ...` line of its
shell blocks is parsed by the program's own argument parser (and nothing is run)."""

import argparse
import pathlib
import re
import runpy
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Parsed(BaseException):
    """Raised by the patched parse_args once the arguments parsed: BaseException, so no error handler of the
    program under test takes it for a failure of its own."""


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("distiller ") or line.startswith("python bench/"):
                commands.append(line)
    return commands


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert any(c.startswith("distiller md") for c in commands) and any(c.startswith("python bench/") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command, monkeypatch, capsys):
    # `[--option value]` marks an optional part in the README: it must parse too, so the brackets go.
    words = shlex.split(command.replace("[", "").replace("]", ""))

    def parse_args(parser, args=None, namespace=None):
        original_parse_args(parser, args, namespace)  # exits 2 naming an unknown option or a bad value
        raise Parsed

    original_parse_args = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    try:
        if words[0] == "distiller":
            from distiller.cli import main

            main(words[1:])
        else:
            monkeypatch.setattr("sys.argv", [str(ROOT / words[1]), *words[2:]])
            module = runpy.run_path(str(ROOT / words[1]), run_name="readme_check")
            module["main"]()
    except Parsed:
        return
    except SystemExit as stop:
        assert stop.code == 0 and "--help" in words, f"{command!r} was refused: {capsys.readouterr().err}"
        return
    pytest.fail(f"{command!r} did not reach its argument parser")


def test_the_readme_defines_accuracy_retained_where_it_first_uses_it():
    text = (ROOT / "README.md").read_text()
    first = text.lower().index("accuracy retained")
    assert "1 − ‖F_student − F_teacher‖ / ‖F_teacher‖" in text[first:first + 400]


def test_the_readme_says_how_to_run_distiller_outside_make():
    text = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in text and "export FENNOL_PMC_DIR=" in text
