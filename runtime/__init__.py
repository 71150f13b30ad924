"""What every process needs at run time: settings, Kafka and PostgreSQL clients, the HTTP error
shape and health checks, metrics, the live event stream, logging, migrations and device keys.

It imports `contracts` and libraries, never a service, the simulator or the composition root.
"""
