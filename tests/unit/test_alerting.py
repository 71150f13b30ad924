"""The alerter's pure core: rules x reading x state -> alert events, without any service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import Reading
from contracts.alerting import (
    AlertEvent,
    AlertRuleSpec,
    OfflineRule,
    Op,
    RateOfChangeRule,
    RuleKind,
    RuleScope,
    Severity,
    ThresholdRule,
)
from contracts.readings import DeviceType
from stream_processors.alerting import (
    RATE_SAMPLES,
    DeviceState,
    RuleState,
    alert_id,
    applies,
    evaluate_reading,
    evaluate_silence,
    silence_settled,
)

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DEV = "inv-1"
SITE = "site-1"
DTYPE: DeviceType = "pv_inverter"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def reading(
    t: float,
    temperature_c: float | None = None,
    *,
    device_id: str = DEV,
    site_id: str = SITE,
    device_type: DeviceType = DTYPE,
    power_kw: float | None = None,
    soc_pct: float | None = None,
) -> Reading:
    return Reading(
        device_id=device_id,
        site_id=site_id,
        device_type=device_type,
        ts=at(t),
        temperature_c=temperature_c,
        power_kw=power_kw,
        soc_pct=soc_pct,
    )


def rule(
    id: str = "r1",
    *,
    kind: RuleKind = "threshold",
    name: str | None = None,
    severity: Severity = "major",
    metric: str = "temperature_c",
    op: Op | None = "gt",
    threshold: float | None = 80.0,
    low: float | None = None,
    high: float | None = None,
    clear_threshold: float | None = None,
    for_s: float | None = None,
    window_s: float = 60.0,
    silent_s: float = 300.0,
    scope: RuleScope | None = None,
    enabled: bool = True,
) -> AlertRuleSpec:
    name = name if name is not None else f"rule {id}"
    scope = scope if scope is not None else RuleScope()
    common = {"id": id, "name": name, "severity": severity, "scope": scope, "enabled": enabled}
    if kind == "offline":
        return OfflineRule(**common, silent_s=silent_s)  # type: ignore[arg-type]
    if kind == "rate_of_change":
        assert op != "outside" and threshold is not None
        return RateOfChangeRule(
            **common,  # type: ignore[arg-type]
            metric=metric,
            op=op,
            threshold=threshold,
            window_s=window_s,
            for_s=for_s,
        )
    assert op is not None
    return ThresholdRule(
        **common,  # type: ignore[arg-type]
        metric=metric,
        op=op,
        threshold=threshold,
        low=low,
        high=high,
        clear_threshold=clear_threshold,
        for_s=for_s,
    )


def outside_rule(
    id: str = "r1", low: float = 10.0, high: float = 50.0, for_s: float | None = None
) -> AlertRuleSpec:
    return rule(id, op="outside", threshold=None, low=low, high=high, for_s=for_s)


def rate_rule(
    id: str = "roc",
    *,
    op: Op | None = "gt",
    threshold: float = 1.0,
    window_s: float = 60.0,
    for_s: float | None = None,
    metric: str = "temperature_c",
) -> AlertRuleSpec:
    return rule(
        id,
        kind="rate_of_change",
        op=op,
        threshold=threshold,
        window_s=window_s,
        for_s=for_s,
        metric=metric,
    )


def offline_rule(
    id: str = "off",
    silent_s: float = 300.0,
    *,
    scope: RuleScope | None = None,
    enabled: bool = True,
) -> AlertRuleSpec:
    return rule(id, kind="offline", silent_s=silent_s, scope=scope, enabled=enabled)


def rules_of(*rules: AlertRuleSpec) -> dict[str, AlertRuleSpec]:
    return {r.id or "": r for r in rules}


def fresh(
    device_id: str = DEV, site_id: str = SITE, device_type: DeviceType = DTYPE
) -> DeviceState:
    return DeviceState(device_id=device_id, site_id=site_id, device_type=device_type)


def feed(
    rules: dict[str, AlertRuleSpec],
    readings: Iterable[Reading],
    state: DeviceState | None = None,
) -> list[AlertEvent]:
    state = state if state is not None else fresh()
    events: list[AlertEvent] = []
    for r in readings:
        events.extend(evaluate_reading(rules, r, state))
    return events


def series(values: Sequence[float | None], step: float = 10.0) -> list[Reading]:
    return [reading(i * step, v) for i, v in enumerate(values)]


def kinds(events: Iterable[AlertEvent]) -> list[str]:
    return [e.kind for e in events]


def roundtrip(state: DeviceState) -> DeviceState:
    return msgspec.json.decode(msgspec.json.encode(state), type=DeviceState)


# --------------------------------------------------------------------------- threshold: gt


@pytest.mark.parametrize("for_s", [None, 0.0])
def test_gt_opens_immediately_without_for_s(for_s: float | None) -> None:
    rules = rules_of(rule(for_s=for_s))
    state = fresh()
    assert evaluate_reading(rules, reading(0, 70.0), state) == []
    [event] = evaluate_reading(rules, reading(10, 81.0), state)
    assert event.kind == "opened"
    assert event.alert_id == alert_id("r1", DEV, at(10))
    assert event.rule_id == "r1"
    assert event.rule_name == "rule r1"
    assert event.severity == "major"
    assert event.device_id == DEV
    assert event.site_id == SITE
    assert event.at == at(10)
    assert event.value == 81.0
    assert event.message


def test_gt_value_equal_to_threshold_does_not_breach() -> None:
    assert feed(rules_of(rule()), series([80.0, 80.0, 80.0])) == []


def test_gt_first_reading_breaching_opens() -> None:
    events = feed(rules_of(rule()), series([90.0]))
    assert kinds(events) == ["opened"]
    assert events[0].alert_id == alert_id("r1", DEV, at(0))


def test_gt_repeated_breaching_readings_emit_nothing_while_open() -> None:
    events = feed(rules_of(rule()), series([81.0, 95.0, 120.0, 81.0, 100.0]))
    assert kinds(events) == ["opened"]


def test_gt_clears_with_same_id_on_value_at_threshold_by_default() -> None:
    state = fresh()
    rules = rules_of(rule())
    [opened] = evaluate_reading(rules, reading(0, 85.0), state)
    assert evaluate_reading(rules, reading(10, 80.5), state) == []
    [cleared] = evaluate_reading(rules, reading(20, 80.0), state)
    assert cleared.kind == "cleared"
    assert cleared.alert_id == opened.alert_id == alert_id("r1", DEV, at(0))
    assert cleared.at == at(20)
    assert cleared.value == 80.0
    assert cleared.rule_id == "r1"
    assert cleared.rule_name == opened.rule_name
    assert cleared.severity == opened.severity
    assert cleared.device_id == DEV
    assert cleared.site_id == SITE
    assert state.rules["r1"].open_id is None


def test_gt_hysteresis_does_not_flap_between_clear_threshold_and_threshold() -> None:
    rules = rules_of(rule(threshold=80.0, clear_threshold=75.0))
    values = [81.0, 79.0, 76.0, 75.1, 80.0, 79.9, 81.0, 76.0]
    assert kinds(feed(rules, series(values))) == ["opened"]


def test_gt_hysteresis_clears_at_clear_threshold_inclusive() -> None:
    rules = rules_of(rule(threshold=80.0, clear_threshold=75.0))
    events = feed(rules, series([81.0, 77.0, 75.0, 74.0]))
    assert kinds(events) == ["opened", "cleared"]
    assert events[1].at == at(20)
    assert events[1].value == 75.0
    assert events[0].alert_id == events[1].alert_id


def test_gt_after_clear_value_between_thresholds_does_not_reopen() -> None:
    rules = rules_of(rule(threshold=80.0, clear_threshold=75.0))
    events = feed(rules, series([81.0, 70.0, 78.0, 79.9, 80.0]))
    assert kinds(events) == ["opened", "cleared"]


def test_gt_new_episode_has_new_id_from_its_own_start() -> None:
    rules = rules_of(rule())
    events = feed(rules, series([81.0, 82.0, 70.0, 60.0, 90.0, 91.0, 10.0]))
    assert kinds(events) == ["opened", "cleared", "opened", "cleared"]
    first, second = events[0].alert_id, events[2].alert_id
    assert first == events[1].alert_id == alert_id("r1", DEV, at(0))
    assert second == events[3].alert_id == alert_id("r1", DEV, at(40))
    assert first != second


def test_gt_for_s_opens_on_first_reading_at_or_after_for_s() -> None:
    rules = rules_of(rule(for_s=30.0))
    state = fresh()
    assert evaluate_reading(rules, reading(0, 70.0), state) == []
    assert evaluate_reading(rules, reading(10, 85.0), state) == []  # pending starts
    assert state.rules["r1"].pending_since == at(10)
    assert evaluate_reading(rules, reading(20, 85.0), state) == []
    assert evaluate_reading(rules, reading(39.999, 85.0), state) == []
    [opened] = evaluate_reading(rules, reading(40, 85.0), state)  # exactly for_s later
    assert opened.kind == "opened"
    assert opened.at == at(40)
    assert opened.alert_id == alert_id("r1", DEV, at(10))  # episode start, not opening time
    assert state.rules["r1"].pending_since is None
    assert evaluate_reading(rules, reading(50, 85.0), state) == []


def test_gt_for_s_opens_on_late_reading_past_for_s() -> None:
    rules = rules_of(rule(for_s=30.0))
    events = feed(rules, [reading(0, 85.0), reading(100, 85.0)])
    assert kinds(events) == ["opened"]
    assert events[0].at == at(100)
    assert events[0].alert_id == alert_id("r1", DEV, at(0))


def test_gt_for_s_pending_reset_by_non_breaching_reading() -> None:
    rules = rules_of(rule(for_s=30.0))
    state = fresh()
    assert evaluate_reading(rules, reading(0, 85.0), state) == []
    assert evaluate_reading(rules, reading(20, 85.0), state) == []
    assert evaluate_reading(rules, reading(25, 80.0), state) == []  # not above: reset
    assert state.rules["r1"].pending_since is None
    assert evaluate_reading(rules, reading(30, 85.0), state) == []  # pending restarts here
    assert evaluate_reading(rules, reading(59, 85.0), state) == []
    [opened] = evaluate_reading(rules, reading(60, 85.0), state)
    assert opened.alert_id == alert_id("r1", DEV, at(30))


def test_gt_for_s_pending_reset_by_value_between_clear_and_threshold() -> None:
    rules = rules_of(rule(threshold=80.0, clear_threshold=70.0, for_s=30.0))
    events = feed(rules, [reading(0, 85.0), reading(20, 75.0), reading(30, 85.0)])
    assert events == []


def test_gt_for_s_clears_and_a_new_episode_waits_again() -> None:
    rules = rules_of(rule(for_s=20.0))
    events = feed(rules, series([85.0, 85.0, 85.0, 50.0, 85.0, 85.0, 85.0], step=10.0))
    assert kinds(events) == ["opened", "cleared", "opened"]
    assert events[0].at == at(20) and events[0].alert_id == alert_id("r1", DEV, at(0))
    assert events[1].at == at(30) and events[1].alert_id == events[0].alert_id
    assert events[2].at == at(60) and events[2].alert_id == alert_id("r1", DEV, at(40))


# --------------------------------------------------------------------------- threshold: lt


def test_lt_mirrors_gt_with_hysteresis() -> None:
    rules = rules_of(rule(op="lt", threshold=20.0, clear_threshold=25.0))
    values = [30.0, 20.0, 19.9, 15.0, 22.0, 24.9, 19.0, 25.0, 30.0, 21.0, 19.0]
    events = feed(rules, series(values))
    assert kinds(events) == ["opened", "cleared", "opened"]
    assert events[0].at == at(20) and events[0].value == 19.9
    assert events[0].alert_id == events[1].alert_id == alert_id("r1", DEV, at(20))
    assert events[1].at == at(70) and events[1].value == 25.0
    assert events[2].alert_id == alert_id("r1", DEV, at(100))


def test_lt_default_clear_is_threshold() -> None:
    rules = rules_of(rule(op="lt", threshold=20.0))
    events = feed(rules, series([19.0, 19.99, 20.0]))
    assert kinds(events) == ["opened", "cleared"]
    assert events[1].value == 20.0


def test_lt_for_s() -> None:
    rules = rules_of(rule(op="lt", threshold=20.0, for_s=15.0))
    events = feed(rules, series([10.0, 10.0, 30.0, 10.0, 10.0, 10.0]))
    assert kinds(events) == ["opened"]
    assert events[0].at == at(50)
    assert events[0].alert_id == alert_id("r1", DEV, at(30))


# --------------------------------------------------------------------------- threshold: outside


def test_outside_opens_above_high_and_clears_inside() -> None:
    rules = rules_of(outside_rule(low=10.0, high=50.0))
    events = feed(rules, series([30.0, 50.0, 50.1, 60.0, 50.0]))
    assert kinds(events) == ["opened", "cleared"]
    assert events[0].at == at(20)
    assert events[1].at == at(40)
    assert events[0].alert_id == events[1].alert_id == alert_id("r1", DEV, at(20))


def test_outside_opens_below_low_and_clears_at_low() -> None:
    rules = rules_of(outside_rule(low=10.0, high=50.0))
    events = feed(rules, series([10.0, 9.9, 5.0, 10.0, 11.0]))
    assert kinds(events) == ["opened", "cleared"]
    assert events[0].at == at(10)
    assert events[1].at == at(30) and events[1].value == 10.0


def test_outside_stays_open_when_jumping_from_low_side_to_high_side() -> None:
    rules = rules_of(outside_rule(low=10.0, high=50.0))
    events = feed(rules, series([5.0, 60.0, 0.0, 70.0]))
    assert kinds(events) == ["opened"]


def test_outside_respects_for_s() -> None:
    rules = rules_of(outside_rule(low=10.0, high=50.0, for_s=20.0))
    events = feed(rules, series([5.0, 60.0, 30.0, 60.0, 5.0, 60.0]))
    assert kinds(events) == ["opened"]
    assert events[0].at == at(50)
    assert events[0].alert_id == alert_id("r1", DEV, at(30))


# --------------------------------------------------------------------------- rate of change


def test_rate_gt_opens_on_rise_and_clears_when_rate_drops() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0, window_s=60.0))
    state = fresh()
    assert evaluate_reading(rules, reading(0, 20.0), state) == []  # no rate with one sample
    assert evaluate_reading(rules, reading(10, 30.0), state) == []  # 1.0/s: not above
    [opened] = evaluate_reading(rules, reading(20, 41.0), state)  # 21/20 = 1.05/s
    assert opened.kind == "opened"
    assert opened.alert_id == alert_id("roc", DEV, at(20))
    assert opened.value == 41.0
    assert "temperature_c" in opened.message
    assert evaluate_reading(rules, reading(30, 52.0), state) == []  # 32/30: still open
    [cleared] = evaluate_reading(rules, reading(40, 52.0), state)  # 32/40 = 0.8/s
    assert cleared.kind == "cleared"
    assert cleared.alert_id == opened.alert_id
    assert cleared.at == at(40)


def test_rate_gt_ignores_fall() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0))
    assert feed(rules, series([100.0, 50.0, 0.0])) == []


def test_rate_lt_opens_on_fall_faster_than_threshold() -> None:
    rules = rules_of(rate_rule(op="lt", threshold=1.0))
    events = feed(rules, series([100.0, 90.0, 78.0, 200.0]))
    # rates: -1.0 (no), -22/20 = -1.1 (yes), +100/30 (clears)
    assert kinds(events) == ["opened", "cleared"]
    assert events[0].at == at(20)
    assert events[1].at == at(30)


def test_rate_lt_ignores_rise() -> None:
    rules = rules_of(rate_rule(op="lt", threshold=1.0))
    assert feed(rules, series([0.0, 50.0, 100.0])) == []


@pytest.mark.parametrize(("values", "expected"), [([0.0, 20.0], 1), ([100.0, 80.0], 1)])
def test_rate_without_op_uses_absolute_rate(values: list[float], expected: int) -> None:
    rules = rules_of(rate_rule(op=None, threshold=1.0))
    assert len(feed(rules, series(values))) == expected


def test_rate_without_op_equal_magnitude_does_not_breach() -> None:
    rules = rules_of(rate_rule(op=None, threshold=1.0))
    assert feed(rules, series([0.0, 10.0, 0.0])) == []


def test_rate_uses_only_samples_within_window() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0, window_s=30.0))
    state = fresh()
    # A big jump long ago must not count once it has left the window.
    assert evaluate_reading(rules, reading(0, 0.0), state) == []
    assert evaluate_reading(rules, reading(40, 20.0), state) == []  # t=0 is out: one sample
    assert evaluate_reading(rules, reading(50, 25.0), state) == []  # (25-20)/10 = 0.5
    assert all(t >= at(50) - timedelta(seconds=30) for t, _ in state.rules["roc"].samples)
    assert evaluate_reading(rules, reading(60, 30.0), state) == []  # (30-20)/20
    [opened] = evaluate_reading(rules, reading(70, 70.0), state)  # (70-20)/30 = 1.67
    assert opened.kind == "opened"
    # t=40 drops out at t=71; oldest becomes t=50: (75-25)/21 > 1, still open
    assert evaluate_reading(rules, reading(71, 75.0), state) == []
    # oldest within window at t=100 is t=70 (70.0): (71-70)/30 -> clears
    [cleared] = evaluate_reading(rules, reading(100, 71.0), state)
    assert cleared.kind == "cleared"


def test_rate_respects_for_s() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0, window_s=60.0, for_s=20.0))
    events = feed(rules, series([0.0, 20.0, 40.0, 60.0, 80.0]))
    # rate breaches from t=10 on; opens at t=30 (30 - 10 >= 20)
    assert kinds(events) == ["opened"]
    assert events[0].at == at(30)
    assert events[0].alert_id == alert_id("roc", DEV, at(10))


def test_rate_pending_is_reset_when_rate_stops_breaching() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0, window_s=10.0, for_s=20.0))
    # window 10 s, step 10 s: rate is just the last step's slope
    events = feed(rules, series([0.0, 20.0, 40.0, 41.0, 61.0, 81.0, 101.0]))
    assert kinds(events) == ["opened"]
    assert events[0].at == at(60)
    assert events[0].alert_id == alert_id("roc", DEV, at(40))


def test_rate_samples_not_recorded_for_readings_without_the_metric() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    evaluate_reading(rules, reading(5, None, power_kw=3.0), state)
    assert [v for _, v in state.rules["roc"].samples] == [20.0]


def test_rate_on_other_metric() -> None:
    rules = rules_of(rate_rule(op="lt", threshold=0.5, metric="soc_pct"))
    events = feed(
        rules,
        [reading(0, 20.0, soc_pct=80.0), reading(10, 90.0, soc_pct=70.0)],
    )
    assert kinds(events) == ["opened"]
    assert events[0].value == 70.0


def _exact_rate_edges(
    window: float, threshold: float, points: Sequence[tuple[float, float]]
) -> list[tuple[str, float]]:
    """The rule as it was with every reading of the window kept: (kind, t) of each edge."""
    out: list[tuple[str, float]] = []
    is_open = False
    first = 0  # the oldest reading within the window
    for t, v in points:
        while points[first][0] < t - window:
            first += 1
        t0, v0 = points[first]
        if t == t0:
            continue
        breach = (v - v0) / (t - t0) > threshold
        if breach != is_open:
            out.append(("opened" if breach else "cleared", t))
            is_open = breach
    return out


def test_rate_of_change_memory_stays_bounded_over_a_long_dense_window() -> None:
    window, limit = 3600.0, 0.005
    rules = rules_of(rate_rule(op="gt", threshold=limit, window_s=window))

    def value(t: float) -> float:  # flat for an hour, up 0.05/s for ten minutes, then flat
        return 50.0 + 0.05 * min(max(t - 3600.0, 0.0), 600.0)

    points = [(float(t), value(t)) for t in range(0, 4 * 3600)]  # one reading a second
    state = fresh()
    events: list[AlertEvent] = []
    longest = 0
    for t, v in points:
        events.extend(evaluate_reading(rules, reading(t, v), state))
        longest = max(longest, len(state.rules["roc"].samples))
    assert longest <= RATE_SAMPLES + 1  # not the 3,600 readings the window holds
    assert len(msgspec.json.encode(state)) < 3_000
    # Same edges as with every reading kept, each at most one sample spacing earlier.
    exact = _exact_rate_edges(window, limit, points)
    assert kinds(events) == [kind for kind, _ in exact] == ["opened", "cleared"]
    for e, (_, t_exact) in zip(events, exact, strict=True):
        early = t_exact - (e.at - T0).total_seconds()
        assert 0 <= early <= window / RATE_SAMPLES


def test_rate_of_change_state_written_with_every_sample_is_thinned_on_the_next_reading() -> None:
    rules = rules_of(rate_rule(op="gt", threshold=1.0, window_s=600.0))
    state = fresh()
    state.rules["roc"] = RuleState(samples=[(at(t), 20.0) for t in range(0, 500)])
    state = roundtrip(state)  # as an older release wrote it
    assert evaluate_reading(rules, reading(500, 20.5), state) == []
    samples = state.rules["roc"].samples
    assert len(samples) <= RATE_SAMPLES + 1
    assert samples[0] == (at(0), 20.0)  # the oldest sample still anchors the rate
    [opened] = evaluate_reading(rules, reading(510, 1000.0), state)  # 980 / 510 s
    assert opened.kind == "opened"


def test_a_copy_of_the_state_is_evaluated_without_touching_the_original() -> None:
    rules = rules_of(rule(threshold=80.0), rate_rule(op="gt", threshold=1.0, window_s=60.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    before = roundtrip(state)
    work = state.copy()
    assert len(evaluate_reading(rules, reading(10, 90.0), work)) == 2  # both open
    assert state == before  # the original is as it was: the batch may still fail
    assert work != before


# --------------------------------------------------------------------------- offline


def test_offline_opens_once_after_silence() -> None:
    rules = rules_of(offline_rule(silent_s=300.0))
    state = fresh()
    assert evaluate_reading(rules, reading(0, 20.0), state) == []
    assert evaluate_silence(rules, state, at(299)) == []
    assert evaluate_silence(rules, state, at(300)) == []  # not more than silent_s yet
    [opened] = evaluate_silence(rules, state, at(300.5))
    assert opened.kind == "opened"
    assert opened.alert_id == alert_id("off", DEV, at(0))
    assert opened.at == at(300.5)
    assert opened.value is None
    assert opened.rule_name == "rule off"
    assert opened.severity == "major"
    assert opened.site_id == SITE
    assert evaluate_silence(rules, state, at(400)) == []
    assert evaluate_silence(rules, state, at(10_000)) == []


def test_silence_is_settled_once_every_offline_alert_of_the_device_is_open() -> None:
    other_site = offline_rule("elsewhere", 60.0, scope=RuleScope(site_id="site-2"))
    rules = rules_of(offline_rule("short", 60.0), offline_rule("long", 600.0), other_site)
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    assert not silence_settled(rules, state)
    assert len(evaluate_silence(rules, state, at(61))) == 1
    assert not silence_settled(rules, state)  # the 600 s rule can still fire
    assert len(evaluate_silence(rules, state, at(601))) == 1
    assert silence_settled(rules, state)  # the other site's rule does not concern it
    evaluate_reading(rules, reading(700, 20.0), state)  # reporting again clears both
    assert not silence_settled(rules, state)


def test_offline_next_reading_clears_at_reading_ts() -> None:
    rules = rules_of(offline_rule(silent_s=60.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    [opened] = evaluate_silence(rules, state, at(100))
    [cleared] = evaluate_reading(rules, reading(150, None), state)  # any reading counts
    assert cleared.kind == "cleared"
    assert cleared.alert_id == opened.alert_id
    assert cleared.at == at(150)
    assert evaluate_reading(rules, reading(160, 20.0), state) == []


def test_offline_reopens_with_new_id_after_next_silence() -> None:
    rules = rules_of(offline_rule(silent_s=60.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    [first] = evaluate_silence(rules, state, at(100))
    evaluate_reading(rules, reading(150, 20.0), state)
    assert evaluate_silence(rules, state, at(200)) == []
    [second] = evaluate_silence(rules, state, at(211))
    assert second.kind == "opened"
    assert second.alert_id == alert_id("off", DEV, at(150))
    assert second.alert_id != first.alert_id


def test_offline_no_event_for_device_that_never_reported() -> None:
    rules = rules_of(offline_rule(silent_s=1.0))
    state = fresh()
    assert evaluate_silence(rules, state, at(10_000)) == []
    assert evaluate_silence(rules, state, at(20_000)) == []
    assert state.last_ts is None


def test_offline_late_reading_does_not_clear() -> None:
    rules = rules_of(offline_rule(silent_s=60.0))
    state = fresh()
    evaluate_reading(rules, reading(100, 20.0), state)
    [opened] = evaluate_silence(rules, state, at(200))
    assert evaluate_reading(rules, reading(50, 20.0), state) == []
    assert state.rules["off"].open_id == opened.alert_id


def test_offline_readings_do_not_open_anything() -> None:
    rules = rules_of(offline_rule(silent_s=60.0))
    assert feed(rules, [reading(0, 20.0), reading(1000, 20.0), reading(5000, 20.0)]) == []


def test_silence_ignores_non_offline_rules() -> None:
    rules = rules_of(rule(), rate_rule(), offline_rule(silent_s=60.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    events = evaluate_silence(rules, state, at(1000))
    assert [(e.kind, e.rule_id) for e in events] == [("opened", "off")]


def test_offline_and_threshold_together() -> None:
    rules = rules_of(rule(), offline_rule(silent_s=60.0))
    state = fresh()
    [opened] = evaluate_reading(rules, reading(0, 90.0), state)
    [offline] = evaluate_silence(rules, state, at(100))
    events = evaluate_reading(rules, reading(120, 50.0), state)
    assert sorted((e.kind, e.rule_id, e.alert_id) for e in events) == sorted(
        [("cleared", "r1", opened.alert_id), ("cleared", "off", offline.alert_id)]
    )


# --------------------------------------------------------------------------- scope


@pytest.mark.parametrize(
    ("scope", "matches"),
    [
        (RuleScope(), True),
        (RuleScope(device_id=DEV), True),
        (RuleScope(device_id="inv-2"), False),
        (RuleScope(site_id=SITE), True),
        (RuleScope(site_id="site-2"), False),
        (RuleScope(device_type=DTYPE), True),
        (RuleScope(device_type="battery"), False),
    ],
)
def test_scope(scope: RuleScope, matches: bool) -> None:
    threshold = rule(scope=scope)
    offline = offline_rule(silent_s=10.0, scope=scope)
    assert applies(threshold, fresh()) is matches
    state = fresh()
    events = feed(rules_of(threshold, offline), series([90.0]), state)
    assert kinds(events) == (["opened"] if matches else [])
    silence = evaluate_silence(rules_of(threshold, offline), state, at(100))
    assert kinds(silence) == (["opened"] if matches else [])


def test_scope_distinguishes_devices_with_separate_states() -> None:
    rules = rules_of(rule(scope=RuleScope(device_id="inv-2")))
    s1, s2 = fresh("inv-1"), fresh("inv-2")
    assert evaluate_reading(rules, reading(0, 90.0, device_id="inv-1"), s1) == []
    [event] = evaluate_reading(rules, reading(0, 90.0, device_id="inv-2"), s2)
    assert event.device_id == "inv-2"
    assert event.alert_id == alert_id("r1", "inv-2", at(0))
    assert event.alert_id != alert_id("r1", "inv-1", at(0))


def test_device_moving_site_leaves_site_scoped_rule() -> None:
    rules = rules_of(rule("site", scope=RuleScope(site_id=SITE)), rule("all"))
    state = fresh()
    opened = evaluate_reading(rules, reading(0, 90.0), state)
    assert sorted(e.rule_id for e in opened) == ["all", "site"]
    events = evaluate_reading(rules, reading(10, 90.0, site_id="site-2"), state)
    assert [(e.kind, e.rule_id) for e in events] == [("cleared", "site")]
    assert state.site_id == "site-2"
    [cleared_all] = evaluate_reading(rules, reading(20, 10.0, site_id="site-2"), state)
    assert (cleared_all.rule_id, cleared_all.site_id) == ("all", "site-2")


def test_disabled_rules_never_fire() -> None:
    rules = rules_of(
        rule("t", enabled=False),
        rate_rule("roc"),
        offline_rule("off", silent_s=1.0, enabled=False),
    )
    rules["roc"] = msgspec.structs.replace(rules["roc"], enabled=False)
    state = fresh()
    assert not any(applies(r, state) for r in rules.values())
    assert feed(rules, series([90.0, 200.0, 0.0, 300.0]), state) == []
    assert evaluate_silence(rules, state, at(10_000)) == []


def _open_threshold() -> tuple[DeviceState, AlertEvent]:
    state = fresh()
    [opened] = evaluate_reading(rules_of(rule()), reading(0, 90.0), state)
    return state, opened


@pytest.mark.parametrize(
    "change",
    [
        "removed",
        "disabled",
        "rescoped_device",
        "rescoped_site",
        "rescoped_type",
    ],
)
def test_open_alert_cleared_when_rule_no_longer_applies(change: str) -> None:
    state, opened = _open_threshold()
    r = rule()
    new_rules = {
        "removed": {},
        "disabled": rules_of(msgspec.structs.replace(r, enabled=False)),
        "rescoped_device": rules_of(msgspec.structs.replace(r, scope=RuleScope(device_id="other"))),
        "rescoped_site": rules_of(msgspec.structs.replace(r, scope=RuleScope(site_id="other"))),
        "rescoped_type": rules_of(
            msgspec.structs.replace(r, scope=RuleScope(device_type="battery"))
        ),
    }[change]
    [cleared] = evaluate_reading(new_rules, reading(10, 95.0), state)
    assert cleared.kind == "cleared"
    assert cleared.alert_id == opened.alert_id
    assert cleared.rule_id == "r1"
    assert cleared.rule_name == opened.rule_name
    assert cleared.severity == opened.severity
    assert cleared.at == at(10)
    assert "r1" not in state.rules
    # and nothing further
    assert evaluate_reading(new_rules, reading(20, 95.0), state) == []


def test_open_alert_cleared_when_rule_removed_even_if_reading_lacks_metric() -> None:
    state, opened = _open_threshold()
    [cleared] = evaluate_reading({}, reading(10, None, power_kw=1.0), state)
    assert (cleared.kind, cleared.alert_id) == ("cleared", opened.alert_id)


def test_removing_rule_that_is_not_open_emits_nothing() -> None:
    rules = rules_of(rule(for_s=60.0))
    state = fresh()
    assert feed(rules, series([90.0, 90.0]), state) == []  # pending, not open
    assert evaluate_reading({}, reading(30, 90.0), state) == []
    assert state.rules == {}


def test_removed_then_readded_rule_starts_a_fresh_pending_period() -> None:
    rules = rules_of(rule(for_s=30.0))
    state = fresh()
    feed(rules, series([90.0, 90.0]), state)  # pending since t=0
    evaluate_reading({}, reading(20, 90.0), state)
    assert evaluate_reading(rules, reading(30, 90.0), state) == []  # restarts at t=30
    [opened] = evaluate_reading(rules, reading(60, 90.0), state)
    assert opened.alert_id == alert_id("r1", DEV, at(30))


def test_removed_offline_rule_with_open_alert_is_cleared_by_next_reading() -> None:
    rules = rules_of(offline_rule(silent_s=60.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 20.0), state)
    [opened] = evaluate_silence(rules, state, at(100))
    [cleared] = evaluate_reading({}, reading(120, 20.0), state)
    assert (cleared.kind, cleared.alert_id, cleared.at) == ("cleared", opened.alert_id, at(120))


def test_other_rules_unaffected_when_one_is_removed() -> None:
    rules = rules_of(rule("a"), rule("b", threshold=85.0))
    state = fresh()
    events = evaluate_reading(rules, reading(0, 90.0), state)
    assert sorted(e.rule_id for e in events) == ["a", "b"]
    events = evaluate_reading(rules_of(rule("b", threshold=85.0)), reading(10, 90.0), state)
    assert [(e.kind, e.rule_id) for e in events] == [("cleared", "a")]
    assert state.rules["b"].open_id == alert_id("b", DEV, at(0))


# --------------------------------------------------------------------------- missing / late


def test_reading_missing_metric_changes_nothing_while_open() -> None:
    rules = rules_of(rule())
    state = fresh()
    [opened] = evaluate_reading(rules, reading(0, 90.0), state)
    assert evaluate_reading(rules, reading(10, None, power_kw=1.0), state) == []
    assert state.rules["r1"].open_id == opened.alert_id
    [cleared] = evaluate_reading(rules, reading(20, 10.0), state)
    assert cleared.alert_id == opened.alert_id


def test_reading_missing_metric_does_not_reset_pending() -> None:
    rules = rules_of(rule(for_s=30.0))
    state = fresh()
    assert evaluate_reading(rules, reading(0, 90.0), state) == []
    assert evaluate_reading(rules, reading(15, None, power_kw=1.0), state) == []
    assert state.rules["r1"].pending_since == at(0)
    [opened] = evaluate_reading(rules, reading(30, 90.0), state)
    assert opened.alert_id == alert_id("r1", DEV, at(0))


def test_reading_missing_metric_does_not_open() -> None:
    rules = rules_of(rule(metric="power_kw", threshold=1.0))
    assert feed(rules, [reading(0, 500.0), reading(10, 150.0)]) == []


def test_late_reading_is_ignored() -> None:
    rules = rules_of(rule(), rate_rule(), offline_rule())
    state = fresh()
    evaluate_reading(rules, reading(100, 50.0), state)
    before = msgspec.json.encode(state)
    assert evaluate_reading(rules, reading(99, 150.0), state) == []
    assert evaluate_reading(rules, reading(0, 0.0), state) == []
    assert msgspec.json.encode(state) == before
    assert state.last_ts == at(100)


def test_late_reading_does_not_clear_open_alert() -> None:
    rules = rules_of(rule())
    state = fresh()
    [opened] = evaluate_reading(rules, reading(100, 90.0), state)
    assert evaluate_reading(rules, reading(50, 0.0), state) == []
    assert state.rules["r1"].open_id == opened.alert_id


def test_late_reading_does_not_clear_alert_of_removed_rule() -> None:
    state, _ = _open_threshold()
    evaluate_reading(rules_of(rule()), reading(100, 90.0), state)
    assert evaluate_reading({}, reading(50, 90.0), state) == []
    assert "r1" in state.rules


def test_a_reading_at_the_instant_of_the_last_is_not_evaluated_again() -> None:
    """Same device, same ts: the same reading's identity (a retry, or a conflicting duplicate
    the projection dead-letters); only the first is evaluated, as only the first is stored."""
    rules = rules_of(rule())
    state = fresh()
    [opened] = evaluate_reading(rules, reading(0, 90.0), state)
    assert opened.kind == "opened"
    assert evaluate_reading(rules, reading(0, 10.0), state) == []
    [cleared] = evaluate_reading(rules, reading(1, 10.0), state)
    assert cleared.kind == "cleared"


def test_last_ts_tracks_latest_reading() -> None:
    state = fresh()
    evaluate_reading({}, reading(5, 1.0), state)
    assert state.last_ts == at(5)
    evaluate_reading({}, reading(7, None), state)
    assert state.last_ts == at(7)


# --------------------------------------------------------------------------- determinism, state


def test_alert_id_is_deterministic_and_distinguishes_inputs() -> None:
    a = alert_id("r1", DEV, at(0))
    assert a == alert_id("r1", DEV, at(0))
    assert (
        len({a, alert_id("r2", DEV, at(0)), alert_id("r1", "x", at(0)), alert_id("r1", DEV, at(1))})
        == 4
    )


def test_replay_on_fresh_state_gives_identical_events() -> None:
    rules = rules_of(
        rule("gt", for_s=15.0, clear_threshold=70.0),
        rule("lt", op="lt", threshold=10.0),
        outside_rule("out", low=0.0, high=100.0),
        rate_rule("roc", threshold=2.0, window_s=30.0),
    )
    values = [20.0, 85.0, 90.0, 95.0, 75.0, 60.0, 5.0, 120.0, 50.0, -10.0, 30.0, 90.0, 90.0]
    readings = series(values)
    first = feed(rules, readings)
    assert first
    assert feed(rules, readings) == first


def test_device_state_roundtrip_preserves_fields() -> None:
    state = DeviceState(
        device_id=DEV,
        site_id=SITE,
        device_type=DTYPE,
        last_ts=at(5),
        last_offset=42,
        rules={
            "a": RuleState(open_id="x", rule_name="A", severity="critical"),
            "b": RuleState(pending_since=at(3), samples=[(at(1), 1.5), (at(2), -2.0)]),
            "c": RuleState(),
        },
    )
    assert roundtrip(state) == state


def test_evaluation_continues_identically_after_roundtrip() -> None:
    rules = rules_of(
        rule("gt", for_s=15.0, clear_threshold=70.0),
        rate_rule("roc", threshold=2.0, window_s=30.0, for_s=10.0),
        offline_rule("off", silent_s=60.0),
    )
    values = [20.0, 85.0, 90.0, 95.0, 75.0, 60.0, 5.0, 120.0, 50.0, 90.0, 90.0, 91.0, 10.0]
    readings = series(values)
    plain_state, rt_state = fresh(), fresh()
    plain: list[AlertEvent] = []
    rt: list[AlertEvent] = []
    for i, r in enumerate(readings):
        plain.extend(evaluate_reading(rules, r, plain_state))
        rt_state = roundtrip(rt_state)
        rt.extend(evaluate_reading(rules, r, rt_state))
        if i == 6:
            plain.extend(evaluate_silence(rules, plain_state, r.ts + timedelta(seconds=100)))
            rt_state = roundtrip(rt_state)
            rt.extend(evaluate_silence(rules, rt_state, r.ts + timedelta(seconds=100)))
    assert plain
    assert {e.rule_id for e in plain} == {"gt", "roc", "off"}
    assert rt == plain
    assert roundtrip(rt_state) == plain_state


def test_roundtrip_mid_pending_keeps_episode_start() -> None:
    rules = rules_of(rule(for_s=30.0))
    state = fresh()
    evaluate_reading(rules, reading(0, 90.0), state)
    state = roundtrip(state)
    [opened] = evaluate_reading(rules, reading(30, 90.0), state)
    assert opened.alert_id == alert_id("r1", DEV, at(0))


def test_roundtrip_while_open_keeps_id_for_clear() -> None:
    rules = rules_of(rule())
    state = fresh()
    [opened] = evaluate_reading(rules, reading(0, 90.0), state)
    state = roundtrip(state)
    [cleared] = evaluate_reading(rules, reading(10, 50.0), state)
    assert cleared.alert_id == opened.alert_id
    assert cleared.rule_name == opened.rule_name
    assert cleared.severity == opened.severity


def test_roundtrip_with_non_utc_offsets_keeps_ids() -> None:
    tz = timezone(timedelta(hours=2))
    rules = rules_of(rule(for_s=10.0))
    r0 = msgspec.structs.replace(reading(0, 90.0), ts=at(0).astimezone(tz))
    r1 = msgspec.structs.replace(reading(10, 90.0), ts=at(10).astimezone(tz))
    plain = feed(rules, [r0, r1])
    state = fresh()
    evaluate_reading(rules, r0, state)
    state = roundtrip(state)
    assert evaluate_reading(rules, r1, state) == plain


# --------------------------------------------------------------------------- properties


def _reference_threshold(
    op: Op, threshold: float, clear: float, for_s: float, readings: Sequence[tuple[float, float]]
) -> list[tuple[str, float, float]]:
    """A straightforward model of a gt/lt threshold rule: (kind, at, episode start)."""
    out: list[tuple[str, float, float]] = []
    open_start: float | None = None
    pending: float | None = None
    for t, v in readings:
        breach = v > threshold if op == "gt" else v < threshold
        clears = v <= clear if op == "gt" else v >= clear
        if open_start is not None:
            if clears:
                out.append(("cleared", t, open_start))
                open_start, pending = None, None
            continue
        if not breach:
            pending = None
            continue
        if pending is None:
            pending = t
        if t - pending >= for_s:
            out.append(("opened", t, pending))
            open_start, pending = pending, None
    return out


THRESHOLD = 80.0
CLEAR = 75.0
near_values = st.one_of(
    st.sampled_from([CLEAR - 0.5, CLEAR, CLEAR + 0.5, THRESHOLD, THRESHOLD + 0.5, 50.0, 100.0]),
    st.floats(min_value=60.0, max_value=95.0, allow_nan=False),
)
# (gap since previous reading in seconds, value or None for a reading without the metric)
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=30),
        st.one_of(near_values, near_values, near_values, st.none()),
    ),
    min_size=1,
    max_size=40,
)


def _readings(raw: Sequence[tuple[int, float | None]]) -> list[Reading]:
    t = 0
    out = []
    for gap, v in raw:
        t += gap
        out.append(reading(t, v, power_kw=1.0))
    return out


def _first_of_each_instant(readings: Sequence[Reading]) -> list[Reading]:
    """The readings the alerter evaluates: the first of each (device, ts) identity."""
    return [r for i, r in enumerate(readings) if i == 0 or r.ts != readings[i - 1].ts]


def _check_alternation(events: Sequence[AlertEvent]) -> None:
    for i, e in enumerate(events):
        assert e.kind == ("opened" if i % 2 == 0 else "cleared")
        if e.kind == "cleared":
            assert e.alert_id == events[i - 1].alert_id
            assert e.at >= events[i - 1].at


@settings(max_examples=150, deadline=None)
@given(raw=steps, for_s=st.sampled_from([None, 0.0, 10.0, 25.0]))
def test_property_gt_hysteresis(raw: list[tuple[int, float | None]], for_s: float | None) -> None:
    rules = rules_of(rule(threshold=THRESHOLD, clear_threshold=CLEAR, for_s=for_s))
    readings = _readings(raw)
    state = fresh()
    events: list[AlertEvent] = []
    for r in readings:
        got = evaluate_reading(rules, r, state)
        assert len(got) <= 1
        for e in got:
            # an event is about the reading that caused it
            assert (e.at, e.value) == (r.ts, r.temperature_c)
            assert e.value is not None
            if e.kind == "opened":
                assert e.value > THRESHOLD
            else:
                assert e.value <= CLEAR
        events.extend(got)

    _check_alternation(events)
    if all(gap > 0 for gap, _ in raw[1:]):
        ids_opened = [e.alert_id for e in events if e.kind == "opened"]
        assert len(ids_opened) == len(set(ids_opened))  # each episode its own id
    assert (state.rules["r1"].open_id is not None) == (len(events) % 2 == 1)

    # Matches the reference model, episode ids included.
    with_metric = [
        ((r.ts - T0).total_seconds(), v)
        for r in _first_of_each_instant(readings)
        if (v := r.temperature_c) is not None
    ]
    expected = _reference_threshold("gt", THRESHOLD, CLEAR, for_s or 0.0, with_metric)
    assert [(e.kind, e.at, e.alert_id) for e in events] == [
        (k, at(t), alert_id("r1", DEV, at(s))) for k, t, s in expected
    ]

    # Replay on a fresh state reproduces everything.
    assert feed(rules, readings) == events

    # So does evaluating with a state that goes through JSON before every reading.
    rt_state = fresh()
    rt_events: list[AlertEvent] = []
    for r in readings:
        rt_state = roundtrip(rt_state)
        rt_events.extend(evaluate_reading(rules, r, rt_state))
    assert rt_events == events
    assert rt_state == state


@settings(max_examples=100, deadline=None)
@given(raw=steps, for_s=st.sampled_from([None, 0.0, 10.0]))
def test_property_lt_hysteresis(raw: list[tuple[int, float | None]], for_s: float | None) -> None:
    # mirror values around the lt threshold 20 / clear 25
    lo, clear = 20.0, 25.0
    mirrored = [(g, None if v is None else 100.0 - v) for g, v in raw]
    rules = rules_of(rule(op="lt", threshold=lo, clear_threshold=clear, for_s=for_s))
    readings = _readings(mirrored)
    events = feed(rules, readings)
    _check_alternation(events)
    for e in events:
        assert e.value is not None
        assert (e.value < lo) if e.kind == "opened" else (e.value >= clear)
    with_metric = [
        ((r.ts - T0).total_seconds(), v)
        for r in _first_of_each_instant(readings)
        if (v := r.temperature_c) is not None
    ]
    expected = _reference_threshold("lt", lo, clear, for_s or 0.0, with_metric)
    assert [(e.kind, e.at, e.alert_id) for e in events] == [
        (k, at(t), alert_id("r1", DEV, at(s))) for k, t, s in expected
    ]
    assert feed(rules, readings) == events


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(
        st.tuples(st.integers(0, 20), st.floats(min_value=-20.0, max_value=120.0)),
        min_size=1,
        max_size=30,
    )
)
def test_property_outside(raw: list[tuple[int, float]]) -> None:
    low, high = 10.0, 90.0
    rules = rules_of(outside_rule(low=low, high=high))
    events = feed(rules, _readings(raw))
    _check_alternation(events)
    for e in events:
        assert e.value is not None
        inside = low <= e.value <= high
        assert inside is (e.kind == "cleared")


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(
        st.tuples(st.integers(1, 20), st.floats(min_value=0.0, max_value=100.0)),
        min_size=1,
        max_size=30,
    ),
    op=st.sampled_from(["gt", "lt", None]),
)
def test_property_rate_of_change(raw: list[tuple[int, float]], op: Op | None) -> None:
    window, limit = 30.0, 1.0
    rules = rules_of(rate_rule(op=op, threshold=limit, window_s=window))
    readings = _readings(raw)
    state = fresh()
    events = []
    for i, r in enumerate(readings):
        got = evaluate_reading(rules, r, state)
        # reference rate: oldest sample within the window
        t_now = r.ts
        assert r.temperature_c is not None
        inside = [x for x in readings[: i + 1] if x.ts >= t_now - timedelta(seconds=window)]
        dt = (t_now - inside[0].ts).total_seconds()
        assert inside[0].temperature_c is not None
        rate = (r.temperature_c - inside[0].temperature_c) / dt if dt > 0 else None
        for e in got:
            assert rate is not None
            breaching = (
                rate > limit if op == "gt" else rate < -limit if op == "lt" else abs(rate) > limit
            )
            assert breaching is (e.kind == "opened")
        events.extend(got)
    _check_alternation(events)
    assert feed(rules, readings) == events


@settings(max_examples=100, deadline=None)
@given(raw=steps, late=st.lists(st.integers(0, 40), max_size=10))
def test_property_late_readings_are_ignored(
    raw: list[tuple[int, float | None]], late: list[int]
) -> None:
    rules = rules_of(rule(threshold=THRESHOLD, clear_threshold=CLEAR, for_s=10.0))
    readings = _readings(raw)
    base = feed(rules, readings)
    # Insert a stale copy (older ts, wild value) after selected readings.
    mixed: list[Reading] = []
    for i, r in enumerate(readings):
        mixed.append(r)
        if i in late:
            mixed.append(
                msgspec.structs.replace(
                    r, ts=readings[0].ts - timedelta(seconds=1), temperature_c=200.0
                )
            )
    assert feed(rules, mixed) == base
