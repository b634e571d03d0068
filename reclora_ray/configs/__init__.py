"""Packaged YAML configs: quickstart, tiny, ml-1m, ml-25m, goodreads."""
