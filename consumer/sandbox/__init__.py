"""Everything that stands in for the outside world, never imported by the service: the stand-in LLM server,
the embedded Tansu broker, the synthetic review generator and the demo. Needs the demo extra."""
