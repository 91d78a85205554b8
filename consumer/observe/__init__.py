"""Observability: the cost meter, the probe of live state, the metrics.v1 emitter, the admin HTTP server,
and reading the metrics topic back with the report/top arithmetic (``reading``, ``summary``)."""
