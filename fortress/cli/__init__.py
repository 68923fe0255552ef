"""The ``fortress`` command line."""
