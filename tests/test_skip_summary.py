"""The test run's skip summary (tests/conftest.py pytest_terminal_summary): one line per reason with a
count, in the form .ci/run's stage 2 greps for skips that a package it installs should have
prevented."""

from __future__ import annotations

import re
import types
from pathlib import Path

import conftest

CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"


class _Reporter:
    """What the hook uses of pytest's TerminalReporter: ``stats``, ``section``, ``write_line``."""

    def __init__(self, reasons):
        self.stats = {"skipped": [types.SimpleNamespace(longrepr=("tests/t.py", 3, f"Skipped: {r}")) for r in reasons]}
        self.lines: list[str] = []

    def section(self, title, sep="="):
        self.lines.append(f"--- {title}")

    def write_line(self, line):
        self.lines.append(line)


def _summary(reasons):
    reporter = _Reporter(reasons)
    conftest.pytest_terminal_summary(reporter, 0, None)
    return reporter.lines


def test_one_line_per_reason_with_its_count_most_frequent_first():
    lines = _summary(
        ["needs CuPy and a GPU"] * 3 + ["could not import 'torch': No module named 'torch'"] + ["needs CuPy and a GPU"]
    )
    assert lines == [
        "--- 5 skipped, for 2 reasons",
        "SKIPPED 4 tests: needs CuPy and a GPU",
        "SKIPPED 1 test: could not import 'torch': No module named 'torch'",
    ]
    assert _summary([]) == []


def test_ci_stage_2_finds_a_could_not_import_skip_in_the_summary():
    """.ci/run's pattern (the grep -E after stage 2's pytest) matches the summary's line for a missing
    package and no other line."""
    pattern = re.search(r'grep -E "([^"]*could not import[^"]*)"', CI_RUN.read_text()).group(1)
    lines = _summary(["could not import 'onnx': No module named 'onnx'", "needs CuPy and a GPU"])
    assert [line for line in lines if re.search(pattern, line)] == [
        "SKIPPED 1 test: could not import 'onnx': No module named 'onnx'"
    ]
