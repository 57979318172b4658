"""Platform layer: job specs, CLI, Ray cluster helper, storage URIs, metrics, bench convention.

Everything else in recmix imports from here; this layer imports nothing from recmix above it.
"""
