"""Merge engines: each writes the merged weights into the job's partial folder.

Every engine has the same signature (the table is :func:`mergejob.pipeline.run_engine`)::

    engine(job: PreparedJob, out_dir: Path) -> EngineReport

The report carries the config.json keys the merge decided (``config_updates``);
:mod:`mergejob.output` writes config.json, the tokenizer and the rest of the folder.
"""
