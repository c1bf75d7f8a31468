"""DeepFwFM CTR model on Criteo-shaped data, data-parallel over shard_map."""
