"""Merge engines: each writes the merged weights (and config.json) into a folder.

Every engine has the same signature::

    engine(job: PreparedJob, out_dir: Path) -> EngineReport
"""
