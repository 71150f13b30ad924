"""The device simulator: simulated microgrid sites sending telemetry to the ingest gateway and
executing the control commands dispatched to them.

- `simulator.devices`: device models and their physics (pure, deterministic per seed);
- `simulator.fleet`: sites of about eight devices, built from a seed;
- `simulator.sender`: batches to the gateway over HTTP, with retries;
- `simulator.commands`: dispatched commands executed and answered over Kafka;
- `simulator.run`: `run_simulation`, all of it in real time.

It uses `contracts` and `runtime` (device keys are made as `microgrid keys create` makes them),
never a service.
"""
