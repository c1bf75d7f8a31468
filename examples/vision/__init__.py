"""Image classification with a small ResNet, data-parallel over shard_map."""
