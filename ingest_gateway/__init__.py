"""HTTP ingest gateway: authenticates devices and writes their readings to `telemetry.raw`."""
