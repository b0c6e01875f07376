"""``make demo``: the main job on an embedded default, with nothing to download.

Builds a tiny Llama-shaped bf16 model and two LoRA adapters in ``demo-output/``, merges them
with the same pipeline a pod runs, and prints where the result is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergejob.demo")
    parser.add_argument("--dir", default="demo-output", help="work folder (replaced)")
    parser.add_argument("--engine", default=None, help="merge engine (default: the default)")
    args = parser.parse_args(argv)

    import torch

    import mergejob
    from mergejob.fixtures import make_adapter, make_base
    from mergejob.logs import setup_logging

    setup_logging()
    work = Path(args.dir).absolute()
    if work.exists():
        shutil.rmtree(work)
    base = make_base(work / "base", dtype=torch.bfloat16, max_shard_size="100KB")
    adapter_a = make_adapter(base, work / "adapter-attn", target_modules=["q_proj", "v_proj"])
    adapter_b = make_adapter(
        base, work / "adapter-mlp", target_modules=["gate_proj", "up_proj", "down_proj"], seed=2
    )
    spec_data: dict[str, object] = {
        "base": str(base),
        "adapters": [str(adapter_a), str(adapter_b)],
        "output": {"dir": str(work / "merged")},
    }
    if args.engine:
        spec_data["engine"] = {"name": args.engine}
    spec = mergejob.MergeSpec.model_validate(spec_data)
    result = mergejob.merge(spec)
    print(f"demo: base {base}")
    print(f"demo: adapters {adapter_a}, {adapter_b}")
    print(f"demo: merged model in {result.output_dir}: {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
