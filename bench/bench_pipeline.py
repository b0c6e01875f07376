"""Benchmark: Hub to Hub as one pipeline (download, merge and upload overlapped).

    .venv/bin/python bench/bench_pipeline.py make --dir /tmp/mj-bench-pipeline
    .venv/bin/python bench/bench_pipeline.py run --dir /tmp/mj-bench-pipeline --runs 3 \\
        --json bench/results/pipeline.json

``make`` writes the TinyLlama-1.1B-shaped fp16 base of ``bench_stream.py`` (22 layers,
2.2 GB) in shards of about 200 MB (a 70B base comes in ~30 shards of ~5 GB: many shards,
each a small part of the whole) and one LoRA adapter (all-linear r16 rsLoRA).

``run`` seeds a Hub test server (``tests/support/hubserver``, in a process of its own, its
objects in /dev/shm: the Hub's disk is not this machine's) with the base and the adapter,
then measures, each as a whole process with a fresh HF cache and a fresh server (its object
store would otherwise deduplicate the uploads), the server's full-duplex link capped at
``--down`` bytes/s for downloads and ``--up`` for uploads:

- ``download``: ``snapshot_download`` of the base alone;
- ``merge``: ``mergejob merge`` of the local base into a local folder (same shard size);
- ``upload``: ``upload_folder`` of that output alone (``bench_overlap.py upload``);
- ``hub_to_hub``: ``mergejob merge`` with the base and adapter on the Hub and
  ``--push_to_hub`` (same shard size);

``--runs`` times, round-robin, medians reported (target: hub_to_hub <= 1.2x the slowest of
the three alone). Then once each:

- ``index``: ``mergejob run --index 1 --index-count 2`` against the Hub base, local output:
  the base bytes the server sent it (its request log) vs the base's size (target: at most
  half the base plus one input shard);
- ``windowed``: ``hub_to_hub`` with ``--delete-downloaded --delete-uploaded``: the peak size
  of HF cache + local output folder, sampled every 50 ms (target: at most 4 input shards +
  4 output shards).

With ``--one-download-worker``, each run also times ``hub_to_hub`` with
``--download-workers 1`` (a diagnostic: the first input shard then has the whole link).

The load average is recorded at the start and end of each measurement; the Hub-to-Hub
output's shards are checked to be byte-identical (sha256) to the local merge's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
TOKEN = "hf_bench_pipeline_token"
BASE_REPO = "bench/base"
ADAPTER_REPO = "bench/adapter"
OUT_REPO = "bench/merged"  # bench_overlap.py upload publishes here too
LAYERS = 22
ADAPTER = "all-r16-rslora"
SHM = Path("/dev/shm")


# ---------------------------------------------------------------------------------------
# Fixtures


def cmd_make(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH))
    import bench_stream

    work = Path(args.dir)
    base = work / "base"
    if not (base / "model.safetensors.index.json").is_file():
        print(f"making {base} ({args.layers} layers, {args.shard_bytes} B shards)", flush=True)
        bench_stream.make_base(base, args.layers, args.shard_bytes)
    adapter = work / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        spec = bench_stream.ADAPTERS[ADAPTER]
        bench_stream.make_adapter(adapter, base, args.layers, spec, 1)
    return 0


# ---------------------------------------------------------------------------------------
# The server: the project's Hub test server with its full-duplex link capped; on SIGTERM
# it writes the bytes it sent per path (its request log) to --log.


def cmd_serve(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.support.hubserver import server

    hub = server.HubTestServer(args.data)
    hub.add_user("bench", token=TOKEN)
    hub.link.download_bytes_per_second = args.down or None
    hub.link.upload_bytes_per_second = args.up or None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with hub:
        print(hub.url, flush=True)
        stop.wait()
        if args.log:
            sent: dict[str, int] = {}
            received = 0
            for r in hub.requests:
                received += r.bytes_in
                if r.method == "GET" and r.status in (200, 206):
                    key = f"{r.status} {r.path}"  # 206: a range read (a shard's header)
                    sent[key] = sent.get(key, 0) + r.bytes_out
            Path(args.log).write_text(json.dumps({"sent": sent, "received": received}))
    return 0


class Server:
    """A bench server process on a fresh copy of the seeded data (hard links: instant, and
    the template is never written: the store adds objects by rename, state.json by replace)."""

    def __init__(self, template: Path | None, data: Path, down: float, up: float) -> None:
        shutil.rmtree(data, ignore_errors=True)
        if template is not None:
            shutil.copytree(template, data, copy_function=os.link)
            (data / "state.json").unlink()
            shutil.copyfile(template / "state.json", data / "state.json")
        self.data = data
        self.log = data.parent / f"{data.name}-log.json"
        self.log.unlink(missing_ok=True)
        command = [sys.executable, __file__, "serve", "--data", str(data), "--log", str(self.log)]
        command += ["--down", str(down), "--up", str(up)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError("the bench server did not start")

    def stop(self) -> dict[str, Any]:
        """Stop it; its request log (bytes sent per path)."""
        self.process.terminate()
        self.process.wait(timeout=60)
        return json.loads(self.log.read_text()) if self.log.is_file() else {}

    def head_tree(self, repo_id: str) -> dict[str, str]:
        """``{path: sha256}`` of the main branch of ``repo_id`` in the stopped server's store."""
        state = json.loads((self.data / "state.json").read_text())
        for repo in state["repos"]:
            if repo["id"] == repo_id:
                head = repo["branches"]["main"]
                tree = repo["commits"][head]["tree"]
                return {path: entry["sha256"] for path, entry in tree.items()}
        return {}

    def remove(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        self.log.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Whole processes: the download alone (huggingface_hub only, no mergejob import)


def cmd_download(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    snapshot_download(args.repo)
    return 0


# ---------------------------------------------------------------------------------------
# Measuring


def tree_bytes(*folders: Path) -> int:
    """Disk bytes (allocated blocks) of the regular files under ``folders``: links are not
    followed (the HF cache's snapshots link to its blobs), and a shard the uploader has
    hollowed (``--delete-uploaded`` keeps its size, frees its blocks) counts as freed."""
    total = 0
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue  # removed while we looked
                if stat.S_ISREG(st.st_mode):
                    total += st.st_blocks * 512
    return total


def measure(
    command: list[str], env: dict[str, str], log: Path, watch: list[Path] | None = None
) -> dict[str, Any]:
    """Run ``command``: wall seconds, load averages at start and end, phase lines, and (with
    ``watch``) the peak bytes of those folders sampled every 50 ms."""
    load_start = os.getloadavg()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_bytes(*(watch or [])))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    if watch:
        sampler.start()
    started = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    stop.set()
    if watch:
        sampler.join()
    text = log.read_text()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{text[-3000:]}")
    row: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "load_start": round(load_start[0], 2),
        "load_end": round(os.getloadavg()[0], 2),
    }
    phases = {m[1]: float(m[2]) for m in re.finditer(r"phase (\w+) done in ([\d.]+)s", text)}
    if phases:
        row["phases"] = phases
    # The stream engine's "shard k/N done: ... (Xs elapsed)": when the first output shard
    # was ready (the upload cannot start before) and when the last was.
    elapsed = [float(m) for m in re.findall(r"shard \d+/\d+ done: .*\(([\d.]+)s elapsed\)", text)]
    if elapsed:
        row["first_shard_s"] = elapsed[0]
        row["last_shard_s"] = elapsed[-1]
    if watch:
        row["peak_bytes"] = peak[0]
    return row


def seed(work: Path, template: Path) -> None:
    """The server's data folder with the base and adapter published (once; reused)."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"  # the test Hub speaks LFS; before the import
    marker = template / "seeded.json"
    base = work / "base"
    expected = {p.name: p.stat().st_size for p in sorted(base.iterdir())}
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return
    from huggingface_hub import HfApi

    server = Server(None, template, 0, 0)
    try:
        api = HfApi(endpoint=server.url, token=TOKEN)
        for repo, folder in ((BASE_REPO, base), (ADAPTER_REPO, work / "adapter")):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=folder, commit_message="seed")
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)
    marker.write_text(json.dumps(expected))


def cmd_run(args: argparse.Namespace) -> int:
    work = Path(args.dir)
    base = work / "base"
    adapter = work / "adapter"
    root = (SHM if SHM.is_dir() else work) / "mergejob-bench-pipeline"
    template = root / "template"
    data = root / "run"
    scratch = work / "scratch"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    base_env = {
        **os.environ,
        "MERGEJOB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": TOKEN,
        "MERGEJOB_LOG_FORMAT": "text",
    }
    base_env.pop("HF_HUB_OFFLINE", None)
    shard = args.max_shard_size
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"seeding the test Hub ({root})", flush=True)
    t = time.monotonic()
    seed(work, template)
    print(f"seeded in {time.monotonic() - t:.1f}s", flush=True)

    base_files = sorted(base.glob("*.safetensors"))
    base_bytes = sum(p.stat().st_size for p in base_files)
    largest_in = max(p.stat().st_size for p in base_files)
    merged = scratch / "merged"  # the local merge's output, uploaded by `upload`

    def fresh_home() -> Path:
        home = scratch / "hf-home"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        return home

    def on_hub(
        name: str, run: int, command: list[str], watch: list[Path] | None = None
    ) -> tuple[dict[str, Any], Server]:
        home = fresh_home()
        server = Server(template, data, args.down, args.up)
        env = {**base_env, "HF_HOME": str(home), "HF_ENDPOINT": server.url}
        try:
            row = measure(command, env, logs / f"{name}-{run}.log", watch)
        finally:
            row_log = server.stop()
        row["server"] = {
            "sent_bytes": sum(row_log.get("sent", {}).values()),
            "received_bytes": row_log.get("received", 0),
        }
        row["_sent"] = row_log.get("sent", {})
        shutil.rmtree(home, ignore_errors=True)
        return row, server

    hub_job = ["--base", BASE_REPO, "--adapters", ADAPTER_REPO, "--max-shard-size", shard]
    merge = [python, "-m", "mergejob.cli", "merge", "--base", str(base)]
    merge += ["--adapters", str(adapter), "--max-shard-size", shard, "--output-dir", str(merged)]
    download = [python, __file__, "download", BASE_REPO]
    upload = [python, str(BENCH / "bench_overlap.py"), "upload", str(merged)]
    h2h = [python, "-m", "mergejob.cli", "merge", *hub_job, "--output_dir", OUT_REPO]
    h2h += ["--push_to_hub"]
    h2h_dw1 = [*h2h, "--download-workers", "1"]

    sys.path.insert(0, str(BENCH))
    import bench_stream

    bench_stream.warm(work / "base")
    rows: list[dict[str, Any]] = []
    reference: dict[str, str] = {}
    identical: list[bool] = []
    for run in range(1, args.runs + 1):
        row: dict[str, Any] = {}
        row["download"], server = on_hub("download", run, download)
        row["download"].pop("_sent")
        server.remove()

        shutil.rmtree(merged, ignore_errors=True)
        shutil.rmtree(merged.parent / f".{merged.name}.mergejob-partial", ignore_errors=True)
        home = fresh_home()
        row["merge"] = measure(
            merge,
            {**base_env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"},
            logs / f"merge-{run}.log",
        )
        if not reference:
            reference = bench_stream.shard_digests(merged)

        row["upload"], server = on_hub("upload", run, upload)
        row["upload"].pop("_sent")
        server.remove()

        row["hub_to_hub"], server = on_hub("hub_to_hub", run, h2h)
        row["hub_to_hub"].pop("_sent")
        published = {k: v for k, v in server.head_tree(OUT_REPO).items() if k in reference}
        identical.append(published == reference)
        server.remove()

        if args.one_download_worker:
            # Diagnostic: the same with --download-workers 1 (the first input shard arrives
            # at the link's full rate instead of a quarter of it).
            row["hub_to_hub_dw1"], server = on_hub("hub_to_hub_dw1", run, h2h_dw1)
            row["hub_to_hub_dw1"].pop("_sent")
            published = {k: v for k, v in server.head_tree(OUT_REPO).items() if k in reference}
            identical.append(published == reference)
            server.remove()

        alone = {k: row[k]["wall_s"] for k in ("download", "merge", "upload")}
        row["ratio"] = round(row["hub_to_hub"]["wall_s"] / max(alone.values()), 3)
        rows.append(row)
        print(
            f"run {run}: download {alone['download']:.1f}s, merge {alone['merge']:.1f}s, "
            f"upload {alone['upload']:.1f}s, hub-to-hub {row['hub_to_hub']['wall_s']:.1f}s "
            f"({row['ratio']:.2f}x the slowest), "
            + (
                f"with --download-workers 1 {row['hub_to_hub_dw1']['wall_s']:.1f}s, "
                if "hub_to_hub_dw1" in row
                else ""
            )
            + f"identical {identical}, load "
            f"{row['download']['load_start']:.1f}..{row['hub_to_hub']['load_end']:.1f}",
            flush=True,
        )

    out_files = sorted(merged.glob("*.safetensors"))
    largest_out = max(p.stat().st_size for p in out_files)

    # (e) one of two local indices against the Hub base: what the server sent it.
    index_out = scratch / "index-out"
    shutil.rmtree(index_out, ignore_errors=True)
    shutil.rmtree(scratch / f".{index_out.name}.mergejob-partial", ignore_errors=True)
    index_cmd = [python, "-m", "mergejob.cli", "run", *hub_job, "--output_dir", str(index_out)]
    index_cmd += ["--index", "1", "--index-count", "2"]
    index_row, server = on_hub("index", 1, index_cmd)
    server.remove()
    sent = index_row.pop("_sent")
    per_shard = {
        key.rsplit("/", 1)[-1]: n
        for key, n in sent.items()
        if key.startswith("200 ") and f"/{BASE_REPO}/" in key and key.endswith(".safetensors")
    }
    index_row["base_bytes_sent"] = sum(per_shard.values())  # whole files
    index_row["base_bytes_sent_per_shard"] = per_shard
    index_row["header_range_bytes"] = sum(
        n for key, n in sent.items() if key.startswith("206 ") and f"/{BASE_REPO}/" in key
    )
    index_row["base_bytes"] = base_bytes
    index_row["target_bytes"] = base_bytes // 2 + largest_in
    index_row["met"] = index_row["base_bytes_sent"] <= index_row["target_bytes"]
    print(
        f"index 1/2: {index_row['base_bytes_sent'] / 1e9:.3f} GB of the base's "
        f"{base_bytes / 1e9:.3f} GB sent ({len(per_shard)} shards; target <= "
        f"{index_row['target_bytes'] / 1e9:.3f} GB): {'met' if index_row['met'] else 'MISSED'}",
        flush=True,
    )
    shutil.rmtree(index_out, ignore_errors=True)
    shutil.rmtree(scratch / f".{index_out.name}.mergejob-partial", ignore_errors=True)

    # (f) both delete options: peak of HF cache + local output folder.
    local = scratch / "windowed" / "local"
    shutil.rmtree(local.parent, ignore_errors=True)
    local.parent.mkdir(parents=True)
    home_dir = scratch / "hf-home"
    windowed_cmd = [*h2h, "--delete-downloaded", "--delete-uploaded", "--local-dir", str(local)]
    windowed, server = on_hub("windowed", 1, windowed_cmd, watch=[home_dir, local.parent])
    windowed.pop("_sent")
    published = {k: v for k, v in server.head_tree(OUT_REPO).items() if k in reference}
    windowed["identical"] = published == reference
    server.remove()
    shutil.rmtree(local.parent, ignore_errors=True)
    windowed["target_bytes"] = 4 * largest_in + 4 * largest_out
    windowed["met"] = windowed["peak_bytes"] <= windowed["target_bytes"]
    print(
        f"windowed: {windowed['wall_s']:.1f}s, peak disk {windowed['peak_bytes'] / 1e9:.3f} GB "
        f"(target <= {windowed['target_bytes'] / 1e9:.3f} GB): "
        f"{'met' if windowed['met'] else 'MISSED'}",
        flush=True,
    )

    keys = ["download", "merge", "upload", "hub_to_hub"]
    keys += ["hub_to_hub_dw1"] if args.one_download_worker else []
    median = {k: round(statistics.median(r[k]["wall_s"] for r in rows), 2) for k in keys}
    median["ratio_of_medians"] = round(
        median["hub_to_hub"] / max(median["download"], median["merge"], median["upload"]), 3
    )
    median["median_ratio"] = round(statistics.median(r["ratio"] for r in rows), 3)
    sys.path.insert(0, str(BENCH))
    import bench_overlap

    report = {
        "started": started_at,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": bench_overlap.machine(),
        "git_commit": git_commit(),
        "fixture": {
            "base_bytes": base_bytes,
            "base_shards": len(base_files),
            "largest_input_shard_bytes": largest_in,
            "output_shards": len(out_files),
            "largest_output_shard_bytes": largest_out,
            "adapter": ADAPTER,
            "max_shard_size": shard,
        },
        "link": {"download_bytes_per_second": args.down, "upload_bytes_per_second": args.up},
        "runs": args.runs,
        "median": median,
        "hub_to_hub_output_identical": identical,
        "per_run": rows,
        "index_1_of_2": index_row,
        "windowed": windowed,
    }
    print(json.dumps(report["median"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(root / "run", ignore_errors=True)
    return 0


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "mergejob"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + (" (mergejob/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_pipeline.py")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write the fixtures")
    make.add_argument("--dir", required=True)
    make.add_argument("--shard-bytes", type=int, default=200_000_000)
    make.add_argument("--layers", type=int, default=LAYERS)
    serve = sub.add_parser("serve", help="(internal) a Hub test server with a capped link")
    serve.add_argument("--data", required=True)
    serve.add_argument("--down", type=float, default=0.0)
    serve.add_argument("--up", type=float, default=0.0)
    serve.add_argument("--log")
    download = sub.add_parser("download", help="(internal) snapshot_download of a repo")
    download.add_argument("repo")
    run = sub.add_parser("run", help="measure")
    run.add_argument("--dir", required=True)
    run.add_argument("--runs", type=int, default=3)
    run.add_argument("--max-shard-size", default="200MB")
    run.add_argument("--down", type=float, default=80e6, help="download bytes/s of the link")
    run.add_argument("--up", type=float, default=80e6, help="upload bytes/s of the link")
    run.add_argument(
        "--one-download-worker",
        action="store_true",
        help="also time Hub to Hub with --download-workers 1 in each run (a diagnostic)",
    )
    run.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    handlers = {"make": cmd_make, "serve": cmd_serve, "download": cmd_download, "run": cmd_run}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
