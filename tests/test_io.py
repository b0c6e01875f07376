"""The safetensors layer: descriptors from headers, the reader, the writer's header, the view."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergejob.errors import ModelError
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.header_view import header_view
from mergejob.io.headers import read_header, read_tensors
from mergejob.io.reader import FileReader
from mergejob.io.writer import shard_header


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(6, generator=gen),
        "lm_head.weight": torch.randn(11, 6, generator=gen).to(torch.float16),
        "counts": torch.arange(5, dtype=torch.int64),
    }


def test_descriptors_read_back_what_safetensors_wrote(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path))
    refs = read_tensors(path)
    assert set(refs) == set(tensors)
    offsets = [ref.offset for ref in refs.values()]
    assert offsets == sorted(offsets)  # data order
    reader = FileReader()
    try:
        for name, ref in refs.items():
            assert ref.name == name and ref.shard == path.name
            assert ref.shape == tuple(tensors[name].shape)
            assert ref.dtype == str(tensors[name].dtype).removeprefix("torch.")
            assert ref.nbytes == tensors[name].numel() * tensors[name].element_size()
            assert torch.equal(reader.tensor(ref), tensors[name])
    finally:
        reader.close()


def test_the_writers_header_is_what_safetensors_reads(tmp_path: Path) -> None:
    tensors = _tensors()
    entries = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()]
    header, sizes = shard_header(entries)
    path = tmp_path / "written.safetensors"
    with open(path, "wb") as handle:
        handle.write(header)
        for tensor in tensors.values():
            handle.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert len(header) % 8 == 0
    assert sizes == [t.numel() * t.element_size() for t in tensors.values()]
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert list(read_tensors(path)) == list(tensors)


def test_a_byte_range_that_does_not_fit_the_shape_is_a_broken_header(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    entries = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    raw = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(20))
    read_header(path)  # the header itself parses
    with pytest.raises(ModelError, match=r"broken\.safetensors: tensor w holds 20 bytes"):
        read_tensors(path)


def _layout(index: CheckpointIndex) -> list[tuple[object, ...]]:
    """Names, dtypes, shapes and data offsets relative to the end of each file's header."""
    starts = {
        r.path: read_header(r.path, check_size=False).data_start for r in index.tensors.values()
    }
    return [
        (r.name, r.dtype, r.shape, r.nbytes, r.offset - starts[r.path])
        for r in index.tensors.values()
    ]


def test_a_truncated_shard_fails_the_index_and_is_reported_by_the_view(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_file(_tensors(), str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    whole = CheckpointIndex.from_folder(base)
    size = (base / "model.safetensors").stat().st_size
    with open(base / "model.safetensors", "r+b") as handle:
        handle.truncate(size - 10)
    with pytest.raises(ModelError, match="truncated download"):
        CheckpointIndex.from_folder(base)
    with header_view(base) as view:
        assert len(view.problems) == 1 and "truncated: holds" in view.problems[0]
        assert (view.folder / "config.json").is_file()
        assert view.shard_bytes["model.safetensors"] == os.path.getsize(
            view.folder / "model.safetensors"
        )
        seen = CheckpointIndex.from_folder(view.folder)
        assert _layout(seen) == _layout(whole)
    assert not view.folder.exists()


def test_header_modules_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import mergejob.io.checkpoint, mergejob.io.header_view, mergejob.io.headers\n"
        "import mergejob.io.shards, mergejob.io.writer\n"
        "print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
