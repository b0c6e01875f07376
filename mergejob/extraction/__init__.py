"""LoRA extraction: the difference between a fine-tuned model and its base as a PEFT adapter.

One small module per concern, on the merge's own layers (:mod:`mergejob.io` reads the
checkpoints, :mod:`mergejob.pipeline` opens and settles the output, :mod:`mergejob.publish`
publishes):

- :mod:`~mergejob.extraction.plan`: the modules and their roles, from both checkpoints'
  headers and configs (no weight read); every problem before any work;
- :mod:`~mergejob.extraction.svd`: one ΔW's truncated SVD (full, or randomized for large
  modules) and the rank rules;
- :mod:`~mergejob.extraction.engine`: ΔW module by module, out of core, resumable per group;
- :mod:`~mergejob.extraction.writer`: the group parts, ``adapter_model.safetensors`` and
  ``adapter_config.json``;
- :mod:`~mergejob.extraction.report`: ``extraction.json``, the card's table, and the plan
  ``mergejob plan`` prints; :mod:`~mergejob.extraction.card`: the model card;
- :mod:`~mergejob.extraction.inputs`: both models, a Hub one streamed shard by shard in the
  order the groups read them (:mod:`mergejob.fetch`), with the engine's gate;
- :mod:`~mergejob.extraction.job`: the job, top to bottom (``mergejob.extract(spec)``);
- :mod:`~mergejob.extraction.split`: one index of an extraction split over an Indexed Job.
"""
