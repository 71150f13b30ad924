"""The fault suite (`make test-faults`): the platform under steady load while one part after
another fails; every scenario adds a row to the table printed at the end."""

from __future__ import annotations

import pytest

from tests.faults import table


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if table.ROWS or table.SKIPPED:
        terminalreporter.section("fault table")
        for line in table.render():
            terminalreporter.write_line(line)
        notes = [(r.scenario, r.note) for r in table.ROWS if r.note]
        if notes:
            terminalreporter.write_line("")
            for scenario, note in notes:
                terminalreporter.write_line(f"{scenario}: {note}")
