"""A fleet: sites of about eight devices each, built deterministically from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Final

from contracts.readings import (
    Reading,
)
from simulator.devices import (
    EXCURSION_PROBABILITY,
    Battery,
    Device,
    Genset,
    Load,
    Meter,
    PVInverter,
)

DEVICE_CLASSES: Final[dict[str, type[Device]]] = {
    "pv_inverter": PVInverter,
    "battery": Battery,
    "load": Load,
    "genset": Genset,
    "meter": Meter,
}
# Which devices a site of k devices has: the first k of this list (7: 2 pv, 1 battery, 2 load,
# 1 genset, 1 meter; 9 adds a third pv and a second battery); larger sites add pv and load.
_SITE_ORDER: Final = (
    "pv_inverter",
    "battery",
    "load",
    "meter",
    "genset",
    "load",
    "pv_inverter",
    "pv_inverter",
    "battery",
)
# Order in which a site takes its readings, so that the genset and meter see fresh values.
_READ_ORDER: Final = ("pv_inverter", "battery", "load", "genset", "meter")


@dataclass
class Site:
    site_id: str
    devices: list[Device]

    def __post_init__(self) -> None:
        self.devices.sort(key=lambda d: _READ_ORDER.index(d.device_type))
        batteries = [d for d in self.devices if isinstance(d, Battery)]
        for d in self.devices:
            if isinstance(d, Genset):
                d.batteries = batteries
            elif isinstance(d, Meter):
                d.peers = [p for p in self.devices if p is not d]

    def readings(self, ts: datetime) -> list[Reading]:
        """The readings of every device at `ts`, except those rebooting."""
        return [r for d in self.devices if (r := d.sample(ts)) is not None]


def site_composition(n: int, rng: random.Random) -> list[str]:
    """Device types of a site of `n` devices (about 8: 2-3 pv, 1-2 battery, 2 load, 1 genset,
    1 meter)."""
    order = list(_SITE_ORDER)
    if n == 8 and rng.random() < 0.5:
        order[7] = "battery"  # 2 pv + 2 batteries instead of 3 pv + 1
    extra = ["pv_inverter" if i % 2 == 0 else "load" for i in range(max(0, n - len(order)))]
    return (order + extra)[:n]


def _site_sizes(n_devices: int) -> list[int]:
    n_sites = max(1, round(n_devices / 8))
    base, rest = divmod(n_devices, n_sites)
    return [base + 1 if i < rest else base for i in range(n_sites)]


def build_fleet(
    n_devices: int,
    seed: int = 0,
    *,
    excursion_prob: float = EXCURSION_PROBABILITY,
    tz: tzinfo = UTC,
) -> list[Site]:
    """Sites `site-001`, `site-002`, ... of about 8 devices each, exactly `n_devices` in all."""
    if n_devices < 1:
        raise ValueError("n_devices must be at least 1")
    rng = random.Random(seed)
    sites = []
    for i, size in enumerate(_site_sizes(n_devices), start=1):
        site_id = f"site-{i:03d}"
        counts: dict[str, int] = {}
        devices: list[Device] = []
        for device_type in site_composition(size, rng):
            counts[device_type] = counts.get(device_type, 0) + 1
            device_id = f"{site_id}-{device_type}-{counts[device_type]}"
            device_rng = random.Random(f"{seed}/{device_id}")
            cls = DEVICE_CLASSES[device_type]
            devices.append(
                cls(device_id, site_id, device_rng, excursion_prob=excursion_prob, tz=tz)
            )
        sites.append(Site(site_id, devices))
    return sites
