"""The benchmark report (the contract's JSON, extra fields welcome) and its chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.profiles import Options, Profile, Tally


def percentiles(values_s: list[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of durations given in seconds (nearest rank)."""
    if not values_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(values_s)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99)}


@dataclass
class Report:
    profile: str
    mode: str
    duration_s: float
    attempted_messages: int
    accepted_messages: int
    persisted_messages: int
    errors: dict[str, int]
    throughput_per_min: float
    latency_ms: dict[str, float]
    e2e_ms: dict[str, float]
    limit: dict[str, float | None]
    slo: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, int, float]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        p: Profile,
        o: Options,
        rate: float,
        tally: Tally,
        rows: list[tuple[str, int, datetime]],
        elapsed: float,
        cpu: float,
        alert_ms: list[float],
    ) -> Report:
        e2e = [
            max(0.0, at.timestamp() - tally.accepted_at[(d, q)])
            for d, q, at in rows
            if (d, q) in tally.accepted_at
        ]
        stored = len({(d, q) for d, q, _ in rows if (d, q) in tally.accepted_at})
        throughput = tally.accepted / elapsed * 60 if elapsed else 0.0
        latency = percentiles(tally.latencies)
        success = tally.accepted / tally.attempted if tally.attempted else 0.0
        passed = success >= o.min_success_rate and latency["p95"] <= o.max_p95_latency_ms
        return cls(
            profile=p.name,
            mode=p.mode,
            duration_s=round(elapsed, 3),
            attempted_messages=tally.attempted,
            accepted_messages=tally.accepted,
            persisted_messages=stored,
            errors=dict(tally.errors),
            throughput_per_min=round(throughput, 1),
            latency_ms=latency,
            e2e_ms=percentiles(e2e),
            limit={"kafka_roundtrip_per_min": None, "ratio": None},
            slo={
                "passed": passed,
                "min_success_rate": o.min_success_rate,
                "max_p95_latency_ms": o.max_p95_latency_ms,
                "success_rate": round(success, 6),
            },
            extra={
                "transport": o.transport,
                "offered_per_min": rate,
                "batch_size": p.batch,
                "lost_messages": max(0, tally.accepted - stored),
                "alert_latency_ms": percentiles([ms / 1000 for ms in alert_ms]),
                "alerts_planted_and_seen": len(alert_ms),
                "loadgen_cpu_pct": round(100 * cpu / elapsed, 1) if elapsed else 0.0,
            },
            timeline=tally.timeline,
        )

    def set_limit(self, per_min: float) -> None:
        """The raw client limit, measured separately, and our throughput as a ratio of it."""
        self.limit = {
            "kafka_roundtrip_per_min": per_min,
            "ratio": round(self.throughput_per_min / per_min, 4) if per_min else None,
        }

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("extra", "timeline")}
        out.update(self.extra)
        return out


def write_chart(report: Report, path: Path) -> None:
    """Accepted readings per second and p95 request latency per second, over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = int(max((t for t, _, _ in report.timeline), default=0)) + 1
    accepted = [0] * seconds
    lat: list[list[float]] = [[] for _ in range(seconds)]
    for t, n, latency in report.timeline:
        accepted[int(t)] += n
        lat[int(t)].append(latency)
    p95 = [percentiles(v)["p95"] if v else float("nan") for v in lat]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(seconds), accepted, color="tab:blue", label="accepted readings/s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("readings/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(range(seconds), p95, color="tab:red", label="p95 latency (ms)")
    ax2.set_ylabel("p95 request latency (ms)", color="tab:red")
    ax.set_title(
        f"{report.profile} ({report.mode}): {report.throughput_per_min:,.0f} readings/min,"
        f" SLO {'passed' if report.slo['passed'] else 'failed'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
