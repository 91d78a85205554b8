"""The large-model side: the rate-limited async worker pool, its OpenAI-compatible client, limiter, circuit
breaker, answer cache and the S4L prompts. It imports only the kernel."""
