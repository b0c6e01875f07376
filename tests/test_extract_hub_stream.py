"""An extraction from two Hub models streamed shard by shard, as the merge streams its base.

Against the project's Hub test server, with its link throttled: the plan comes from the
shards' headers (range reads), both models' shards are fetched in the order the groups read
them, and the first group is written before the last shard of either model has arrived; the
adapter is byte for byte the one extracted from both models on disk; the plan id and the
recipe's inputs are those of a whole download, so a rerun recognises the finished output
without downloading a shard; a failed download stops the job with a line naming the file and
keeps the finished groups, which the rerun resumes. The checks before the first group read
what they compare by HTTP range requests, no whole shard: on a Qwen2 (q/k/v biases in every
layer) the first group is still written before the last shard of either model arrives, only
the compared tensors are requested, the decision to save the layers whose bias changed whole
(lora_bias blocked) comes before any whole shard, and a tensor so read is the file's bytes (a
cut request tried again).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

import mergejob
from mergejob import output, recipe
from mergejob.errors import MergeFailedError
from mergejob.extraction.inputs import open_inputs
from mergejob.extraction.job import resolve_inputs
from mergejob.extraction.plan import plan_extraction
from mergejob.fetch import cache_bytes
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.shards import RECORDS_DIR
from mergejob.sources import BASE_PATTERNS, ResolvedSource
from tests.support.hubserver.fixtures import SeededHubServer
from tests.support.models import ModelFactory

SHARD = "30KB"  # several shards per model, as a 70B model comes in ~30
COMPARED = ("adapter_model.safetensors", "extraction.json")


@pytest.fixture
def hub_models(hub_env: SeededHubServer, models: ModelFactory) -> dict[str, Any]:
    """org/base and org/tuned (its fine-tune), each in several shards."""
    base = models.base(max_shard_size=SHARD)
    tuned = models.finetune(base, rank=4, norms=True, rows_only=True, max_shard_size=SHARD)
    api = HfApi(token=hub_env.alice_token)
    commits = {}
    for name, folder in (("base", base), ("tuned", tuned)):
        api.create_repo(f"org/{name}")
        commits[name] = api.upload_folder(repo_id=f"org/{name}", folder_path=folder).oid
    shards = {
        "base": CheckpointIndex.from_folder(base).shards,
        "tuned": CheckpointIndex.from_folder(tuned).shards,
    }
    assert len(shards["base"]) >= 4 and len(shards["tuned"]) >= 4, shards
    hub_env.clear_requests()
    return {"base": base, "tuned": tuned, "commits": commits, "shards": shards}


def _spec(out: Path, base: str = "org/base", tuned: str = "org/tuned", **engine: Any) -> Any:
    return mergejob.MergeSpec.model_validate(
        {
            "base": base,
            "extract": {"finetuned": tuned, "max_rank": 8},
            "output": {"dir": str(out)},
            "engine": engine,
        }
    )


def _served(hub: SeededHubServer) -> dict[str, int]:
    """Bytes served per shard (``org/<repo>/<file>``) by whole-file downloads (status 200;
    the header range reads, 206, are a few hundred bytes)."""
    served: dict[str, int] = {}
    for r in hub.requests:
        if r.method == "GET" and r.status == 200 and r.path.endswith(".safetensors"):
            repo = "org/base" if "/org/base/" in r.path else "org/tuned"
            key = f"{repo}/{r.path.rsplit('/', 1)[-1]}"
            served[key] = served.get(key, 0) + r.bytes_out
    return served


def _snapshot(hub: SeededHubServer, repo: str, commit: str) -> Path:
    from huggingface_hub import constants

    folder = "models--" + repo.replace("/", "--")
    return Path(constants.HF_HUB_CACHE) / folder / "snapshots" / commit


def _same_adapter(a: Path, b: Path) -> None:
    for name in COMPARED:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    config_a = json.loads((a / "adapter_config.json").read_text())
    config_b = json.loads((b / "adapter_config.json").read_text())
    for key in ("base_model_name_or_path", "revision"):  # a path here, a Hub id there
        config_a.pop(key, None)
        config_b.pop(key, None)
    assert config_a == config_b


def _timed_on_a_slow_link(
    hub: SeededHubServer,
    total: int,
    records: Path,
    last: dict[str, Path],
    run: Callable[[], Any],
) -> tuple[Any, dict[str, float]]:
    """``run()`` with the link slowed to about 3 s for ``total`` bytes (one file at a time)
    and when the first part record appeared in ``records`` (``seen["part"]``) and when each
    of ``last``'s files (the last shard of each model) arrived (``seen[side]``)."""
    hub.link.download_bytes_per_second = total / 3.0
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = time.monotonic()
            if "part" not in seen and any(records.rglob("*.json")):
                seen["part"] = now
            for side, path in last.items():
                if side not in seen and path.exists():
                    seen[side] = now
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run()
    finally:
        stop.set()
        watcher.join()
        hub.link.download_bytes_per_second = None
    return result, seen


def test_the_first_group_is_extracted_before_either_model_has_arrived(
    hub_env: SeededHubServer, hub_models: dict[str, Any], tmp_path: Path
) -> None:
    local = mergejob.extract(
        _spec(tmp_path / "local", str(hub_models["base"]), str(hub_models["tuned"]))
    )
    assert local.output_dir is not None
    out = tmp_path / "hub"
    records = output.partial_dir_for(out) / RECORDS_DIR
    snapshots = {
        side: _snapshot(hub_env, f"org/{side}", hub_models["commits"][side])
        for side in ("base", "tuned")
    }
    last = {side: snapshots[side] / hub_models["shards"][side][-1] for side in snapshots}
    total = sum(
        (hub_models[side] / name).stat().st_size
        for side in ("base", "tuned")
        for name in hub_models["shards"][side]
    )
    result, seen = _timed_on_a_slow_link(
        hub_env, total, records, last, lambda: mergejob.extract(_spec(out, download_workers=1))
    )
    assert result.output_dir is not None
    assert {"part", "base", "tuned"} <= set(seen), seen
    assert seen["part"] < seen["base"] and seen["part"] < seen["tuned"], seen
    _same_adapter(local.output_dir, result.output_dir)
    # Each shard of both models downloaded once, whole.
    served = _served(hub_env)
    expected = {
        f"org/{side}/{name}": (hub_models[side] / name).stat().st_size
        for side in ("base", "tuned")
        for name in hub_models["shards"][side]
    }
    assert served == expected


def test_plan_and_recipe_are_those_of_a_whole_download_and_a_rerun_downloads_nothing(
    hub_env: SeededHubServer, hub_models: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = mergejob.extract(_spec(out))
    assert result.output_dir is not None
    document = recipe.read_recipe(out)
    # Both models downloaded whole (what a run did before streaming, and does offline).
    whole = {
        side: ResolvedSource(
            spec=mergejob.MergeSpec.model_validate(
                {"base": f"org/{side}", "extract": {"finetuned": "x"}, "output": {"dir": "x"}}
            ).base,
            local_dir=Path(
                snapshot_download(
                    f"org/{side}",
                    revision=hub_models["commits"][side],
                    allow_patterns=BASE_PATTERNS,
                    token=hub_env.alice_token,
                )
            ),
            repo_id=f"org/{side}",
            commit=hub_models["commits"][side],
        )
        for side in ("base", "tuned")
    }
    spec = _spec(out)
    today = plan_extraction(spec.extract, whole["base"].local_dir, whole["tuned"].local_dir)
    assert output.recipe_plan_id(document) == today.plan_id
    inputs = document["recipe"]["inputs"]
    for record, side, role in zip(inputs, ("base", "tuned"), ("base", "finetuned"), strict=True):
        assert record == recipe.source_record(role, whole[side], BASE_PATTERNS)
    # A rerun elsewhere (a new pod: the output kept, the HF cache empty) recognises it from
    # the headers, without downloading a shard.
    from huggingface_hub import constants

    shutil.rmtree(constants.HF_HUB_CACHE)
    hub_env.clear_requests()
    again = mergejob.extract(_spec(out))
    assert again.already_finished
    assert _served(hub_env) == {}


def test_a_failed_download_names_the_file_and_keeps_the_finished_groups(
    hub_env: SeededHubServer, hub_models: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    last = hub_models["shards"]["tuned"][-1]
    # Every try of the fine-tune's last shard is cut (its first two GETs are the range reads
    # of its header); the groups before it are written first.
    hub_env.drop(
        f"/org/tuned/.*{last}", method="GET", where="response", after_bytes=100, nth=3, times=50
    )
    with pytest.raises(MergeFailedError) as failed:
        mergejob.extract(_spec(out, download_workers=1))
    message = str(failed.value)
    assert message.startswith("fine-tuned model org/tuned@"), message
    assert f"downloading {last} failed" in message and "rerun" in message
    assert "\n" not in message
    partial = output.partial_dir_for(out)
    written = sorted((partial / RECORDS_DIR).rglob("*.json"))
    assert written, "no finished group was kept"
    hub_env.faults.clear()
    hub_env.clear_requests()
    result = mergejob.extract(_spec(out))
    assert result.output_dir is not None
    document = recipe.read_recipe(out)
    assert document["recipe"]["engine"]["resumed_groups"] == len(written)
    # The rerun fetched only what the unfinished groups read: not every shard again.
    served = _served(hub_env)
    assert f"org/tuned/{last}" in served
    assert len(served) < len(hub_models["shards"]["base"]) + len(hub_models["shards"]["tuned"])
    local = mergejob.extract(
        _spec(tmp_path / "local", str(hub_models["base"]), str(hub_models["tuned"]))
    )
    assert local.output_dir is not None
    _same_adapter(local.output_dir, out)


def test_delete_downloaded_keeps_a_window_of_shards_in_the_cache(
    hub_env: SeededHubServer, hub_models: dict[str, Any], tmp_path: Path
) -> None:
    sides = ("base", "tuned")
    total = sum(
        (hub_models[side] / name).stat().st_size
        for side in sides
        for name in hub_models["shards"][side]
    )
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(cache_bytes(f"org/{side}") for side in sides))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = mergejob.extract(
            _spec(tmp_path / "out", download_workers=1, delete_downloaded=True)
        )
    finally:
        stop.set()
        watcher.join()
    assert result.output_dir is not None
    assert 0 < peak[0] < total, (peak[0], total)  # never both models whole on disk
    # The plan's disk figure counts that window, not both models: an upper bound of the
    # shards held at the peak (the peak also counts the small files: configs, tokenizer).
    from mergejob.extraction.report import extraction_plan_report

    plan = extraction_plan_report(
        _spec(tmp_path / "planned", download_workers=1, delete_downloaded=True)
    )
    small = sum(
        p.stat().st_size
        for side in sides
        for p in _snapshot(hub_env, f"org/{side}", hub_models["commits"][side]).iterdir()
        if p.suffix != ".safetensors"
    )
    assert plan.download_bytes == pytest.approx(total, rel=1e-3)  # from the headers
    assert peak[0] - small <= plan.download_window_bytes <= plan.download_bytes
    assert "a window of" in plan.render()
    for side in sides:  # every shard gone once read; the small files stay
        snapshot = _snapshot(hub_env, f"org/{side}", hub_models["commits"][side])
        assert not [n for n in hub_models["shards"][side] if (snapshot / n).exists()]
        assert (snapshot / "config.json").is_file()
    local = mergejob.extract(
        _spec(tmp_path / "local", str(hub_models["base"]), str(hub_models["tuned"]))
    )
    assert local.output_dir is not None
    _same_adapter(local.output_dir, result.output_dir)


def test_local_inputs_are_not_streamed(hub_models: dict[str, Any], tmp_path: Path) -> None:
    spec = _spec(tmp_path / "out", str(hub_models["base"]), str(hub_models["tuned"]))
    inputs = resolve_inputs(spec)
    assert not inputs.streamed
    assert inputs.base.local_dir == Path(hub_models["base"]).resolve()


def test_extract_takes_the_download_flags_of_merge() -> None:
    from mergejob.cli import build_parser
    from mergejob.cli.extract import spec_of

    argv = ["extract", "--base", "org/b", "--finetuned", "org/t", "--output_dir", "o"]
    spec = spec_of(build_parser().parse_args(argv))
    assert spec.engine.download_workers is None and spec.engine.delete_downloaded is None
    flags = ["--download-workers", "2", "--delete-downloaded"]
    spec = spec_of(build_parser().parse_args([*argv, *flags]))
    assert spec.engine.download_workers == 2 and spec.engine.delete_downloaded is True


# ---------------------------------------------------------------------------------------
# The checks before the first group: range reads of the tensors they compare


QKV = ("q_proj", "k_proj", "v_proj")


def _upload(hub: SeededHubServer, folders: dict[str, Path]) -> dict[str, str]:
    """Each folder as the private repo ``org/<name>``; its commit."""
    api = HfApi(token=hub.alice_token)
    commits = {}
    for name, folder in folders.items():
        api.create_repo(f"org/{name}", private=True)
        commits[name] = api.upload_folder(repo_id=f"org/{name}", folder_path=folder).oid
    hub.clear_requests()
    return commits


@pytest.fixture
def qwen2_hub(
    hub_env: SeededHubServer, models: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Private org/qbase (Qwen2: q/k/v biases in every layer) and org/qtuned, whose q/k/v
    weights and biases changed (so the biases are carried, and every bias-less LoRA layer's
    weight is compared before the first group), several shards each. The token comes from
    ``HF_TOKEN``."""
    base = models.base(family="qwen2", max_shard_size=SHARD)
    tuned = models.finetune(base, modules=QKV, biases=True, rows_only=True, max_shard_size=SHARD)
    folders = {"qbase": base, "qtuned": tuned}
    commits = _upload(hub_env, folders)
    shards = {name: CheckpointIndex.from_folder(folder).shards for name, folder in folders.items()}
    assert all(len(s) >= 4 for s in shards.values()), shards
    monkeypatch.setenv("HF_TOKEN", hub_env.alice_read_token)
    return {"folders": folders, "commits": commits, "shards": shards}


def _repo_file(path: str) -> tuple[str, str] | None:
    """``(repo, file)`` of a ``/<org>/<name>/resolve/<commit>/<file>`` download."""
    parts = path.split("/")
    if len(parts) == 6 and parts[3] == "resolve" and parts[5].endswith(".safetensors"):
        return f"{parts[1]}/{parts[2]}", parts[5]
    return None


def _ranges(hub: SeededHubServer) -> dict[tuple[str, str], list[int]]:
    """The bytes of each range read (206) by file, headers' reads included."""
    found: dict[tuple[str, str], list[int]] = {}
    for r in hub.requests:
        key = _repo_file(r.path)
        if r.method == "GET" and r.status == 206 and key is not None:
            found.setdefault(key, []).append(r.bytes_out)
    return found


def _compared(base: Path, tuned: Path, out: Path) -> list[str]:
    """What the checks compare, changed biases found: the tensors no LoRA carries, the LoRA
    layers' biases and the weights of the LoRA layers without one (none changed here)."""
    plan = plan_extraction(_spec(out, str(base), str(tuned)).extract, base, tuned)
    names = [*plan.checks, *(n for m in plan.modules for n in m.checks)]
    names += [m.bias for m in plan.modules if m.bias]
    names += [m.weight for m in plan.decomposed if m.bias is None and m.weight]
    assert any(n.endswith("q_proj.bias") for n in names)
    assert any(n.endswith("o_proj.weight") for n in names)
    assert any(n.endswith("down_proj.weight") for n in names)
    return names


def _header_reads(folder: Path, name: str) -> list[int]:
    """The two range reads of a shard's header: its length, then its JSON."""
    from mergejob.io.headers import read_header

    return [8, read_header(folder / name).length]


def test_the_checks_read_the_compared_tensors_by_range_requests_not_whole_shards(
    hub_env: SeededHubServer, qwen2_hub: dict[str, Any], tmp_path: Path
) -> None:
    folders, shards = qwen2_hub["folders"], qwen2_hub["shards"]
    local = mergejob.extract(
        _spec(tmp_path / "local", str(folders["qbase"]), str(folders["qtuned"]))
    )
    assert local.output_dir is not None
    config = json.loads((local.output_dir / "adapter_config.json").read_text())
    assert config["lora_bias"] is True  # the changed biases are carried
    hub_env.clear_requests()
    out = tmp_path / "hub"
    records = output.partial_dir_for(out) / RECORDS_DIR
    last = {
        side: _snapshot(hub_env, f"org/{side}", qwen2_hub["commits"][side]) / shards[side][-1]
        for side in ("qbase", "qtuned")
    }
    total = sum(
        (folders[side] / name).stat().st_size
        for side in ("qbase", "qtuned")
        for name in shards[side]
    )
    result, seen = _timed_on_a_slow_link(
        hub_env,
        total,
        records,
        last,
        lambda: mergejob.extract(_spec(out, "org/qbase", "org/qtuned", download_workers=1)),
    )
    assert result.output_dir is not None
    # Every bias in both models is compared, and with the biases changed every bias-less
    # LoRA layer's weight: the first group is written before the last shard of either model.
    assert {"part", "qbase", "qtuned"} <= set(seen), seen
    assert seen["part"] < seen["qbase"] and seen["part"] < seen["qtuned"], seen
    _same_adapter(local.output_dir, result.output_dir)
    # The range reads: each shard's header (two), then only the compared tensors, each
    # once, whole (those of a shard already on disk were read there); the tensors of the
    # last shards, never on disk before the first group, all by range requests.
    compared = _compared(folders["qbase"], folders["qtuned"], tmp_path / "planned")
    ranges = _ranges(hub_env)
    for side in ("qbase", "qtuned"):
        index = CheckpointIndex.from_folder(folders[side])
        for name in shards[side]:
            got = sorted(ranges.get((f"org/{side}", name), []))
            tensors = [index.tensors[n].nbytes for n in compared if index.tensors[n].shard == name]
            allowed = Counter([*_header_reads(folders[side], name), *tensors])
            assert not Counter(got) - allowed, (side, name, got, allowed)
            if name == shards[side][-1]:
                assert Counter(got) == allowed, (side, name)
    # Each shard downloaded once, whole, besides.
    served = {
        key: n
        for key, n in (
            (_repo_file(r.path), r.bytes_out)
            for r in hub_env.requests
            if r.method == "GET" and r.status == 200
        )
        if key is not None
    }
    assert served == {
        (f"org/{side}", name): (folders[side] / name).stat().st_size
        for side in ("qbase", "qtuned")
        for name in shards[side]
    }


def test_the_bias_decision_comes_before_a_whole_shard_is_downloaded(
    hub_env: SeededHubServer, models: ModelFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer of a Qwen2 changed, its q/k/v biases too (a full fine-tune): the first
    bias-less LoRA layer compared has changed, so PEFT's lora_bias cannot carry the biases
    and q/k/v are saved whole. That decision reads the biases and that one weight, by range
    requests: it is made before any whole shard is on disk, and the adapter is the one
    extracted from both models on disk."""
    import logging

    # Shards a few times a layer's weight, as a real model's are (30 layers' worth there).
    base = models.base(family="qwen2", max_shard_size="100KB")
    every = (*QKV, "o_proj", "gate_proj", "up_proj", "down_proj")
    blocked = models.finetune(
        base, modules=every, biases=True, rows_only=True, max_shard_size="100KB"
    )
    local = mergejob.extract(_spec(tmp_path / "local", str(base), str(blocked)))
    assert local.output_dir is not None
    folders = {"rbase": base, "rblocked": blocked}
    commits = _upload(hub_env, folders)
    monkeypatch.setenv("HF_TOKEN", hub_env.alice_read_token)
    shards = {name: CheckpointIndex.from_folder(folder).shards for name, folder in folders.items()}
    snapshots = [_snapshot(hub_env, f"org/{side}", commits[side]) for side in folders]
    decided: list[tuple[str, list[str]]] = []

    class Decision(logging.Handler):
        """At the decision's log line: what is on disk; then the link is let free."""

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "saved whole (modules_to_save" in message:
                on_disk = [p.name for s in snapshots for p in s.glob("*.safetensors")]
                decided.append((message, on_disk))
                hub_env.link.download_bytes_per_second = None

    engine_log = logging.getLogger("mergejob.extraction.engine")
    handler, level = Decision(), engine_log.level
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    # About 2 s a shard on this link, until the decision.
    smallest = min((folders[s] / n).stat().st_size for s in folders for n in shards[s])
    hub_env.link.download_bytes_per_second = smallest / 2.0
    try:
        result = mergejob.extract(_spec(tmp_path / "hub", "org/rbase", "org/rblocked"))
    finally:
        hub_env.link.download_bytes_per_second = None
        engine_log.removeHandler(handler)
        engine_log.setLevel(level)
    assert len(decided) == 1, decided
    message, on_disk = decided[0]
    assert on_disk == [], on_disk
    assert message.startswith("6 LoRA layer(s) whose bias changed saved whole"), message
    plan = plan_extraction(_spec(tmp_path / "x", str(base), str(blocked)).extract, base, blocked)
    first = next(m for m in plan.decomposed if m.bias is None and m.weight)
    assert f"the changed LoRA layer {first.module} cannot take one" in message
    assert result.output_dir is not None
    _same_adapter(local.output_dir, result.output_dir)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["modules_to_save"]
    # The range reads: the headers, the biases, and the first bias-less weight compared
    # (the groups then read the shards downloaded whole).
    assert first.weight is not None
    index = CheckpointIndex.from_folder(base)
    wanted = [n for n in index.tensors if n.endswith(".bias")] + [first.weight]
    ranges = _ranges(hub_env)
    for side in folders:
        tensors = CheckpointIndex.from_folder(folders[side]).tensors
        for name in shards[side]:
            got = Counter(ranges.get((f"org/{side}", name), []))
            want = [tensors[n].nbytes for n in wanted if tensors[n].shard == name]
            assert got == Counter([*_header_reads(folders[side], name), *want]), (side, name)


def test_a_tensor_read_by_a_range_request_is_the_files_bytes(
    hub_env: SeededHubServer, qwen2_hub: dict[str, Any], tmp_path: Path
) -> None:
    """Every tensor of both models read alone from the Hub (none on disk) is byte for byte
    the file's; a range read whose connection is cut is tried again."""
    from safetensors.torch import load_file

    from mergejob.extraction.inputs import StreamedTensors

    spec = _spec(tmp_path / "out", "org/qbase", "org/qtuned")
    inputs = open_inputs(spec.base, spec.extract.finetuned, token=hub_env.alice_read_token)
    source = StreamedTensors(inputs.streams, lambda path: False, token=hub_env.alice_read_token)
    folders = qwen2_hub["folders"]
    first = qwen2_hub["shards"]["qbase"][0]
    # The first tensor read of the base's first shard is cut (the header reads were before).
    hub_env.drop(f"/org/qbase/.*{first}", method="GET", where="response", after_bytes=10)
    hub_env.clear_requests()
    count = 0
    for stream, side in zip(inputs.streams, ("qbase", "qtuned"), strict=True):
        assert stream is not None
        want = {
            name: tensor
            for shard in qwen2_hub["shards"][side]
            for name, tensor in load_file(str(folders[side] / shard)).items()
        }
        assert set(stream.index.tensors) == set(want)
        for name, ref in stream.index.tensors.items():
            got = source.tensor(ref)
            assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
            assert (
                got.reshape(-1).view(torch.uint8).equal(want[name].reshape(-1).view(torch.uint8))
            ), name
            count += 1
    assert source.range_reads == count
    assert not [p for s in inputs.streams if s for p in Path(s.folder).glob("*.safetensors")]
    cut = [r for r in hub_env.requests if r.fault == "drop"]
    assert len(cut) == 1 and first in cut[0].path
    # Cut three times (every try): one line naming the file and the tensor.
    hub_env.drop(f"/org/qbase/.*{first}", method="GET", where="response", after_bytes=10, times=3)
    base = inputs.streams[0]
    assert base is not None
    ref = next(r for r in base.index.tensors.values() if r.shard == first)
    with pytest.raises(MergeFailedError) as failed:
        source.tensor(ref)
    message = str(failed.value)
    assert message.startswith(f"org/qbase/{first}@"), message
    assert f"reading {ref.name} by an HTTP range request failed" in message
    assert "rerun" in message and "\n" not in message
