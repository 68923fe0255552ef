"""Replica engines: how fortress starts, or simulates, the servers behind a pool."""
