"""Job entry points (prepare, train, bench, pipeline), the `recmix` CLI (cli.py) and its dispatch table (registry.py)."""
