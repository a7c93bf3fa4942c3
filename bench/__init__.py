"""The serving benchmark: the stack as the client path runs it, stage latency, concurrency, batching."""
