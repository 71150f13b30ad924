"""`microgrid backtest`'s pure parts: the rule file, the per-device evaluation in log order
(the alerter's code, with offline silence judged on reading-time gaps), and the peak of each
episode."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts import Reading, ReadingBatch
from contracts.alerting import OfflineRule, RateOfChangeRule, ThresholdRule
from microgrid.backtest import (
    BacktestError,
    Episode,
    Evaluation,
    derived_rule_id,
    load_rule,
    more_extreme,
    parse_rule,
    silence_due_at,
)
from stream_processors.alerting import DeviceState, alert_id, evaluate_reading, evaluate_silence

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
END = T0 + timedelta(hours=1)
SITE = "site-1"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def reading(t: float, device: str = "bat-1", site: str = SITE, **metrics: float) -> Reading:
    r = Reading(device_id=device, site_id=site, device_type="battery", ts=at(t))
    return msgspec.structs.replace(r, **metrics)


def record(*readings: Reading) -> tuple[bytes, bytes]:
    return readings[0].device_id.encode(), msgspec.json.encode(ReadingBatch(list(readings)))


def run(
    rule: Any, readings: list[Reading], end: datetime = END, site: str | None = None
) -> list[Episode]:
    ev = Evaluation("r1", rule, T0, end, site)
    for r in readings:
        ev.record(*record(r))
    return ev.finish()


HOT = ThresholdRule(
    name="hot",
    severity="critical",
    metric="temperature_c",
    op="gt",
    threshold=75,
    clear_threshold=70,
    for_s=10,
)
FREQ = ThresholdRule(
    name="freq", severity="major", metric="frequency_hz", op="outside", low=49.5, high=50.5
)
FALLING = RateOfChangeRule(
    name="soc", severity="warning", metric="soc_pct", op="lt", threshold=0.5, window_s=60
)
SILENT = OfflineRule(name="off", severity="warning", silent_s=120)


# --- the rule file -------------------------------------------------------------------------


def test_a_rule_as_the_api_answers_it_keeps_its_id(tmp_path: Path) -> None:
    answered = {
        "id": "00000000-0000-4000-8000-000000000002",
        "created_at": "2026-11-01T00:00:00Z",
        "updated_at": "2026-11-02T00:00:00Z",
        **msgspec.to_builtins(HOT),
    }
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(answered))
    rule_id, rule = load_rule(path)
    assert rule_id == "00000000-0000-4000-8000-000000000002"
    assert rule == msgspec.structs.replace(
        HOT,
        id=rule_id,
        created_at=datetime(2026, 11, 1, tzinfo=UTC),
        updated_at=datetime(2026, 11, 2, tzinfo=UTC),
    )


def test_a_rule_without_id_gets_one_from_its_content_only() -> None:
    rule_id, _ = parse_rule(msgspec.json.encode(HOT))
    assert rule_id == derived_rule_id(HOT)
    assert rule_id == derived_rule_id(msgspec.structs.replace(HOT, enabled=False))
    assert rule_id != derived_rule_id(msgspec.structs.replace(HOT, threshold=76))
    reordered = json.dumps(dict(reversed(list(msgspec.to_builtins(HOT).items()))))
    assert parse_rule(reordered.encode())[0] == rule_id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not JSON"),
        ('{"kind": "threshold"}', "is not a valid alert rule: Object missing required field"),
        ('{"kind": "sms", "name": "x", "severity": "major"}', "Invalid value 'sms'"),
        (
            '{"kind": "threshold", "name": "x", "severity": "major", "metric": "soc_pct",'
            ' "op": "outside", "low": 5, "high": 1, "threshold": 3}',
            "low: an outside rule needs low < high; threshold: an outside rule uses low and high",
        ),
        (
            '{"kind": "offline", "name": "x", "severity": "major", "silent_s": 60,'
            ' "scope": {"site_id": "a", "device_id": "b"}}',
            "scope: give at most one of device_id, site_id, device_type",
        ),
    ],
)
def test_a_bad_rule_is_refused_with_its_problems(text: str, message: str) -> None:
    with pytest.raises(BacktestError, match="rule") as exc:
        parse_rule(text.encode())
    assert message in str(exc.value)


def test_a_missing_rule_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(BacktestError, match=r"cannot read rule file .*missing\.json"):
        load_rule(tmp_path / "missing.json")


# --- evaluation in log order, as the alerter ------------------------------------------------


def alerter(rule: Any, readings: list[Reading]) -> list[tuple[str, str, datetime]]:
    """The alerter's code run directly: (alert id, kind, at) of every event."""
    state = DeviceState("bat-1", SITE, "battery")
    return [
        (e.alert_id, e.kind, e.at)
        for r in readings
        for e in evaluate_reading({"r1": rule}, r, state)
    ]


def test_episodes_are_the_alerters_edges_with_their_peak() -> None:
    temps = [60, 80, 82, 90, 72, 74, 65, 60, 76, 77, 78, 69, 79, 80, 81]  # a reading each 5 s
    readings = [reading(5 * i, temperature_c=t) for i, t in enumerate(temps)]
    events = alerter(HOT, readings)
    episodes = run(HOT, readings)
    opened = [(i, a) for i, k, a in events if k == "opened"]
    cleared = {i: a for i, k, a in events if k == "cleared"}
    assert [(e.alert_id, e.opened_at, e.cleared_at) for e in episodes] == [
        (i, a, cleared.get(i)) for i, a in opened
    ]
    assert [e.peak for e in episodes] == [90, 78, 81]  # the last one still open at the end
    assert episodes[0].alert_id == alert_id("r1", "bat-1", at(5))  # since the first breach
    assert (episodes[0].opened_at, episodes[0].cleared_at) == (at(15), at(30))


def test_the_peak_of_an_outside_rule_is_the_value_furthest_from_the_band() -> None:
    freqs = [50.0, 50.8, 49.0, 50.6, 50.0]
    episodes = run(FREQ, [reading(i, frequency_hz=f) for i, f in enumerate(freqs)])
    assert [(e.opened_at, e.cleared_at, e.peak) for e in episodes] == [(at(1), at(4), 49.0)]
    assert more_extreme(FREQ, 50.8, 49.0) == 49.0
    assert more_extreme(FREQ, 51.1, 49.0) == 51.1


def test_the_peak_of_a_rate_rule_is_the_fastest_change_it_computed() -> None:
    # SoC falls 1 %/s for 20 s, then 3 %/s for 5 s, then holds for two minutes
    socs = [80 - i for i in range(21)] + [60 - 3 * i for i in range(1, 6)] + [45] * 120
    readings = [reading(i, soc_pct=v) for i, v in enumerate(socs)]
    [episode] = run(FALLING, readings)
    assert episode.opened_at == at(1)
    assert episode.peak is not None and episode.peak < -1
    # the rate at the fastest reading is what the rule computed over its samples (window 60 s)
    assert episode.peak == pytest.approx((45 - 80) / 25)
    assert episode.cleared_at is not None
    assert more_extreme(FALLING, -1.0, -2.0) == -2.0
    both = msgspec.structs.replace(FALLING, op=None)
    assert more_extreme(both, -1.0, 2.0) == 2.0 and more_extreme(both, -3.0, 2.0) == -3.0


def test_readings_are_evaluated_in_log_order_and_a_late_one_is_ignored_as_live() -> None:
    readings = [reading(0, temperature_c=80), reading(20, temperature_c=80)]
    late = reading(10, temperature_c=60)  # would have cleared, had it come in time
    ev = Evaluation("r1", HOT, T0, END)
    for r in (readings[0], readings[1], late, readings[1]):
        ev.record(*record(r))
    [episode] = ev.finish()
    assert (episode.opened_at, episode.cleared_at) == (at(20), None)
    assert ev.evaluated == (4, 2)


def test_only_the_range_the_site_and_records_the_alerter_takes_are_evaluated() -> None:
    ev = Evaluation("r1", HOT, at(10), at(100), "site-1")
    ev.record(*record(reading(0, temperature_c=90)))  # before the range
    ev.record(*record(reading(10, temperature_c=90), reading(20, temperature_c=90)))
    ev.record(*record(reading(30, device="other", site="site-2", temperature_c=90)))
    ev.record(b"bat-2", msgspec.json.encode(ReadingBatch([reading(30, temperature_c=90)])))
    ev.record(b"bat-1", b"not json")
    ev.record(*record(reading(100, temperature_c=50)))  # at --to: excluded; the device is done
    ev.record(*record(reading(50, temperature_c=50)))  # older than that one: ignored live too
    [episode] = ev.finish()
    assert (episode.alert_id, episode.opened_at, episode.cleared_at) == (
        alert_id("r1", "bat-1", at(10)),
        at(20),
        None,
    )
    assert ev.counts.undecodable == 2
    assert ev.applied_to == 1


def test_a_device_that_moved_sites_keeps_the_state_it_has_live_and_site_picks_alerts() -> None:
    # hot on site-1, moved to site-2 at t=60 and cooled there, reporting every 30 s
    moved = [
        reading(t, site="site-1" if t < 60 else "site-2", temperature_c=90 if t < 60 else 50)
        for t in range(0, 600, 30)
    ]
    [live] = run(HOT, moved)
    assert (live.site_id, live.opened_at, live.cleared_at) == ("site-1", at(30), at(60))
    assert run(HOT, moved, site="site-1") == [live]  # cleared, as live, by a site-2 reading
    assert run(HOT, moved, site="site-2") == []
    assert run(SILENT, moved, site="site-1") == []  # the device never went silent


def test_a_disabled_rule_is_back_tested_as_if_enabled() -> None:
    off = msgspec.structs.replace(HOT, enabled=False)
    assert len(run(off, [reading(0, temperature_c=90), reading(10, temperature_c=90)])) == 1


# --- offline rules: silence judged on reading-time gaps -------------------------------------


def test_silence_is_due_just_past_silent_s() -> None:
    due = silence_due_at(SILENT, at(0))
    state = DeviceState("bat-1", SITE, "battery", last_ts=at(0))
    assert evaluate_silence({"r1": SILENT}, state.copy(), due - timedelta(microseconds=1)) == []
    [event] = evaluate_silence({"r1": SILENT}, state, due)
    assert event.alert_id == alert_id("r1", "bat-1", at(0))


def test_a_gap_longer_than_silent_s_opens_at_the_due_moment_and_the_next_reading_clears() -> None:
    times = [0, 60, 120, 400, 460, 580, 700]  # gaps of 280 s; 120 s (not more) twice
    episodes = run(SILENT, [reading(t, power_kw=1) for t in times], end=at(701))
    assert [(e.alert_id, e.opened_at, e.cleared_at, e.peak) for e in episodes] == [
        (alert_id("r1", "bat-1", at(120)), silence_due_at(SILENT, at(120)), at(400), 280.0)
    ]


def test_silence_at_the_end_of_the_range_stays_open_and_nothing_past_it_is_invented() -> None:
    readings = [reading(0, power_kw=1), reading(100, power_kw=1)]
    assert run(SILENT, readings, end=at(220)) == []  # silent exactly 120 s at --to: not more
    [episode] = run(SILENT, readings, end=at(500))
    assert episode.opened_at == silence_due_at(SILENT, at(100))
    assert (episode.cleared_at, episode.peak) == (None, 400.0)
    # a reading past --to ends the device's evaluation, but not the silence before --to
    [episode] = run(SILENT, [*readings, reading(600, power_kw=1)], end=at(500))
    assert (episode.cleared_at, episode.peak) == (None, 400.0)


def test_silence_counts_from_a_devices_first_reading_in_the_range() -> None:
    assert run(SILENT, [reading(3000, power_kw=1)], end=at(3100)) == []
