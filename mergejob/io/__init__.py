"""The safetensors layer, one small module per concern (mergekit's io is the model):

- :mod:`~mergejob.io.headers`: the one tensor descriptor (:class:`TensorRef`), dtype tables,
  local header parsing and the Hub's headers over HTTP range requests;
- :mod:`~mergejob.io.checkpoint`: which tensor lives in which shard of a checkpoint folder;
- :mod:`~mergejob.io.header_view`: a checkpoint folder with its headers but not its weights;
- :mod:`~mergejob.io.reader`: tensors' bytes read with ``pread`` (the only module with torch);
- :mod:`~mergejob.io.writer`: a shard's header, the streaming shard writer, the index file;
- :mod:`~mergejob.io.shards`: output shard packing, assignment to workers, finished records.

The only place that parses a safetensors header.
"""
