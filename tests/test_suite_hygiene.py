"""The suite and CI themselves: tests print nothing past pytest's capture, CI installs into a fresh environment."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_test_writes_past_pytest_capture():
    """A test's numbers go to its report (record_property) or its assertion messages, not through
    `capsys.disabled()` into the middle of pytest's progress line."""
    offenders = [f"{path.name}:{n}" for path in sorted((ROOT / "tests").glob("*.py"))
                 if path.name != pathlib.Path(__file__).name
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"capsys\.disabled\(|capfd\.disabled\(|sys\.__stdout__", line)]
    assert not offenders, f"tests writing past pytest's capture: {', '.join(offenders)}"


def test_ci_installs_into_a_fresh_environment():
    """`.ci/run` hands make a new, empty environment directory: `make -n` shows the venv made there, not .venv."""
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'make test VENV="\$environment/venv"', script) and "mktemp -d" in script
    dry = subprocess.run(["make", "-n", "test", "VENV=/nonexistent/fresh/venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "python3 -m venv /nonexistent/fresh/venv" in dry and ".venv" not in dry
