"""Access control: API keys (hashed, cached) and usage plans (token bucket, quotas, concurrency)."""
