"""The shunt pipeline itself: decode, score in micro-batches, route, publish or ask the LLM, track completion
and store only contiguous offsets. It drives kafka, small, llm and observe; it knows no offline or sandbox code."""
