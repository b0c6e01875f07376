"""``mergejob plan``: the job checked and costed from headers and adapter configs only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergejob.io.checkpoint import CheckpointIndex


@pytest.fixture(scope="module")
def tied(models) -> Path:
    return models.base(tie_word_embeddings=True)


def plan_json(run_cli, *args: object) -> tuple[int, dict]:
    code, out, err = run_cli("plan", "--json", *args)
    assert out.strip(), err
    return code, json.loads(out)


def tensors_of(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor's dtype, shape and raw bytes, by name."""
    result = {}
    for shard in CheckpointIndex.from_folder(folder).shards:
        with safe_open(str(folder / shard), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = handle.get_tensor(name)
                raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                result[name] = (str(tensor.dtype), tuple(tensor.shape), raw)
    return result


def test_plan_reports_exactly_the_tensors_the_merge_changes(
    models, tied: Path, run_cli, tmp_path: Path
) -> None:
    attn = models.adapter(tied, target_modules=["q_proj", "v_proj", "lm_head"])
    mlp = models.adapter(tied, target_modules=["gate_proj", "down_proj"], seed=7, use_dora=True)
    out = tmp_path / "out"
    job = ("--base", tied, "--adapters", attn, mlp, "--output_dir", out)
    code, plan = plan_json(run_cli, *job)
    assert code == 0, plan["problems"]
    assert plan["ok"] is True
    code, _, err = run_cli("merge", *job)
    assert code == 0, err
    before, after = tensors_of(tied), tensors_of(out)
    changed = {name for name, data in after.items() if before.get(name) != data}
    assert set(plan["changed_tensors"]) == changed
    assert "lm_head.weight" in changed  # untied: a tensor the base did not store
    assert plan["tensors_changed"] == len(changed)
    assert plan["tensors_total"] == len(after)
    assert plan["output_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + _header_len(p) for p in out.glob("*.safetensors")
    )
    assert any("tied embeddings will be untied" in n for n in plan["notices"])


def _header_len(path: Path) -> int:
    import struct

    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def test_plan_summarises_each_adapter(models, run_cli, tmp_path: Path) -> None:
    base = models.base()
    adapter = models.adapter(
        base,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"o_proj": 16},
    )
    code, plan = plan_json(run_cli, "--base", base, "--adapters", adapter)
    assert code == 0
    (summary,) = plan["adapters"]
    assert summary["method"] == "LORA"
    assert summary["variant"] == "rslora"
    assert summary["targets"] == ["k_proj", "o_proj", "q_proj"]
    assert summary["ranks"] == [2, 4]
    assert summary["alphas"] == [8.0, 16.0]
    assert summary["modules"] == 6
    assert sorted(summary["scales"]) == sorted({8 / 2**0.5, 8 / 2, 16 / 2})
    code, text, _ = run_cli("plan", "--base", base, "--adapters", adapter)
    assert code == 0
    for needle in ("LORA (rslora)", "rank 2, 4", "changes: 6 of", "memory, stream engine",
                   "time, peft engine", "disk:", "problems: none"):  # fmt: skip
        assert needle in text


def test_plan_finds_every_incompatibility_without_reading_weights(
    models, tied: Path, run_cli, tmp_path: Path
) -> None:
    # The base's last shard keeps its header but loses most of its data.
    base = tmp_path / "base"
    shutil.copytree(tied, base)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    header_end = 8 + _header_len(shard)
    with open(shard, "r+b") as handle:
        handle.truncate(header_end + 100)

    fits = models.adapter(tied, target_modules=["q_proj", "lm_head"])  # unties, fits
    deeper = models.adapter(models.base(tie_word_embeddings=True, num_layers=3),
                            target_modules=["v_proj"], layers_to_transform=[2])  # fmt: skip
    wider = models.adapter(
        models.base(tie_word_embeddings=True, hidden_size=32, intermediate_size=64),
        target_modules=["o_proj"],
    )
    # Grows lm_head to 100 rows but (unlike PEFT's own save) not the input embeddings.
    head_only = tmp_path / "head-only"
    shutil.copytree(models.adapter(tied, modules_to_save=["lm_head"], resize_vocab_to=100,
                                   target_modules=["q_proj"]), head_only)  # fmt: skip
    weights = load_file(str(head_only / "adapter_model.safetensors"))
    weights = {k: v for k, v in weights.items() if "embed_tokens" not in k}
    save_file(weights, str(head_only / "adapter_model.safetensors"))
    loha = tmp_path / "loha"
    shutil.copytree(fits, loha)
    config = json.loads((loha / "adapter_config.json").read_text())
    config["peft_type"] = "LOHA"
    (loha / "adapter_config.json").write_text(json.dumps(config))

    out = tmp_path / "out"
    args = ("--base", base, "--adapters", fits, deeper, wider, head_only, loha,
            "--output_dir", out)  # fmt: skip
    code, plan = plan_json(run_cli, *args)
    assert code == 2
    assert plan["ok"] is False
    problems = "\n".join(plan["problems"])
    assert "truncated: holds 100 of the" in problems  # found, yet every other check ran
    assert "maps to no base tensor" in problems and "layers.2.self_attn.v_proj" in problems
    assert "do not fit model.layers.0.self_attn.o_proj.weight" in problems
    assert "has 96 rows but lm_head.weight has 100" in problems
    assert "unsupported by the stream engine" in problems and "LOHA" in problems
    assert any("tied embeddings will be untied" in n for n in plan["notices"])
    assert plan["output_bytes"] > 0 and plan["memory"]

    # merge makes the same checks first, and stops before reading any weight.
    code, _, err = run_cli("merge", "--base", tied, "--adapters", fits, wider,
                           "--output_dir", out)  # fmt: skip
    assert code == 2
    assert "do not fit model.layers.0.self_attn.o_proj.weight" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    code, _, err = run_cli("merge", "--base", base, "--adapters", fits, "--output_dir", out)
    assert code == 2
    assert "truncated download?" in err


def test_plan_reports_config_problems_and_strict_notices(tied: Path, models, run_cli) -> None:
    adapter = models.adapter(tied, target_modules=["q_proj", "lm_head"])
    code, plan = plan_json(run_cli, "--base", tied, "--adapters", adapter,
                           "--set-config", "rope_thetta=1.0")  # fmt: skip
    assert code == 2
    assert any("did you mean 'rope_theta'?" in p for p in plan["problems"])
    code, plan = plan_json(run_cli, "--base", tied, "--adapters", adapter,
                           "--set-config", "rope_theta=1e6")  # fmt: skip
    assert code == 0
    assert plan["config"]["rope_theta"] == 1e6
    assert plan["config"]["tie_word_embeddings"] is False
    code, plan = plan_json(run_cli, "--base", tied, "--adapters", adapter, "--strict")
    assert code == 2  # the untie notice counts with --strict


def test_plan_estimates_disk_memory_and_time(models, run_cli, tmp_path: Path) -> None:
    base = models.base()
    adapter = models.adapter(base)
    code, plan = plan_json(run_cli, "--base", base, "--adapters", adapter,
                           "--output_dir", tmp_path / "out", "--workers", "2")  # fmt: skip
    assert code == 0
    assert plan["disk"]["needed_bytes"] == plan["output_bytes"]  # local inputs: no download
    assert plan["disk"]["free"]["output"] > 0
    engines = {m["engine"]: m for m in plan["memory"]}
    assert engines["stream"]["host_bytes"] > 0 and "2 worker" in engines["stream"]["note"]
    assert engines["peft"]["host_bytes"] > plan["output_bytes"]
    assert plan["seconds"]["stream"] > 0 and plan["seconds"]["peft"] > 0


def test_plan_of_a_hub_base_reads_headers_over_http(models, hub_env, run_cli) -> None:
    from huggingface_hub import HfApi

    base = models.base()
    adapter = models.adapter(base)
    api = HfApi(token=hub_env.alice_token)
    api.create_repo("alice/plan-base")
    api.upload_folder(repo_id="alice/plan-base", folder_path=str(base))
    code, plan = plan_json(run_cli, "--base", "alice/plan-base", "--adapters", adapter)
    assert code == 0, plan["problems"]
    assert plan["tensors_changed"] == 4
    shards = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert plan["download_bytes"] == pytest.approx(shards, rel=0.01)
    from huggingface_hub import constants

    cached = list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))
    assert cached == []  # no weight was downloaded
