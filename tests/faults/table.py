"""The fault suite's table: one row per scenario, printed at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    sent: int  # readings the client tried to send (each once, however often retried)
    accepted: int  # readings answered 202 (or acknowledged by the broker, for Kafka clients)
    stored: int  # distinct readings of those found in PostgreSQL
    duplicates: int  # stored rows beyond one per reading
    lost: int  # accepted but not stored
    recovery_s: float | None  # from the fault's end to the first reading stored after it
    note: str = ""


ROWS: list[Row] = []
SKIPPED: list[tuple[str, str]] = []  # (scenario, reason)


def record(row: Row) -> None:
    ROWS.append(row)


def skipped(scenario: str, reason: str) -> None:
    SKIPPED.append((scenario, reason))


def render() -> list[str]:
    head = ("scenario", "sent", "accepted", "stored", "duplicates", "lost", "recovery")
    body = [
        (
            r.scenario,
            str(r.sent),
            str(r.accepted),
            str(r.stored),
            str(r.duplicates),
            str(r.lost),
            "-" if r.recovery_s is None else f"{r.recovery_s:.1f} s",
        )
        for r in ROWS
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    out = [line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)]
    out += [f"{name}: skipped ({reason})" for name, reason in SKIPPED]
    return out
