"""Causal byte-level Transformer LM, data-parallel over shard_map."""
