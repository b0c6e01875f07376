"""Check a stream-engine output of the benchmark fixture against PEFT's formula, tensor by
tensor, on the real shapes (where the engine splits products into row blocks).

For each checked tensor: ``W32 = W.float()``; for each adapter in order
``W32 += (B @ A) * scale`` with the whole product, as PEFT's ``get_delta_weight`` computes it
in fp32; then one rounding. The output must hold exactly those bytes.

    .venv/bin/python bench/check_exact.py --dir /tmp/mergejob-bench --model tinyllama-1.1b
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors import safe_open

    from mergejob.engines.stream import merge_plan
    from mergejob.plan.work import build_plan

    parser = argparse.ArgumentParser(prog="check_exact.py")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--tensors", type=int, default=12, help="changed tensors to check")
    args = parser.parse_args(argv)

    work = Path(args.dir) / args.model
    adapters = ["attn-r8", "all-r16-rslora", "mlp-r32"]
    plan = build_plan(
        work / "base", [(work / a, 1.0) for a in adapters], max_shard_size=800_000_000
    )
    out = work / "check-out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    merge_plan(plan, out)
    print(f"merged in {time.monotonic() - started:.1f}s")
    changed = [t for t in plan.tensors if t.changed]
    rng = random.Random(0)
    picked = rng.sample(changed, min(args.tensors, len(changed)))
    where = {t.name: s.name for s in plan.shards for t in s.tensors}
    for tensor in picked:
        assert tensor.source is not None
        with safe_open(tensor.source.path, "pt") as handle:
            w32 = handle.get_tensor(tensor.source.key).float()
        for op in tensor.ops:
            assert op.a is not None and op.b is not None
            with safe_open(op.a.path, "pt") as handle:
                a = handle.get_tensor(op.a.key).float()
                b = handle.get_tensor(op.b.key).float()
            w32 += (b @ a) * op.coef
        expected = w32.to(getattr(torch, tensor.dtype))
        with safe_open(str(out / where[tensor.name]), "pt") as handle:
            got = handle.get_tensor(tensor.name)
        same = torch.equal(got.view(torch.int16), expected.view(torch.int16))
        print(f"{'exact' if same else 'DIFFERS'}: {tensor.name} {list(tensor.shape)}")
        if not same:
            return 1
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
