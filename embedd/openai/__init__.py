"""OpenAI's side: the HTTP client, the batch line format, the rate limiter, the circuit
breaker and the retry policy."""
