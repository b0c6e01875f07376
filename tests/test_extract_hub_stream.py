"""An extraction from two Hub models streamed shard by shard, as the merge streams its base.

Against the project's Hub test server, with its link throttled: the plan comes from the
shards' headers (range reads), both models' shards are fetched in the order the groups read
them, and the first group is written before the last shard of either model has arrived; the
adapter is byte for byte the one extracted from both models on disk; the plan id and the
recipe's inputs are those of a whole download, so a rerun recognises the finished output
without downloading a shard; a failed download stops the job with a line naming the file and
keeps the finished groups, which the rerun resumes.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, snapshot_download

import mergejob
from mergejob import output, recipe
from mergejob.errors import MergeFailedError
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
    # About 3 s for both models on this link, one file at a time.
    hub_env.link.download_bytes_per_second = total / 3.0
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
        result = mergejob.extract(_spec(out, download_workers=1))
    finally:
        stop.set()
        watcher.join()
        hub_env.link.download_bytes_per_second = None
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
