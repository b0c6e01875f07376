"""MergeSpec: the one description of a merge job.

A spec is built from CLI flags, a YAML/JSON file (a mounted ConfigMap in a pod) and
``MERGEJOB_*`` environment variables, validated once, with errors that name the field.
Precedence: flags > environment > file.

Example::

    from mergejob.spec import MergeSpec
    spec = MergeSpec.model_validate({
        "base": "meta-llama/Meta-Llama-3-70B-Instruct",
        "adapters": ["org/adapter-a@v1", {"path": "./adapter-b", "weight": 0.5}],
        "output": {"dir": "./merged", "dtype": "bfloat16"},
    })
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergejob import settings
from mergejob.errors import SpecError

DType = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
ENGINES: tuple[str, ...] = ("stream", "peft")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")


def parse_size(value: str | int) -> int:
    """Parse ``5GB`` / ``500MiB`` / ``1000`` into bytes, as transformers' max_shard_size does."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size; write it like 5GB, 500MB or 2GiB")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[(unit or "B").upper()])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def parse_max_memory(value: str | Mapping[str, Any]) -> dict[int | str, str]:
    """``0=70GiB,1=70GiB,cpu=200GiB`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    items: list[tuple[str, str]]
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        items = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(
                    f"{part!r} in max_memory must be DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB"
                )
            key, size = part.split("=", 1)
            items.append((key.strip(), size.strip()))
    result: dict[int | str, str] = {}
    for key, size in items:
        parse_size(size)
        if key.isdigit():
            result[int(key)] = size
        elif key in {"cpu", "disk", "mps"}:
            result[key] = size
        else:
            raise ValueError(f"{key!r} in max_memory is not a GPU index, 'cpu' or 'disk'")
    return result


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(_Strict):
    """A local folder or a Hub repo id, with an optional revision (branch, tag or commit)."""

    path: str = Field(description="Local folder, or Hub repo id (optionally id@revision).")
    revision: str | None = Field(default=None, description="Branch, tag or commit on the Hub.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return split_source(data)
        if (
            isinstance(data, dict)
            and isinstance(data.get("path"), str)
            and not data.get("revision")
        ):
            split = split_source(data["path"])
            if split.get("revision"):
                return {**data, **split}
        return data

    @field_validator("path")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a local folder or a Hub repo id")
        return value

    def display(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


def split_source(text: str) -> dict[str, Any]:
    """``org/name@rev`` -> path and revision; an existing local path is never split."""
    if "@" in text and not os.path.exists(text):
        path, revision = text.rsplit("@", 1)
        if path and revision and "/" not in revision:
            return {"path": path, "revision": revision}
    return {"path": text}


class BaseModelSpec(SourceSpec):
    trust_remote_code: bool = Field(
        default=False, description="Allow custom model code from the base repo (peft engine)."
    )


class AdapterSpec(SourceSpec):
    weight: float = Field(
        default=1.0,
        description="Multiplier of this adapter's delta (stream engine). Must be finite and non-zero.",
    )

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value == 0:
            raise ValueError("must be a finite, non-zero number")
        return value


class OutputSpec(_Strict):
    dir: str | None = Field(
        default=None,
        description="Output folder. With publish and no dir, a temporary folder is used.",
    )
    dtype: DType = Field(
        default="auto",
        description="auto keeps the base's stored dtype; float16 reproduces the seed.",
    )
    max_shard_size: str = Field(default="5GB", description="Largest output shard, e.g. 5GB.")
    overwrite: bool = Field(default=False, description="Replace a non-empty output folder.")

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> str:
        parse_size(value)
        return str(value)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


class EngineSpec(_Strict):
    name: Literal["stream", "peft"] = Field(
        default="stream",
        description="stream: shard by shard in bounded memory (default); peft: the seed's "
        "transformers + PEFT merge_and_unload with accelerate's device_map.",
    )
    device: str = Field(default="cpu", description="cpu, auto (all GPUs), cuda or cuda:N.")
    workers: int = Field(
        default=1, ge=1, description="Worker processes on CPU (stream engine, extraction)."
    )
    max_memory: dict[str, str] | None = Field(
        default=None, description="accelerate max_memory, e.g. {0: 70GiB, cpu: 200GiB} (peft)."
    )
    offload_folder: str | None = Field(
        default=None, description="accelerate disk-offload folder (peft engine)."
    )
    # None: the default (left out of a spec's dump, so that its hash and recipe stay those
    # of a spec written before these fields existed).
    download_workers: int | None = Field(
        default=None,
        ge=1,
        description="Stream engine with a Hub base: base shards downloaded at once, in the "
        "order the output shards need them (default 4).",
    )
    delete_downloaded: bool | None = Field(
        default=None,
        description="Stream engine with a Hub base: remove each base shard this job "
        "downloaded from the HF cache once every output shard that reads it is finished "
        "(entries cached before the job are kept); with publish.delete_uploaded the disk "
        "holds a few shards, not the model twice.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"{value!r} is not a device; use cpu, auto, cuda or cuda:N")
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> Any:
        if value is None:
            return None
        return {str(k): v for k, v in parse_max_memory(value).items()}


class ConfigSpec(_Strict):
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="config.json keys to set on the output, e.g. rope_theta, "
        "max_position_embeddings; a dotted key (rope_scaling.factor) sets a nested value. "
        "rope_theta lands where transformers reads it (rope_parameters.rope_theta).",
    )
    config_from: SourceSpec | None = Field(
        default=None,
        description="Take config.json from this model (same architecture and shapes required).",
    )
    allow_unknown_keys: bool = Field(
        default=False,
        description="Allow override keys the model's config class does not declare "
        "(custom-code models); otherwise such a key is an error.",
    )

    @field_validator("overrides")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"{key!r} is not a config key")
        return value


class PublishSpec(_Strict):
    repo_id: str = Field(description="Hub repo to publish to, e.g. org/merged-model.")
    private: bool = Field(default=False, description="Create the repo private.")
    revision: str | None = Field(
        default=None, description="Branch to commit to (created if missing)."
    )
    create_pr: bool = Field(default=False, description="Open a pull request instead of committing.")
    commit_message: str | None = None
    delete_uploaded: bool = Field(
        default=False, description="Delete each local shard once it is on the Hub."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data:
            raise ValueError(
                "token: never in the spec (the spec is written to the recipe and the model "
                "card); set HF_TOKEN, or HF_TOKEN_PATH to a file holding it"
            )
        return data

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not re.match(r"^[\w.-]+(/[\w.-]+)?$", value):
            raise ValueError(f"{value!r} is not a Hub repo id (namespace/name)")
        return value


class ExtractSpec(_Strict):
    """An extraction: the fine-tuned model whose difference from ``base`` becomes a LoRA
    adapter, and how (see :mod:`mergejob.extraction`)."""

    finetuned: SourceSpec = Field(
        description="The fine-tuned model: local folder or Hub id (optionally id@revision)."
    )
    max_rank: int = Field(default=32, ge=1, description="Largest rank of any module.")
    min_energy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Smallest rank keeping this fraction of each module's squared norm "
        "(capped by max_rank).",
    )
    sv_epsilon: float = Field(
        default=0.0, ge=0, description="Drop singular values below this (as mergekit)."
    )
    distribute_scale: bool = Field(
        default=True,
        description="B = U sqrt(S), A = sqrt(S) Vt (as mergekit); false: B = U S, A = Vt.",
    )
    include: list[str] = Field(
        default_factory=list, description="Only modules whose name matches one of these regexes."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Leave out modules whose name matches one of these."
    )
    embeddings: Literal["full", "lora"] = Field(
        default="full",
        description="Embeddings and lm_head: full (modules_to_save, as mergekit) or lora "
        "(lora_embedding_A/B and a LoRA on lm_head); a resized vocabulary is always full.",
    )
    skip_undecomposable: bool = Field(
        default=False,
        description="Leave out changed tensors no LoRA carries (the bias of a LoRA layer, a "
        "3-D expert weight) instead of refusing them.",
    )
    svd: Literal["auto", "exact", "randomized"] = Field(
        default="auto",
        description="auto: full SVD for small modules, a randomized range finder with power "
        "iterations for large ones (error within 1e-4 of the optimum); exact: always full.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the adapter's LoRA factors."
    )

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


class MergeSpec(_Strict):
    """What to merge, how, and where the result goes."""

    base: BaseModelSpec
    # Required for a merge; an extraction (``extract:``) has none (see _task).
    adapters: list[AdapterSpec] = Field(default_factory=list)
    output: OutputSpec = Field(default_factory=OutputSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    config: ConfigSpec = Field(default_factory=ConfigSpec)
    publish: PublishSpec | None = None
    extract: ExtractSpec | None = Field(
        default=None,
        description="Extract a LoRA adapter (fine-tuned - base) instead of merging adapters.",
    )

    @property
    def task(self) -> Literal["merge", "extract"]:
        """What the job does: merge adapters, or (an ``extract:`` section) extract one."""
        return "merge" if self.extract is None else "extract"

    @model_validator(mode="after")
    def _task(self) -> MergeSpec:
        if self.extract is None:
            if not self.adapters:
                raise ValueError(
                    "adapters: is required (the adapters to merge; or an extract: section "
                    "to extract an adapter)"
                )
            return self
        # What only a merge reads: refused rather than silently ignored.
        merge_only = (
            ("adapters", bool(self.adapters), "an extraction makes an adapter"),
            ("output.dtype", "dtype" in self.output.model_fields_set, "use extract.dtype"),
            ("output.max_shard_size", "max_shard_size" in self.output.model_fields_set, ""),
            ("engine.name", self.engine.name != "stream", ""),
            ("engine.max_memory", self.engine.max_memory is not None, ""),
            ("engine.offload_folder", self.engine.offload_folder is not None, ""),
            ("config.overrides", bool(self.config.overrides), ""),
            ("config.config_from", self.config.config_from is not None, ""),
        )
        for name, is_set, hint in merge_only:
            if is_set:
                raise ValueError(
                    f"{name}: not part of an extraction (an extract: section); remove it"
                    + (f" ({hint})" if hint else "")
                )
        if self.engine.workers > 1 and self.engine.device.startswith("cuda"):
            raise ValueError(
                f"engine.workers: {self.engine.workers} processes are for the CPU; with "
                f"engine.device {self.engine.device} each GPU gets one thread: leave out "
                "engine.workers, or use engine.device cpu (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _output_target(self) -> MergeSpec:
        if self.output.dir is None and self.publish is None:
            raise ValueError("output.dir is required unless publish.repo_id is set")
        return self

    @model_validator(mode="after")
    def _engine_weights(self) -> MergeSpec:
        if self.engine.name == "peft":
            for i, adapter in enumerate(self.adapters):
                if adapter.weight != 1.0:
                    raise ValueError(
                        f"adapters[{i}].weight: {adapter.weight:g}: the peft engine merges "
                        "every adapter at weight 1.0; use the stream engine "
                        "(engine.name: stream) for weighted or negative merges"
                    )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def repeated_adapters(spec: MergeSpec) -> list[str]:
    """A line for each adapter the spec names more than once (the same local folder, or the
    same Hub id at the same revision): merged twice, its delta counts twice."""
    first: dict[tuple[str, str | None], int] = {}
    lines: list[str] = []
    for i, adapter in enumerate(spec.adapters):
        path = adapter.path
        key = (os.path.realpath(path), None) if os.path.exists(path) else (path, adapter.revision)
        if key in first:
            j = first[key]
            lines.append(
                f"adapters[{j}] and adapters[{i}] are the same adapter ({adapter.display()}): "
                "it is merged twice and its delta counts twice; that is meant only with "
                "weights (give it once with --weights, or weights that add up as intended)"
            )
        else:
            first[key] = i
    return lines


# ---------------------------------------------------------------------------------------
# Building a spec from layered sources


def format_validation_error(
    error: ValidationError, origin: str, labels: Mapping[str, str] | None = None
) -> str:
    """One line per problem, naming the field and suggesting the nearest valid key."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        where = _label_for(loc, labels) or origin
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            parent = item["loc"][:-1]
            key = str(item["loc"][-1])
            valid = _valid_keys(parent)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"unknown key {key!r}{hint} (valid keys: {', '.join(sorted(valid))})"
        elif item["type"] == "missing":
            msg = "is required"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if not loc:
            # A whole-spec check names its field first ("output.dtype: not part of an
            # extraction"): the flag or variable that set that field is where it came from.
            where = _label_for(msg.partition(":")[0], labels) or where
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


def _label_for(loc: str, labels: Mapping[str, str] | None) -> str | None:
    if not labels or not loc:
        return None
    # A list field set whole (adapters) is reported at adapters.0.path: match by prefix.
    best = [key for key in labels if loc == key or loc.startswith(f"{key}.")]
    return labels[max(best, key=len)] if best else None


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = MergeSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            inner = getattr(candidate, "__args__", ())
            for c in (candidate, *inner):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
            else:
                continue
            break
        else:
            return []
    return list(model.model_fields)


def load_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a plain dict (not yet validated).

    The file must be UTF-8 text (a UTF-16, Latin-1 or binary file is refused, naming the
    encoding found), and no mapping may name a key twice: YAML and JSON loaders keep the last
    value silently, which hides a typo'd override; the error names the key and both lines.

    A recipe (``mergejob.yaml`` in an output folder) is a spec plus a ``recipe:`` section
    of what was recorded; that section is dropped here, so a recipe reruns as a spec.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{file}: spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{file}: is a folder; give the spec file inside it") from None
    except OSError as exc:
        raise SpecError(f"{file}: cannot read the spec file ({exc.strerror})") from None
    text = decode_text(raw, file, what="spec file")
    try:
        data = load_mapping_text(text, json_syntax=file.suffix == ".json")
    except DuplicateKeyError as exc:
        raise SpecError(f"{file}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{file}: not valid YAML/JSON: {_one_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{file}: the spec must be a mapping with keys base, adapters, output, ...")
    data.pop(RECIPE_KEY, None)
    return data


def decode_text(raw: bytes, file: Path | str, *, what: str) -> str:
    """``raw`` as UTF-8 text, or a :class:`SpecError` naming ``file`` and the encoding it
    seems to have (UTF-16/32 by their byte-order mark or NUL bytes, binary, else a legacy
    8-bit encoding such as Latin-1) and what to do."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors write one): still UTF-8
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_utf16(raw):
            found = "UTF-16 text"
        elif b"\x00" in raw:
            found = "a binary file"
        else:
            found = f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}: Latin-1?)"
        fix = "; give a YAML or JSON file" if found == "a binary file" else "; save it as UTF-8"
        raise SpecError(f"{file}: the {what} is {found}{fix}") from None
    if "\x00" in text:
        found = "UTF-16 text" if _looks_utf16(raw) else "a binary file"
        fix = "; save it as UTF-8" if found == "UTF-16 text" else "; give a YAML or JSON file"
        raise SpecError(f"{file}: the {what} is {found}{fix}")
    return text


def _looks_utf16(raw: bytes) -> bool:
    # ASCII text in UTF-16 without a byte-order mark: every other byte is NUL.
    sample = raw[:200]
    quarter = len(sample) // 4
    return len(sample) >= 4 and (sample[1::2].count(0) > quarter or sample[0::2].count(0) > quarter)


class DuplicateKeyError(ValueError):
    """A mapping of a spec file names a key twice (the message names the key and lines)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming a key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen and key != "<<":
                raise DuplicateKeyError(
                    f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                    "keep one (the loader would silently use the last)"
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_mapping_text(text: str, *, json_syntax: bool = False) -> Any:
    """Parse YAML (or JSON with ``json_syntax``) text, refusing a key given twice in one
    mapping (:class:`DuplicateKeyError`, naming the key and both lines)."""
    if not json_syntax:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                lines = [str(n) for n in _json_key_lines(text, key)]
                shown = f"{', '.join(lines[:-1])} and {lines[-1]}" if len(lines) > 1 else ""
                where = f" (lines {shown})" if shown else ""
                raise DuplicateKeyError(
                    f"key {key!r} is given twice{where}; keep one (the loader would silently "
                    "use the last)"
                )
            result[key] = value
        return result

    return json.loads(text, object_pairs_hook=unique)


def _json_key_lines(text: str, key: str) -> list[int]:
    """The lines where ``"key":`` appears: the JSON decoder keeps no positions of its keys."""
    pattern = re.compile(re.escape(json.dumps(key)) + r"\s*:")
    return [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]


# The section of ``mergejob.yaml`` that records how an output was made; not part of a spec.
RECIPE_KEY = "recipe"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# Fields whose value is a free-form mapping: the rest of a dotted key is one key inside it.
MAP_FIELDS: tuple[str, ...] = ("config.overrides", "engine.max_memory")
# Sections a spec may give as one string (``path@revision``): see :func:`set_path`.
SOURCE_FIELDS: tuple[str, ...] = ("base", "extract.finetuned", "config.config_from")


def split_dotted(dotted: str) -> list[str]:
    """``config.overrides.rope_scaling.factor`` -> ``[config, overrides, rope_scaling.factor]``."""
    for prefix in MAP_FIELDS:
        if dotted.startswith(f"{prefix}."):
            return [*prefix.split("."), dotted[len(prefix) + 1 :]]
    return dotted.split(".")


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``output.dtype``-style keys in a nested dict, creating sections as needed."""
    parts = split_dotted(dotted)
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if isinstance(child, str) and ".".join(parts[: depth + 1]) in SOURCE_FIELDS:
            # A source the file gives as one string (``base: org/model@v1``): a new path
            # replaces it whole; another field (its revision) splits it first.
            child = {} if depth == len(parts) - 2 and parts[-1] == "path" else split_source(child)
            node[part] = child
        if not isinstance(child, dict):
            raise SpecError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build_spec(
    file_data: Mapping[str, Any] | None = None,
    *layers: Mapping[str, Any],
    origin: str = "spec",
    labels: Mapping[str, str] | None = None,
) -> MergeSpec:
    """Validate a spec made of a file's dict plus override layers (dotted keys), in order.

    ``labels`` maps a dotted key to where its value came from (``--dtype``,
    ``MERGEJOB_DTYPE``), so an error names the flag or variable rather than the file.
    """
    data: dict[str, Any] = json.loads(json.dumps(dict(file_data or {})))
    for layer in layers:
        for key, value in layer.items():
            set_path(data, key, value)
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, origin, labels)) from None


# Environment overrides for ``mergejob run``: defined in settings, with every variable.
ENV_FIELDS = settings.SPEC_VARIABLES


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``MERGEJOB_*`` variables set in ``environ`` as dotted spec overrides."""
    environ = settings.environ() if environ is None else environ
    result: dict[str, Any] = {}
    for name, dotted in ENV_FIELDS.items():
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        if dotted == "adapters":
            result[dotted] = [a for a in re.split(r"[,\s]+", raw) if a]
        elif dotted in ("extract.include", "extract.exclude"):
            result[dotted] = regex_list(name, raw)
        elif dotted == "config.overrides":
            try:
                overrides = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{name}: not a JSON object ({exc.msg})") from None
            if not isinstance(overrides, dict):
                raise SpecError(f'{name}: must be a JSON object, e.g. {{"rope_theta": 1e6}}')
            for key, value in overrides.items():
                result[f"config.overrides.{key}"] = value
        else:
            result[dotted] = raw
    return result


def regex_list(name: str, raw: str) -> list[str]:
    """``MERGEJOB_INCLUDE``/``MERGEJOB_EXCLUDE``: a JSON array of regexes, or regexes separated
    by commas or whitespace (a comma inside ``{m,n}`` belongs to its regex)."""
    if raw.lstrip().startswith("["):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{name}: not a JSON array ({exc.msg})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f'{name}: must be a JSON array of strings, e.g. ["q_proj", "v_proj"]')
        return value
    return [p for p in re.split(r"\s+|,(?![^{]*\})", raw) if p]


def env_labels(overrides: Mapping[str, Any]) -> dict[str, str]:
    """Which variable set each dotted key of :func:`env_overrides` (for error messages)."""
    by_field = {dotted: name for name, dotted in ENV_FIELDS.items()}
    labels = {}
    for key in overrides:
        field = "config.overrides" if key.startswith("config.overrides.") else key
        labels[key] = by_field.get(field, key)
    return labels


@dataclass(frozen=True)
class RunSources:
    """What ``mergejob run`` layers under its flags: the spec file read (``path``, None when
    there was none to read) and its content, then the ``MERGEJOB_*`` overrides."""

    path: str | None
    file_data: dict[str, Any]
    environment: dict[str, Any]

    @property
    def labels(self) -> dict[str, str]:
        """Which variable set each key of ``environment`` (for error messages)."""
        return env_labels(self.environment)


def run_sources(
    overrides: Mapping[str, Any], environ: Mapping[str, str], *, config: str | None = None
) -> RunSources:
    """The layers of ``mergejob run`` under ``overrides`` (its flags, as dotted keys):
    file, then ``MERGEJOB_*`` variables, then the overrides (see :func:`build_spec`).

    The file is ``config``, else ``$MERGEJOB_CONFIG``, else the mounted ConfigMap's path
    (``settings.DEFAULT_CONFIG_PATH``). Only that default may be missing, and only when the
    variables and ``overrides`` name the base and the adapters (or the fine-tuned model of an
    extraction). ``environ`` is the process environment (``settings.environ()``), or a mapping
    standing for it.

    Example::

        sources = run_sources({"output.dtype": "float16"}, settings.environ())
        spec = build_spec(sources.file_data, sources.environment, {"output.dtype": "float16"})
    """
    explicit = bool(config) or bool(environ.get(settings.CONFIG_ENV))
    path = config or environ.get(settings.CONFIG_ENV) or settings.DEFAULT_CONFIG_PATH
    environment = env_overrides(environ)
    given = {**environment, **overrides}
    if not explicit and not Path(path).exists():
        if "base.path" not in given or not ({"adapters", FINETUNED_FIELD} & set(given)):
            raise SpecError(
                f"{path}: spec file not found; mount the ConfigMap there, set MERGEJOB_CONFIG "
                "or pass --config, or give MERGEJOB_BASE and MERGEJOB_ADAPTERS (a merge) or "
                "MERGEJOB_FINETUNED (an extraction)"
            )
        check_task_variables({}, environment, None)
        return RunSources(path=None, file_data={}, environment=environment)
    try:
        file_data = load_spec_file(path)
    except SpecError as exc:
        if config or not environ.get(settings.CONFIG_ENV):
            raise
        # The file was named by the variable: say so (the pod's env, not a flag, is wrong).
        raise SpecError(f"{settings.CONFIG_ENV}: {exc}") from None
    check_task_variables(file_data, environment, path)
    return RunSources(path=path, file_data=file_data, environment=environment)


# The variable that makes a job an extraction (as MERGEJOB_ADAPTERS makes one a merge).
FINETUNED_FIELD = "extract.finetuned.path"


def check_task_variables(
    file_data: Mapping[str, Any], environment: Mapping[str, Any], path: str | None
) -> None:
    """Refuse ``MERGEJOB_*`` variables of one task (merge or extraction) on a job of the other,
    naming the variable: a :class:`SpecError` rather than a spec that validates to something
    else. ``environment`` is :func:`env_overrides`' result; ``file_data`` the spec file's."""
    labels = env_labels(environment)
    where = path or "the environment"
    extract_vars = [labels[k] for k in environment if k.startswith("extract.")]
    file_extracts = file_data.get("extract") is not None
    file_merges = bool(file_data.get("adapters"))
    if "adapters" in environment and FINETUNED_FIELD in environment:
        raise SpecError(
            "MERGEJOB_ADAPTERS and MERGEJOB_FINETUNED: both set; a job merges adapters "
            "(MERGEJOB_ADAPTERS) or extracts one from a fine-tuned model (MERGEJOB_FINETUNED), "
            "not both: unset one"
        )
    if "adapters" in environment and file_extracts:
        raise SpecError(
            f"MERGEJOB_ADAPTERS: a merge's adapters, but {where} describes an extraction (an "
            "extract: section); unset MERGEJOB_ADAPTERS, or give a merge spec"
        )
    if "output.dtype" in environment and (file_extracts or FINETUNED_FIELD in environment):
        raise SpecError(
            "MERGEJOB_DTYPE: output.dtype is not part of an extraction (an extract: section); "
            "unset it (the factors' dtype is MERGEJOB_EXTRACT_DTYPE)"
        )
    if not extract_vars or file_extracts:
        return
    if FINETUNED_FIELD not in environment:
        raise SpecError(
            f"{extract_vars[0]}: an extraction setting, but the job names no fine-tuned model; "
            f"set MERGEJOB_FINETUNED (or an extract: section in the spec file) to extract, or "
            f"unset {extract_vars[0]} for a merge"
        )
    if file_merges:
        raise SpecError(
            f"MERGEJOB_FINETUNED: makes the job an extraction, but {where} lists adapters: to "
            "merge; unset MERGEJOB_FINETUNED, or give a spec without adapters:"
        )


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON-typed value (``1e6`` a number, ``true`` a bool,
    ``{"type": "linear"}`` an object); a value that is not JSON is a string."""
    if "=" not in text:
        raise SpecError(f"--set-config {text}: expected KEY=VALUE, e.g. rope_theta=500000.0")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SpecError(f"--set-config {text}: the key is empty")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value
