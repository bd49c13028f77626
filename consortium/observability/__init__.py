"""What operators watch: ``/metrics`` for Prometheus (``metrics``, ``middleware``, ``queues``)
and log records as JSON lines when ``LOG_FORMAT=json`` (``logging``)."""
