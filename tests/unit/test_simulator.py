"""The simulator's device models and its sending loop, without any service."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import msgspec
import pytest

from contracts import Reading
from contracts.control import CommandDispatch, CommandResult
from runtime.settings import Settings
from simulator import commands, devices, run, sender
from simulator.commands import CommandServer
from simulator.devices import NORMAL_BANDS, Battery, Device, Genset, Load, Meter, PVInverter
from simulator.fleet import Site, build_fleet
from simulator.run import run_simulation

START = datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
STEP = timedelta(minutes=5)
TWO_DAYS = int(timedelta(hours=48) / STEP)


def times(start: datetime = START, step: timedelta = STEP, n: int = TWO_DAYS) -> Iterator[datetime]:
    return (start + i * step for i in range(n))


def simulate(sites: list[Site], **kw: object) -> list[Reading]:
    return [r for ts in times(**kw) for site in sites for r in site.readings(ts)]  # type: ignore[arg-type]


def roundtrip(r: Reading) -> Reading:
    return msgspec.json.decode(msgspec.json.encode(r), type=Reading)


def out_of_band(r: Reading) -> list[str]:
    bad = []
    for metric, (low, high) in NORMAL_BANDS.items():
        value = getattr(r, metric)
        if value is not None and not low <= value <= high:
            bad.append(metric)
    return bad


def make(cls: type[Device], seed: int = 0, **kw: object) -> Device:
    return cls(f"site-001-{cls.device_type}-1", "site-001", random.Random(seed), **kw)  # type: ignore[arg-type]


# --- fleet ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 13, 21, 48, 100, 257, 1000])
def test_fleet_has_exactly_the_requested_devices(n: int) -> None:
    sites = build_fleet(n, seed=n)
    devices = [d for site in sites for d in site.devices]
    assert len(devices) == n
    assert len({d.device_id for d in devices}) == n
    assert [s.site_id for s in sites] == [f"site-{i:03d}" for i in range(1, len(sites) + 1)]
    for site in sites:
        for d in site.devices:
            assert d.site_id == site.site_id
            assert d.device_id.startswith(f"{site.site_id}-{d.device_type}-")
            assert d.seq == 0


@pytest.mark.parametrize("n", [21, 48, 100, 257, 1000])
def test_fleet_sites_have_the_usual_device_mix(n: int) -> None:
    for site in build_fleet(n, seed=1):
        mix = Counter(d.device_type for d in site.devices)
        assert 7 <= len(site.devices) <= 9
        assert 2 <= mix["pv_inverter"] <= 3
        assert 1 <= mix["battery"] <= 2
        assert (mix["load"], mix["genset"], mix["meter"]) == (2, 1, 1)


def test_fleet_is_deterministic_per_seed() -> None:
    a, b, c = build_fleet(24, seed=7), build_fleet(24, seed=7), build_fleet(24, seed=8)
    ra, rb, rc = (simulate(x, n=48) for x in (a, b, c))
    assert ra == rb
    assert ra != rc


def test_device_ids_look_like_the_examples() -> None:
    ids = {d.device_id for site in build_fleet(8) for d in site.devices}
    assert {"site-001-battery-1", "site-001-meter-1", "site-001-load-2"} <= ids


# --- readings stay physical ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("excursion_prob", [0.0, devices.EXCURSION_PROBABILITY, 1.0])
def test_every_reading_passes_the_contract(seed: int, excursion_prob: float) -> None:
    sites = build_fleet(18, seed=seed, excursion_prob=excursion_prob)
    readings = simulate(sites)
    assert len(readings) == 18 * TWO_DAYS
    for r in readings:
        assert roundtrip(r) == r


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("step", [timedelta(seconds=1), STEP, timedelta(hours=1)])
def test_without_excursions_readings_stay_in_the_normal_band(seed: int, step: timedelta) -> None:
    readings = simulate(build_fleet(18, seed=seed, excursion_prob=0.0), step=step)
    assert [r for r in readings if out_of_band(r)] == []


def test_readings_carry_identity_and_increasing_seq() -> None:
    d = make(Load)
    readings = [d.reading(ts) for ts in times(n=5)]
    assert [r.seq for r in readings] == [0, 1, 2, 3, 4]
    assert {(r.device_id, r.site_id, r.device_type) for r in readings} == {
        ("site-001-load-1", "site-001", "load")
    }
    assert [r.ts for r in readings] == list(times(n=5))


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError):
        make(Load).reading(datetime(2026, 6, 1, 12, 0))


# --- device behaviour ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pv_is_dark_at_night_and_produces_at_noon(seed: int) -> None:
    pv = make(PVInverter, seed)
    for hour in (0, 3, 5, 19, 22):
        r = pv.reading(START.replace(hour=hour))
        assert r.power_kw == 0.0
        assert r.current_a == 0.0
    noon = pv.reading(START.replace(hour=12))
    assert noon.power_kw is not None and noon.power_kw > 0
    assert noon.current_a is not None and noon.current_a > 0


def test_pv_follows_the_local_hour() -> None:
    pv = make(PVInverter, tz=timezone(timedelta(hours=10)))
    assert pv.reading(START.replace(hour=2)).power_kw > 0  # type: ignore[operator]  # 12:00 local
    assert pv.reading(START.replace(hour=14)).power_kw == 0.0  # 00:00 local


def test_pv_runs_warmer_at_noon() -> None:
    pv = make(PVInverter)
    night = pv.reading(START.replace(hour=2)).temperature_c
    noon = pv.reading(START.replace(hour=12)).temperature_c
    assert night is not None and noon is not None and noon > night + 10


@pytest.mark.parametrize("seed", range(5))
def test_battery_soc_integrates_its_power(seed: int) -> None:
    battery = make(Battery, seed, excursion_prob=0.0)
    readings = [battery.reading(ts) for ts in times()]
    for prev, cur in itertools.pairwise(readings):
        assert cur.soc_pct is not None and prev.soc_pct is not None and cur.power_kw is not None
        assert 0.0 <= cur.soc_pct <= 100.0
        if cur.power_kw > 0:
            assert cur.soc_pct >= prev.soc_pct
        elif cur.power_kw < 0:
            assert cur.soc_pct <= prev.soc_pct
        else:
            assert cur.soc_pct == pytest.approx(prev.soc_pct)


@pytest.mark.parametrize("seed", range(5))
def test_battery_charges_at_midday_and_discharges_in_the_evening(seed: int) -> None:
    for hour, sign in ((12, 1), (19, -1), (3, 0)):
        battery = make(Battery, seed, excursion_prob=0.0)
        assert isinstance(battery, Battery)
        battery.soc_pct = 50.0
        power = battery.reading(START.replace(hour=hour)).power_kw
        assert power is not None
        if sign:
            assert power * sign > 0.1 * battery.max_power_kw
        else:
            assert abs(power) <= 0.03 * battery.max_power_kw  # idle at night


def test_battery_setpoint_overrides_the_schedule() -> None:
    battery = make(Battery, excursion_prob=0.0)
    assert isinstance(battery, Battery)
    battery.soc_pct = 50.0
    battery.setpoint_kw = -battery.max_power_kw / 2  # discharge at noon, against the schedule
    r0 = battery.reading(START.replace(hour=12))
    r1 = battery.reading(START.replace(hour=12, minute=5))
    assert r0.power_kw == pytest.approx(battery.setpoint_kw, abs=1e-3)
    assert r1.power_kw == pytest.approx(battery.setpoint_kw, abs=1e-3)
    assert r1.soc_pct is not None and r0.soc_pct is not None and r1.soc_pct < r0.soc_pct
    battery.setpoint_kw = None
    assert battery.reading(START.replace(hour=12, minute=10)).power_kw > 0  # type: ignore[operator]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_battery_soc_is_clamped_under_a_long_setpoint(sign: float) -> None:
    battery = make(Battery, excursion_prob=0.0)
    assert isinstance(battery, Battery)
    battery.setpoint_kw = sign * 1e6  # clamped to the battery's rating
    readings = [battery.reading(ts) for ts in times()]
    assert all(abs(r.power_kw or 0) <= battery.max_power_kw + 1e-3 for r in readings)
    assert readings[-1].soc_pct == (100.0 if sign > 0 else 0.0)
    assert readings[-1].power_kw == 0.0


def test_load_is_positive_and_peaks_in_the_evening() -> None:
    load = make(Load, excursion_prob=0.0)
    readings = [load.reading(ts) for ts in times()]
    assert all((r.power_kw or 0) > 0 for r in readings)
    by_hour = {r.ts.hour: r.power_kw or 0 for r in readings if r.ts.minute == 0}
    assert by_hour[19] > by_hour[3]


def _site(*classes: type[Device]) -> Site:
    rng = random.Random(0)
    devices = [
        cls(f"site-001-{cls.device_type}-{i}", "site-001", random.Random(rng.random()))
        for i, cls in enumerate(classes, start=1)
    ]
    return Site("site-001", devices)


def test_genset_runs_when_the_batteries_are_low() -> None:
    site = _site(Battery, Genset, Meter)
    battery, genset = site.devices[0], site.devices[1]
    assert isinstance(battery, Battery) and isinstance(genset, Genset)
    battery.setpoint_kw = 0.0
    battery.soc_pct = 60.0
    stopped = genset.reading(START)
    battery.soc_pct = 5.0
    running = genset.reading(START + STEP)
    assert stopped.power_kw == 0.0 and stopped.voltage_v is None and stopped.frequency_hz is None
    assert running.power_kw is not None and running.power_kw > 0
    assert running.voltage_v is not None and running.frequency_hz is not None
    assert running.temperature_c > stopped.temperature_c + 20  # type: ignore[operator]
    battery.soc_pct = 30.0  # hysteresis: keeps running until 40 %
    assert (genset.reading(START + 2 * STEP).power_kw or 0) > 0
    battery.soc_pct = 45.0
    assert genset.reading(START + 3 * STEP).power_kw == 0.0


def test_meter_reports_the_site_net_import() -> None:
    site = _site(PVInverter, Battery, Load, Load, Genset, Meter)
    for ts in times(n=48):
        readings = {r.device_id: r for r in site.readings(ts)}
        assert site.devices[-1].device_type == "meter"
        net = sum(
            (1 if r.device_type in ("load", "battery") else -1) * (r.power_kw or 0)
            for r in readings.values()
            if r.device_type != "meter"
        )
        assert readings["site-001-meter-6"].power_kw == pytest.approx(net, abs=0.01)


def test_excursions_leave_the_normal_band() -> None:
    readings = simulate(build_fleet(16, seed=3, excursion_prob=1.0), n=100)
    bad = Counter(metric for r in readings for metric in out_of_band(r))
    assert sum(1 for r in readings if out_of_band(r)) > len(readings) / 2
    assert set(bad) == set(NORMAL_BANDS)  # every kind of excursion occurs


def test_an_excursion_lasts_some_seconds_then_ends() -> None:
    d = make(Meter, excursion_prob=1.0)
    first = d.reading(START)
    assert out_of_band(first)
    assert d.excursion is not None
    until = d.excursion.until
    assert timedelta(seconds=30) <= until - START <= timedelta(seconds=300)
    metric = d.excursion.kind.metric
    during = d.reading(START + timedelta(seconds=10))
    assert d.excursion.until == until  # still the same excursion
    assert metric in out_of_band(during)
    d.excursion_prob = 0.0
    assert out_of_band(d.reading(until)) == []


# --- control commands ----------------------------------------------------------------------


def reliable(cls: type[Device], seed: int = 0, **kw: object) -> Device:
    """A device that never refuses a valid command."""
    d = make(cls, seed, excursion_prob=0.0, **kw)
    d.failure_rate = 0.0
    return d


@pytest.mark.parametrize("seed", range(3))
def test_battery_charge_and_discharge_drive_the_reported_power(seed: int) -> None:
    battery = reliable(Battery, seed)
    assert isinstance(battery, Battery)
    battery.soc_pct = 50.0
    p = round(battery.max_power_kw / 3, 1)
    # charge in the evening (the schedule discharges), discharge at noon (the schedule charges)
    assert battery.execute("charge", {"power_kw": p}, random.Random(1)) is None
    assert battery.setpoint_kw == p  # charging is positive power
    r0 = battery.reading(START.replace(hour=19))
    r1 = battery.reading(START.replace(hour=19, minute=5))
    assert r0.power_kw == r1.power_kw == pytest.approx(p, abs=1e-3)
    assert r1.soc_pct > r0.soc_pct  # type: ignore[operator]
    assert battery.execute("discharge", {"power_kw": p}, random.Random(1)) is None
    assert battery.setpoint_kw == -p
    r2 = battery.reading(START.replace(hour=12))
    r3 = battery.reading(START.replace(hour=12, minute=5))
    assert r2.power_kw == pytest.approx(-p, abs=1e-3)
    assert r3.soc_pct < r2.soc_pct  # type: ignore[operator]


def test_battery_setpoint_beyond_its_rating_is_clamped() -> None:
    battery = reliable(Battery)
    assert isinstance(battery, Battery)
    battery.soc_pct = 50.0
    assert battery.execute("discharge", {"power_kw": 10_000}, random.Random(0)) is None
    power = battery.reading(START.replace(hour=12)).power_kw
    assert power == pytest.approx(-battery.max_power_kw, abs=1e-3)


def test_genset_start_and_stop_override_the_automatic_control() -> None:
    site = _site(Battery, Genset, Meter)
    battery, genset = site.devices[0], site.devices[1]
    assert isinstance(battery, Battery) and isinstance(genset, Genset)
    genset.failure_rate = 0.0
    genset.RANDOM_STARTS_PER_S = 0.0  # type: ignore[misc]
    battery.setpoint_kw, battery.soc_pct = 0.0, 60.0  # batteries full: it would stay stopped
    assert genset.reading(START).power_kw == 0.0
    assert genset.execute("start", {}, random.Random(0)) is None
    for i in range(1, 4):
        r = genset.reading(START + i * STEP)
        assert (r.power_kw or 0) > 0 and r.voltage_v is not None and r.frequency_hz is not None
    battery.soc_pct = 5.0  # batteries empty: it would run
    assert genset.execute("stop", {}, random.Random(0)) is None
    for i in range(4, 7):
        r = genset.reading(START + i * STEP)
        assert r.power_kw == 0.0 and r.voltage_v is None
    assert genset.execute("reboot", {}, random.Random(0), now=START + 7 * STEP) is None
    assert genset.forced is None
    assert (genset.reading(START + 8 * STEP).power_kw or 0) > 0  # automatic again: runs


@pytest.mark.parametrize("limit", [0, 10, 50])
def test_limit_power_caps_the_pv_output(limit: int) -> None:
    pv, free = reliable(PVInverter), reliable(PVInverter)
    assert isinstance(pv, PVInverter)
    assert pv.execute("limit_power", {"limit_pct": limit}, random.Random(0)) is None
    noon = [START.replace(hour=12) + i * STEP for i in range(12)]
    capped = [pv.reading(ts).power_kw or 0 for ts in noon]
    uncapped = [free.reading(ts).power_kw or 0 for ts in noon]
    assert max(capped) <= pv.rated_kw * limit / 100 + 1e-3
    assert max(uncapped) > pv.rated_kw * 0.5  # the cap is what holds it down
    if limit:
        assert min(capped) == pytest.approx(pv.rated_kw * limit / 100, abs=1e-3)
    assert pv.execute("reboot", {}, random.Random(0), now=noon[-1]) is None
    assert pv.limit_pct is None


def test_reboot_clears_setpoints_and_silences_the_device() -> None:
    site = _site(PVInverter, Battery, Load, Meter)
    pv, battery, meter = site.devices[0], site.devices[1], site.devices[3]
    assert isinstance(battery, Battery) and isinstance(pv, PVInverter)
    for d in site.devices:
        d.failure_rate, d.excursion_prob = 0.0, 0.0
    noon = START.replace(hour=12)
    assert battery.execute("discharge", {"power_kw": 5}, random.Random(0)) is None
    assert pv.execute("limit_power", {"limit_pct": 20}, random.Random(0)) is None
    seq = battery.reading(noon).seq
    assert seq is not None
    assert battery.execute("reboot", {}, random.Random(0), now=noon) is None
    assert pv.execute("reboot", {}, random.Random(0), now=noon) is None
    assert battery.setpoint_kw is None and pv.limit_pct is None
    low, high = devices.REBOOT_SECONDS
    during = site.readings(noon + timedelta(seconds=low - 0.5))
    assert {r.device_type for r in during} == {"load", "meter"}
    net = next(r for r in during if r.device_type == "meter").power_kw
    assert net == pytest.approx(next(r for r in during if r.device_type == "load").power_kw)
    # while rebooting it refuses commands, whatever its failure rate
    assert (
        battery.execute("charge", {"power_kw": 5}, random.Random(0), now=noon)
        == "device is rebooting"
    )
    after = {r.device_type: r for r in site.readings(noon + timedelta(seconds=high))}
    assert set(after) == {"pv_inverter", "battery", "load", "meter"}
    assert after["battery"].seq == seq + 1  # seq goes on: nothing was sent while rebooting
    assert (after["battery"].power_kw or 0) > 0  # back on its schedule: charging at noon
    assert meter.excursion is None


def test_reboot_without_a_clock_starts_at_the_next_reading() -> None:
    load = reliable(Load)
    assert load.execute("reboot", {}, random.Random(0)) is None
    assert load.execute("reboot", {}, random.Random(0)) == "device is rebooting"
    assert load.sample(START) is None
    assert load.sample(START + timedelta(seconds=devices.REBOOT_SECONDS[0] - 1)) is None
    r = load.sample(START + timedelta(seconds=devices.REBOOT_SECONDS[1]))
    assert r is not None and r.seq == 0


@pytest.mark.parametrize(
    ("cls", "command", "params", "expect"),
    [
        (Battery, "start", {}, "a battery accepts charge, discharge, reboot"),
        (Battery, "self_destruct", {}, "a battery accepts"),
        (Load, "charge", {"power_kw": 1}, "a load accepts reboot"),
        (Meter, "limit_power", {"limit_pct": 5}, "a meter accepts reboot"),
        (Battery, "charge", {}, "params.power_kw"),
        (Battery, "discharge", {"power_kw": -3}, "params.power_kw"),
        (Battery, "charge", {"power_kw": "7"}, "params.power_kw"),
        (PVInverter, "limit_power", {"limit_pct": 150}, "params.limit_pct"),
        (Genset, "start", {"now": True}, "params.now"),
    ],
)
def test_invalid_commands_fail_with_a_reason(
    cls: type[Device], command: str, params: dict[str, object], expect: str
) -> None:
    d = reliable(cls)
    before = dict(vars(d))
    reason = d.execute(command, params, random.Random(0))
    assert reason is not None and expect in reason
    assert vars(d) == before  # nothing changed


@pytest.mark.parametrize(
    ("cls", "command", "params"),
    [
        (Battery, "charge", {"power_kw": 5}),
        (Genset, "start", {}),
        (PVInverter, "limit_power", {"limit_pct": 0}),
        (Load, "reboot", {}),
    ],
)
def test_a_failing_device_refuses_and_keeps_its_state(
    cls: type[Device], command: str, params: dict[str, object]
) -> None:
    d = make(cls, excursion_prob=0.0)
    d.failure_rate = 1.0
    before = dict(vars(d))
    reasons = {d.execute(command, params, random.Random(i)) for i in range(50)}
    assert None not in reasons
    assert reasons == set(cls.FAILURE_REASONS)
    assert {k: v for k, v in vars(d).items() if k != "rng"} == {
        k: v for k, v in before.items() if k != "rng"
    }
    assert d.sample(START) is not None  # not rebooting


def test_battery_failures_include_the_bms() -> None:
    assert "setpoint rejected by BMS" in Battery.FAILURE_REASONS
    assert {"device busy", "interlock active"} <= set(Battery.FAILURE_REASONS)


def test_a_small_share_of_commands_fails_by_default() -> None:
    battery = make(Battery)
    assert battery.failure_rate == devices.COMMAND_FAILURE_RATE == 0.03
    rng = random.Random(42)
    outcomes = [battery.execute("charge", {"power_kw": 1}, rng) for _ in range(4000)]
    failed = sum(o is not None for o in outcomes)
    assert 0.02 * 4000 < failed < 0.04 * 4000


def test_the_outcome_is_decided_by_the_given_rng() -> None:
    a, b = make(Battery), make(Battery)
    a.failure_rate = b.failure_rate = 0.5
    ra = [a.execute("charge", {"power_kw": 1}, random.Random(i)) for i in range(40)]
    rb = [b.execute("charge", {"power_kw": 1}, random.Random(i)) for i in range(40)]
    assert ra == rb
    assert None in ra and len(set(ra)) > 1
    # without an rng the device's own decides
    c = make(Battery, seed=3)
    c.failure_rate = 1.0
    rng_state = c.rng.getstate()
    assert c.execute("charge", {"power_kw": 1}) is not None
    assert c.rng.getstate() != rng_state


# --- executing dispatched commands, with a fake producer -------------------------------------


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.sent.append((topic, value, key))


def dispatch_record(
    device_id: str,
    command: str = "charge",
    params: dict[str, object] | None = None,
    *,
    ttl_s: float = 60,
    command_id: str = "cmd-1",
) -> Any:
    dispatch = CommandDispatch(
        id=command_id,
        device_id=device_id,
        command=command,
        params={"power_kw": 2.5} if params is None else params,
        deadline=datetime.now(UTC) + timedelta(seconds=ttl_s),
    )
    return type(
        "Record",
        (),
        {
            "topic": "control.dispatch",
            "partition": 0,
            "offset": 7,
            "key": device_id.encode(),
            "value": msgspec.json.encode(dispatch),
        },
    )()


def server_for(sites: list[Site]) -> tuple[CommandServer, FakeProducer]:
    producer = FakeProducer()
    return CommandServer(sites, producer, "ns.control.results"), producer


def test_the_server_takes_only_fresh_dispatches_for_its_own_devices() -> None:
    server, _ = server_for(build_fleet(8))
    ours = server.accept(dispatch_record("site-001-battery-1"))
    assert ours is not None and ours.command == "charge" and ours.params == {"power_kw": 2.5}
    again = dispatch_record("site-001-battery-1")  # a redelivery
    assert server.accept(again) is None
    assert server.accept(dispatch_record("site-099-battery-1", command_id="c2")) is None
    late = dispatch_record("site-001-battery-1", ttl_s=-1, command_id="c3")
    assert server.accept(late) is None
    garbage = dispatch_record("site-001-battery-1", command_id="c4")
    garbage.value = b"{not json"
    assert server.accept(garbage) is None
    garbage.value = None
    assert server.accept(garbage) is None


async def test_the_server_executes_and_replies_keyed_by_device(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sites = build_fleet(8)
    server, producer = server_for(sites)
    battery = next(d for d in sites[0].devices if isinstance(d, Battery))
    battery.failure_rate = 0.0
    ok = server.accept(dispatch_record(battery.device_id, "discharge", {"power_kw": 3}))
    bad = server.accept(dispatch_record(battery.device_id, "start", {}, command_id="c2"))
    assert ok is not None and bad is not None
    with caplog.at_level(logging.INFO, logger="microgrid.simulator"):
        await asyncio.gather(server.run(ok, 0.0), server.run(bad, 0.0))
    assert battery.setpoint_kw == -3.0
    results = {}
    for topic, value, key in producer.sent:
        assert topic == "ns.control.results"
        assert key == battery.device_id.encode()
        result = msgspec.json.decode(value, type=CommandResult)
        results[result.id] = result
    assert results["cmd-1"] == CommandResult(
        id="cmd-1", device_id=battery.device_id, status="succeeded", reason=""
    )
    assert results["c2"].status == "failed" and "a battery accepts" in results["c2"].reason
    assert sum("executed" in r.getMessage() for r in caplog.records) == 2


async def test_the_server_runs_commands_concurrently_after_a_short_delay() -> None:
    sites = build_fleet(16)
    server, producer = server_for(sites)
    t0 = asyncio.get_running_loop().time()
    for i, site in enumerate(sites):
        for d in site.devices:
            d.failure_rate = 0.0
            dispatch = server.accept(
                dispatch_record(d.device_id, "reboot", {}, command_id=f"{i}-{d.device_id}")
            )
            assert dispatch is not None
            server.submit(dispatch)
    await asyncio.gather(*server.tasks)
    elapsed = asyncio.get_running_loop().time() - t0
    assert len(producer.sent) == 16
    assert commands.COMMAND_DELAY_S[0] <= elapsed < commands.COMMAND_DELAY_S[1] + 0.5


async def test_a_command_overdue_after_its_delay_is_not_executed() -> None:
    sites = build_fleet(8)
    server, producer = server_for(sites)
    dispatch = server.accept(dispatch_record("site-001-battery-1", ttl_s=0.05))
    assert dispatch is not None
    await server.run(dispatch, 0.1)
    assert producer.sent == []
    battery = server.devices["site-001-battery-1"]
    assert isinstance(battery, Battery) and battery.setpoint_kw is None


# --- the sending loop, against a fake gateway ----------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    def install(handler: Handler) -> list[httpx.Request]:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        monkeypatch.setattr(run, "_provision_keys", lambda url, ids: {i: f"key-{i}" for i in ids})
        monkeypatch.setattr(
            run,
            "make_client",
            lambda n: httpx.AsyncClient(transport=httpx.MockTransport(record)),
        )
        monkeypatch.setattr(run, "serve_commands", no_commands)  # no broker here
        return seen

    return install


async def no_commands(s: Settings, sites: list[Site], stop: asyncio.Event | None = None) -> None:
    assert stop is not None
    await stop.wait()


def accept(request: httpx.Request) -> httpx.Response:
    n = len(msgspec.json.decode(request.content)["readings"])
    return httpx.Response(202, json={"accepted": n})


SETTINGS = Settings(gateway_host="gw.test", gateway_port=1234)


async def test_simulation_sends_one_batch_per_site_and_tick(gateway: Callable) -> None:
    seen = gateway(accept)
    stats = await run_simulation(SETTINGS, devices=16, rate=10.0, duration=0.55)
    assert stats.failed == stats.retried == 0
    assert stats.accepted == stats.attempted > 0
    assert stats.attempted % 8 == 0  # two sites of 8 devices, whole batches
    assert 8 <= len(seen) <= 12  # ~5-6 ticks per site
    for request in seen:
        assert str(request.url) == "http://gw.test:1234/api/v1/telemetry/batch"
        body = msgspec.json.decode(request.content)
        site_ids = {r["site_id"] for r in body["readings"]}
        assert request.headers["authorization"] == f"Bearer key-{site_ids.pop()}"
        assert not site_ids


async def test_503_is_retried_with_the_same_batch(gateway: Callable) -> None:
    calls = Counter[bytes]()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls[request.content] += 1
        if calls[request.content] == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"title": "busy"})
        return accept(request)

    seen = gateway(flaky)
    stats = await run_simulation(
        SETTINGS, devices=8, rate=10.0, duration=0.3, gateway_url="http://other:9/"
    )
    assert stats.attempted > 0
    assert stats.accepted == stats.attempted
    assert stats.failed == 0
    assert stats.retried == len(calls) > 0
    assert set(calls.values()) == {2}
    assert str(seen[0].url) == "http://other:9/api/v1/telemetry/batch"


async def test_persistent_503_gives_up_after_five_retries(gateway: Callable) -> None:
    gateway(lambda r: httpx.Response(503, headers={"Retry-After": "0"}))
    stats = await run_simulation(SETTINGS, devices=8, rate=5.0, duration=0.2)
    assert stats.attempted == stats.failed == 8
    assert stats.accepted == 0
    assert stats.retried == sender.MAX_RETRIES


async def test_422_is_counted_failed_and_logged_once(
    gateway: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    problem = {"title": "Invalid readings", "detail": "ts is too old", "status": 422}
    seen = gateway(lambda r: httpx.Response(422, json=problem))
    with caplog.at_level(logging.WARNING, logger="microgrid.simulator"):
        stats = await run_simulation(SETTINGS, devices=16, rate=10.0, duration=0.35)
    assert stats.failed == stats.attempted > 0
    assert stats.retried == 0 and stats.accepted == 0
    assert len(seen) > 2
    logged = [r.getMessage() for r in caplog.records if "422" in r.getMessage()]
    assert len(logged) == 1
    assert "ts is too old" in logged[0]


async def test_network_errors_are_retried(gateway: Callable) -> None:
    failures = iter([True, True])

    def sometimes_down(request: httpx.Request) -> httpx.Response:
        if next(failures, False):
            raise httpx.ConnectError("connection refused", request=request)
        return accept(request)

    gateway(sometimes_down)
    stats = await run_simulation(SETTINGS, devices=8, rate=1.0, duration=1.0)
    assert (stats.attempted, stats.accepted, stats.failed, stats.retried) == (8, 8, 0, 2)


async def test_the_simulation_serves_commands_for_its_own_fleet(
    gateway: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = gateway(accept)
    calls: list[tuple[Settings, list[Site], asyncio.Event]] = []

    async def commander(s: Settings, sites: list[Site], stop: asyncio.Event | None = None) -> None:
        assert stop is not None
        calls.append((s, sites, stop))
        battery = next(d for d in sites[0].devices if isinstance(d, Battery))
        battery.failure_rate = 0.0
        await asyncio.sleep(0.2)
        assert battery.execute("charge", {"power_kw": 4.5}, random.Random(0)) is None
        await stop.wait()

    monkeypatch.setattr(run, "serve_commands", commander)
    await run_simulation(SETTINGS, devices=8, rate=10.0, duration=0.6)
    [(s, sites, stop)] = calls
    assert s is SETTINGS and stop.is_set()
    assert [d.device_id for site in sites for d in site.devices] == [
        d.device_id for site in build_fleet(8) for d in site.devices
    ]
    powers = [
        r["power_kw"]
        for request in seen
        for r in msgspec.json.decode(request.content)["readings"]
        if r["device_id"] == "site-001-battery-1"
    ]
    assert powers[0] != 4.5 and powers[-1] == 4.5  # the setpoint shows in later readings


async def test_the_simulation_can_run_without_commands(
    gateway: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway(accept)

    async def fail(*args: object) -> None:
        raise AssertionError("not to be called")

    monkeypatch.setattr(run, "serve_commands", fail)
    stats = await run_simulation(SETTINGS, devices=8, rate=10.0, duration=0.2, serve_commands=False)
    assert stats.accepted > 0


async def test_a_failing_command_service_does_not_stop_the_readings(
    gateway: Callable, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gateway(accept)

    async def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "serve_commands", broken)
    with caplog.at_level(logging.ERROR, logger="microgrid.simulator"):
        stats = await run_simulation(SETTINGS, devices=8, rate=10.0, duration=0.3)
    assert stats.accepted == stats.attempted > 8
    assert any("control commands failed" in r.getMessage() for r in caplog.records)


async def test_cancelling_stops_the_command_service(
    gateway: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway(accept)
    stopped = asyncio.Event()

    async def commander(s: Settings, sites: list[Site], stop: asyncio.Event | None = None) -> None:
        assert stop is not None
        await stop.wait()
        stopped.set()

    monkeypatch.setattr(run, "serve_commands", commander)
    task = asyncio.create_task(run_simulation(SETTINGS, devices=8, rate=20.0, duration=None))
    await asyncio.sleep(0.3)
    task.cancel()
    await task
    assert stopped.is_set()


async def test_cancelling_returns_the_stats(gateway: Callable) -> None:
    gateway(accept)
    task = asyncio.create_task(run_simulation(SETTINGS, devices=8, rate=20.0, duration=None))
    await asyncio.sleep(0.3)
    task.cancel()
    stats = await task
    assert stats.accepted == stats.attempted > 0
