"""mergejob.yaml: the resolved spec, checksums, versions and timings; a rerun from it
reproduces the output byte for byte."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

import mergejob
from mergejob.recipe import RECIPE_FILE, read_recipe


@pytest.fixture(scope="module")
def job(models) -> dict[str, Path]:
    base = models.base(tie_word_embeddings=True)
    return {
        "base": base,
        "a": models.adapter(base, target_modules=["q_proj", "v_proj", "lm_head"]),
        "b": models.adapter(base, target_modules=["o_proj"], seed=4, use_rslora=True),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != RECIPE_FILE}


def weight_files(folder: Path) -> dict[str, bytes]:
    return {n: b for n, b in model_files(folder).items() if n.endswith(".safetensors")}


@pytest.fixture(scope="module")
def merged(job, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "merged"
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(job["base"]),
            "adapters": [str(job["a"]), {"path": str(job["b"]), "weight": 0.5}],
            "output": {"dir": str(out), "max_shard_size": "100KB"},
            "config": {"overrides": {"max_position_embeddings": 4096}},
        }
    )
    mergejob.merge(spec)
    return out


def test_the_recipe_is_the_resolved_spec(job, merged: Path) -> None:
    recipe = read_recipe(merged)
    assert recipe["base"]["path"] == str(job["base"])
    assert [a["weight"] for a in recipe["adapters"]] == [1.0, 0.5]
    assert recipe["output"]["dtype"] == "bfloat16"  # "auto", resolved
    assert recipe["output"]["dir"] == str(merged)
    assert recipe["config"]["overrides"] == {"max_position_embeddings": 4096}
    assert recipe["engine"]["name"] == "stream"
    spec = dict(recipe)
    spec.pop("recipe")
    mergejob.MergeSpec.model_validate(spec)  # a valid spec as it stands


def test_the_recipe_records_checksums_versions_and_timings(job, merged: Path) -> None:
    record = read_recipe(merged)["recipe"]
    outputs = record["outputs"]
    assert set(outputs) == {p.name for p in merged.iterdir() if p.name != RECIPE_FILE}
    for name, digest in outputs.items():
        assert sha256(merged / name) == digest, name
    base_record, *adapter_records = record["inputs"]
    assert base_record["role"] == "base"
    assert base_record["files"]["config.json"] == sha256(job["base"] / "config.json")
    shards = [n for n in base_record["files"] if n.endswith(".safetensors")]
    assert shards and all(base_record["files"][n] == sha256(job["base"] / n) for n in shards)
    assert [r["role"] for r in adapter_records] == ["adapter", "adapter"]
    weights = adapter_records[1]["files"]["adapter_model.safetensors"]
    assert weights == sha256(job["b"] / "adapter_model.safetensors")
    assert {"mergejob", "torch", "transformers", "peft", "python"} <= set(record["versions"])
    assert record["versions"]["mergejob"] == mergejob.__version__
    assert {"resolve", "plan", "merge", "write"} <= set(record["timings"])
    assert record["engine"]["name"] == "stream"
    assert record["engine"]["tensors_changed"] > 0


def test_a_rerun_from_the_recipe_is_byte_identical(merged: Path, run_cli, tmp_path: Path) -> None:
    again = tmp_path / "again"
    code, _, err = run_cli("run", "--config", merged / RECIPE_FILE, "--output_dir", again)
    assert code == 0, err
    assert model_files(again) == model_files(merged)
    assert read_recipe(again)["recipe"]["outputs"] == read_recipe(merged)["recipe"]["outputs"]


def test_a_rerun_whose_inputs_changed_fails_before_writing_anything(
    job, run_cli, tmp_path: Path
) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(job["base"], base)
    shutil.copytree(job["b"], adapter)
    first = tmp_path / "first"
    code, _, err = run_cli("merge", "--base", base, "--adapters", adapter, "--output_dir", first)
    assert code == 0, err
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: same size, other bytes
    weights.write_bytes(bytes(data))

    again = tmp_path / "again"
    code, out, err = run_cli("run", "--config", first / RECIPE_FILE, "--output_dir", again)
    assert code == 2, out + err
    assert f"{adapter}/adapter_model.safetensors: sha256" in err
    assert "differs from the recipe's" in err and "delete the recipe: section" in err
    assert not again.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # An input the flags replace is not the recipe's: nothing to compare it with.
    other = tmp_path / "other"
    shutil.copytree(job["b"], other)
    code, _, err = run_cli(
        "run", "--config", first / RECIPE_FILE, "--adapters", other, "--output_dir", again
    )
    assert code == 0, err
    # The weights are the same; the card names the other adapter's path.
    assert weight_files(again) == weight_files(first) != {}


def test_hub_inputs_are_pinned_to_their_commit(models, hub_env, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    base = models.base()
    adapter = models.adapter(base)
    api = HfApi(token=hub_env.alice_token)
    for repo, folder in (("alice/base", base), ("alice/adapter", adapter)):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
    commit = api.model_info("alice/base").sha
    out = tmp_path / "out"
    spec = mergejob.MergeSpec.model_validate(
        {"base": "alice/base@main", "adapters": ["alice/adapter"], "output": {"dir": str(out)}}
    )
    mergejob.merge(spec, token=hub_env.alice_token)
    recipe = read_recipe(out)
    assert recipe["base"] == {"path": "alice/base", "revision": commit, "trust_remote_code": False}
    assert len(recipe["adapters"][0]["revision"]) == 40
    base_record = recipe["recipe"]["inputs"][0]
    assert base_record["source"] == "alice/base"
    assert base_record["revision"] == "main"
    assert base_record["commit"] == commit
    for name, digest in base_record["files"].items():
        assert digest == sha256(base / name), name
    assert hub_env.alice_token not in (out / RECIPE_FILE).read_text()

    # The recipe reruns against the same commits (from the cache, even offline).
    again = tmp_path / "again"
    data = yaml.safe_load((out / RECIPE_FILE).read_text())
    data["output"]["dir"] = str(again)
    data.pop("recipe")
    mergejob.merge(mergejob.MergeSpec.model_validate(data), token=hub_env.alice_token)
    first, second = model_files(out), model_files(again)
    assert second == first  # the model card included: it names the commit, not the branch
    assert f"`{commit[:12]}`".encode() in first["README.md"]
