"""Entry point of one component process: `python -m microgrid.components NAME`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from runtime.kafka import PartitionMismatch, closed_transport_is_a_connection_error
from runtime.logs import configure_logging
from runtime.settings import DEV_KAFKA_PASSWORDS, Settings, get_settings, require_environment


def _serve_http(target: str, host: str, port: int, workers: int) -> None:
    # uvicorn (httptools, uvloop) costs less CPU per request here than granian did: with
    # the gateway's POST at 1,500 requests/s, 414 us against 499 us, and half the latency.
    import uvicorn

    uvicorn.run(
        target,
        host=host,
        port=port,
        factory=True,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,  # our logging, configured by main() and in each worker
        limit_concurrency=4096,  # last resort; the apps shed load with 503 + Retry-After first
        backlog=2048,
        timeout_graceful_shutdown=10,
        # uvicorn restarts a worker that does not answer its health check in time (5 s by
        # default); a worker starting on a machine loaded by a whole platform's start-up can
        # take longer, and the workers were killed over and over (the fault suite saw it)
        timeout_worker_healthcheck=30,
    )


def _in_worker(component: str) -> Settings:
    """What main() does, again in a uvicorn worker: with several workers uvicorn spawns fresh
    interpreters that import the app factory and never run main()."""
    s = get_settings()
    require_environment(s)
    configure_logging(component, s.log_level)
    tune_gc()
    return s


def _forget_dead_workers() -> None:
    """A worker that uvicorn starts in place of one that died drops the dead one's live gauges
    (its requests in progress), which prometheus_client would otherwise keep adding up."""
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        return
    import psutil
    from prometheus_client import multiprocess

    for path in Path(metrics_dir).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            multiprocess.mark_process_dead(int(pid), metrics_dir)


def gateway_app() -> Any:
    from ingest_gateway.app import serve_app

    s = _in_worker("gateway")
    _forget_dead_workers()
    return serve_app(s)


def api_app() -> Any:
    from query_api.app import create_app

    return create_app(_in_worker("api"))


def gateway(s: Settings) -> None:
    metrics_dir = None
    if s.gateway_workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # one /metrics for all workers: prometheus_client adds up what each wrote here
        metrics_dir = tempfile.mkdtemp(prefix="microgrid-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _serve_http(
            "microgrid.components:gateway_app", s.gateway_host, s.gateway_port, s.gateway_workers
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def api(s: Settings) -> None:
    from query_api.auth import startup_problem

    if reason := startup_problem(s):
        logging.getLogger("microgrid.api").error("refusing to start: %s", reason)
        sys.exit(2)
    _serve_http("microgrid.components:api_app", s.api_host, s.api_port, 1)


def validator(s: Settings) -> None:
    from stream_processors.validator import create_app

    uvloop.run(create_app(s).run())


def alerter(s: Settings) -> None:
    from stream_processors.alerter import create_app

    uvloop.run(create_app(s).run())


def controller(s: Settings) -> None:
    from stream_processors.controller import create_app

    uvloop.run(create_app(s).run())


def projector(s: Settings) -> None:
    """Every projection in one process, each its own consumer group."""
    from projections.alerts import AlertsProjection
    from projections.base import Projection
    from projections.control import ControlProjection
    from projections.telemetry import TelemetryProjection
    from runtime.events import EventStream
    from runtime.metrics import report_lag, serve_metrics

    async def main() -> None:
        events = EventStream(s)
        projections: list[Projection[Any]] = [
            TelemetryProjection(s, events),
            AlertsProjection(s, events),
            ControlProjection(s, events),
        ]
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for p in projections:
                p.stopping.set()

        # one handler for all: a signal has one handler, and the last one set replaced the
        # others (only the control projection stopped; the process was killed at the grace)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        serve_metrics(s, s.projector_metrics_port)
        lags = [asyncio.create_task(report_lag(s, p.group, p.topic)) for p in projections]
        try:
            # one projection failing ends the process (and the supervisor restarts it)
            await asyncio.gather(*(p.run() for p in projections))
        finally:
            for task in lags:
                task.cancel()
            await events.close()

    uvloop.run(main())


def simulator(s: Settings) -> None:
    from simulator.run import run_simulation

    async def main() -> None:
        task = asyncio.create_task(
            run_simulation(s, devices=s.sim_devices, rate=s.sim_rate, duration=None)
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(main())


COMPONENTS: dict[str, Callable[[Settings], None]] = {
    "gateway": gateway,
    "validator": validator,
    "alerter": alerter,
    "controller": controller,
    "projector": projector,
    "api": api,
}
EXTRAS: dict[str, Callable[[Settings], None]] = {"simulator": simulator}


def tune_gc() -> None:
    """Fewer collections of the young generation: a request or a batch allocates many short
    -lived objects, and collecting every 700 allocations took 8 % of the gateway's CPU."""
    gc.set_threshold(50_000, 20, 100)


def as_service(name: str) -> Settings:
    """The settings of component `name`, connecting to Kafka as its own principal. Set in the
    environment too, so uvicorn's workers (fresh interpreters) connect as it as well."""
    s = get_settings()
    username, password = s.service_credentials(name)
    variable = f"KAFKA_{name.upper()}_PASSWORD"
    if not password:
        sys.stderr.write(f"{name}: refusing to start: {variable} is not set\n")
        sys.exit(2)
    if s.environment.strip() and not s.is_dev and password == DEV_KAFKA_PASSWORDS[name]:
        sys.stderr.write(
            f"{name}: refusing to start: {variable} is the repository's development password;"
            f" outside dev (ENVIRONMENT={s.environment}) set your own\n"
        )
        sys.exit(2)
    os.environ["KAFKA_USERNAME"], os.environ["KAFKA_PASSWORD"] = username, password
    get_settings.cache_clear()
    return get_settings()


def main(argv: list[str]) -> None:
    name = argv[1]
    s = as_service(name)
    if reason := s.environment_problem:
        sys.stderr.write(f"{name}: refusing to start: {reason}\n")
        sys.exit(2)
    configure_logging(name, s.log_level)
    tune_gc()
    closed_transport_is_a_connection_error()
    target = COMPONENTS.get(name) or EXTRAS[name]
    try:
        with contextlib.suppress(KeyboardInterrupt):
            target(s)
    except PartitionMismatch as exc:  # the alerter's and controller's check at start
        sys.stderr.write(f"{name}: refusing to start: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv)
