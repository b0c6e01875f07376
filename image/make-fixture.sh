#!/usr/bin/env bash
# Make the default image-test fixture (see image/test.sh for the layout):
#   DEST/models/base        tiny Llama, bf16, sharded safetensors, with a tokenizer
#   DEST/models/adapter-a   LoRA (q_proj, v_proj)
#   DEST/models/adapter-b   LoRA (all attention projections), merged at weight 0.5
#   DEST/config.yaml        the spec, with container paths (/models/..., /output/merged)
# Made with tests/support/models.py (a checkout's test helpers, never in the image) in the
# project's venv; nothing is downloaded. Kept if present.
#
#   image/make-fixture.sh DEST          (PY: the venv's python, default .venv/bin/python)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEST=${1:?usage: image/make-fixture.sh DEST}
ROOT=$(dirname "$HERE")
PY=${PY:-$ROOT/.venv/bin/python}
if [ -f "$DEST/config.yaml" ] && [ -d "$DEST/models/base" ]; then
    echo "fixture present: $DEST"; exit 0
fi
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp/models"
HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DEST.tmp" <<'PYEOF'
import sys
from pathlib import Path

from tests.support.models import make_adapter, make_base

root = Path(sys.argv[1])
models = root / "models"
base = make_base(models / "base", family="llama")
make_adapter(base, models / "adapter-a", seed=1)
make_adapter(base, models / "adapter-b", seed=2,
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
(root / "config.yaml").write_text(
    "# image/test.sh fixture: container paths (inputs read-only under /models)\n"
    "base: /models/base\n"
    "adapters:\n"
    "  - /models/adapter-a\n"
    "  - path: /models/adapter-b\n"
    "    weight: 0.5\n"
    "output:\n"
    "  dir: /output/merged\n"
    "  dtype: bfloat16\n"
    "  max_shard_size: 100KB\n"
)
PYEOF
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "fixture made: $DEST ($(du -sh "$DEST" | cut -f1))"
