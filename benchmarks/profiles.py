"""What a benchmark run is (profile and options) and what it counts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    name: str
    mode: str  # "single" | "batch"
    per_min: float  # readings per minute
    batch: int = 1
    devices_per_batch: int = 10


PROFILES = {
    "baseline": Profile("baseline", "single", 10_000),
    "stress": Profile("stress", "batch", 100_000, batch=100),
    "max": Profile("max", "batch", 250_000, batch=100),
}


@dataclass
class Tally:
    attempted: int = 0
    accepted: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {"4xx": 0, "5xx": 0, "network": 0})
    latencies: list[float] = field(default_factory=list)
    accepted_at: dict[tuple[str, int], float] = field(default_factory=dict)  # wall clock
    timeline: list[tuple[float, int, float]] = field(default_factory=list)  # (t, n, latency)


@dataclass
class Options:
    profile: Profile
    duration: float
    transport: str = "http"
    min_success_rate: float = 0.99
    max_p95_latency_ms: float = 1500.0
    drain_s: float = 120.0
    measure_limit: bool = True
    # HTTP requests answered 503/429, timed out or cut off are resent for this long (0: never)
    retry_deadline_s: float = 30.0
