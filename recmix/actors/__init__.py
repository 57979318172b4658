"""Ray actors: embedding parameter-server shards (HBM/RAM/LMDB tiers) and their client/router."""
