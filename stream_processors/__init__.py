"""FastStream processors, each its own consumer group: the validator (`telemetry.raw` ->
`telemetry.valid` or the DLQ), the alerter (readings x rules -> alert events) and the controller
(command lifecycles). Their decisions are pure functions (`validation`, `alerting`, `lifecycle`);
the processor modules wire them to Kafka."""
