"""The safetensors layer: tensor descriptors, header reading, readers, the shard writer,
shard records and their assignment to workers and indices.

The only place that parses a safetensors header.
"""
