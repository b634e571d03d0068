"""Packaged YAML configs: quickstart, tiny, ml-1m, ml-1m-1gpu, ml-25m, goodreads."""
