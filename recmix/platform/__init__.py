"""Platform layer: job specs, Ray cluster helper, storage URIs, metrics, bench output convention.

Everything else in recmix imports from here; this layer imports nothing from recmix above it.
"""
