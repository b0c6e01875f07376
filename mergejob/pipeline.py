"""The job's one path: spec -> sources -> plan -> engine -> output folder -> publish.

``merge(spec)`` is what ``mergejob merge``, ``mergejob run`` and the Python API all call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergejob import output
from mergejob.checkpoint import CheckpointIndex
from mergejob.errors import InputError, ModelError
from mergejob.job import EngineReport, PreparedJob
from mergejob.logs import phase
from mergejob.plan import check_lora_shapes
from mergejob.sources import ADAPTER_PATTERNS, BASE_PATTERNS, resolve_source
from mergejob.spec import MergeSpec

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """Where the merged model is and how it was made."""

    output_dir: Path
    engine: EngineReport
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def prepare(spec: MergeSpec, *, token: str | None = None) -> PreparedJob:
    """Resolve every source to local files and check the job; no weights are read."""
    with phase("resolve"):
        base = resolve_source(spec.base, role="base model", patterns=BASE_PATTERNS, token=token)
        adapters = [
            resolve_source(a, role="adapter", patterns=ADAPTER_PATTERNS, token=token)
            for a in spec.adapters
        ]
    with phase("plan"):
        if not (base.local_dir / "config.json").is_file():
            raise ModelError(f"{base.local_dir}/config.json: missing; is this a model folder?")
        index = CheckpointIndex.from_folder(base.local_dir)
        for adapter in adapters:
            check_lora_shapes(index, adapter.local_dir)
        dtype = spec.output.dtype if spec.output.dtype != "auto" else index.stored_dtype()
        if dtype not in {"bfloat16", "float16", "float32"}:
            raise ModelError(
                f"{base.local_dir}: weights are stored as {dtype}; pass --dtype bfloat16, "
                "float16 or float32"
            )
    return PreparedJob(spec=spec, base=base, adapters=adapters, output_dtype=dtype)


def merge(spec: MergeSpec, *, token: str | None = None) -> MergeResult:
    """Run the whole job described by ``spec`` and return where the result is.

    Example::

        import mergejob
        spec = mergejob.MergeSpec.model_validate(
            {"base": "./base", "adapters": ["./a", "./b"], "output": {"dir": "./merged"}}
        )
        result = mergejob.merge(spec)
    """
    started = time.monotonic()
    if spec.output.dir is None:
        raise InputError("output.dir: required (publishing without a local folder comes later)")
    out_dir = Path(spec.output.dir)
    output.check_output_dir(out_dir, overwrite=spec.output.overwrite)
    job = prepare(spec, token=token)
    partial = output.open_partial(out_dir, resume=False)
    try:
        with phase("merge", engine=spec.engine.name):
            report = run_engine(job, partial)
        with phase("write"):
            write_extras(job, partial)
        final = output.commit_partial(out_dir)
    except BaseException:
        output.discard_partial(out_dir)
        raise
    files = sorted(p.name for p in final.iterdir())
    return MergeResult(
        output_dir=final, engine=report, files=files, seconds=time.monotonic() - started
    )


def run_engine(job: PreparedJob, out_dir: Path) -> EngineReport:
    name = job.spec.engine.name
    if name == "peft":
        from mergejob.engines.peft import merge_with_peft

        return merge_with_peft(job, out_dir)
    from mergejob.errors import SpecError

    raise SpecError(f"engine.name: {name!r} is not available yet; use --engine peft")


def write_extras(job: PreparedJob, out_dir: Path) -> None:
    """Tokenizer, generation_config and chat template next to the weights."""
    source = output.choose_tokenizer_source(job.base.local_dir, job.adapter_dirs)
    copied = output.copy_tokenizer(source, out_dir)
    if copied:
        log.info("tokenizer from %s: %s", source, ", ".join(copied))
    else:
        log.warning("no tokenizer found in the base or any adapter; the output has none")
    if not (out_dir / "generation_config.json").is_file():
        output.copy_generation_config(job.base.local_dir, out_dir)
