"""Job entry points (prepare, train, bench, pipeline); `recmix run` dispatches here by `kind`."""
