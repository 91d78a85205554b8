"""What the service says about itself: the cost meter, the probe that reads the running parts, the metrics
topic emitter, the admin HTTP server (/healthz, /readyz, /metrics) and the summaries behind report and top."""
