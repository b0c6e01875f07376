#!/usr/bin/env bash
# Test the built image (make image-test).
#
#   image/test.sh FIXTURE [IMAGE]
#
# FIXTURE is a folder laid out as the Job's pod sees its volumes:
#   FIXTURE/config.yaml   the spec; mounted read-only at /etc/mergejob/config.yaml (as the
#                         ConfigMap is). Its paths are container paths: inputs under
#                         /models/..., the output folder /output.
#   FIXTURE/models/       base model and adapter folders; mounted read-only at /models.
# A fresh folder (owned by uid 1000) is mounted read-write at /output, as the Job's output
# volume would be; the spec's output.dir should be a folder inside it (mergejob writes a
# partial folder beside output.dir and renames it, so the parent must be writable).
# The whole /output tree is compared with the host's.
#
# Checks:
#   1. image config: entrypoint ["mergejob","run"], user 1000, HF_HOME, no token variable;
#   2. the process runs as uid 1000; torch in the image is the expected build (a +cpu
#      torch has no nvidia-*/triton packages beside it);
#   3. the entrypoint, run on the fixture (HF_TOKEN set to a canary, offline), exits 0 and
#      its output equals, file for file (sha256), the host's `.venv/bin/mergejob run` on
#      the same spec (paths rewritten to the host's);
#   4. no token in the image: no hf_... token in any file under /root, /home, /cache, nor
#      the canary anywhere in the container's filesystem or the output after the run;
#   5. no test data: no /src, no file of the repository's tests/ folder, no top-level
#      "tests" package in the venv.
# Environment: IMAGE, MERGEJOB_CACHE (as image/build.sh), HOST_MERGEJOB (default
# .venv/bin/mergejob), EXPECT_TORCH (default: the "# torch:" line of image/constraints.txt),
# COMPARE_EXCLUDE (default "mergejob.yaml README.md": file names compared only for
# presence), KEEP=1 keeps the work folder.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
FIXTURE=${1:?usage: image/test.sh FIXTURE [IMAGE]}
FIXTURE=$(cd "$FIXTURE" && pwd)
IMAGE=${2:-${IMAGE:-$(head -n1 "$HERE/IMAGE")}}
# shellcheck source=image/lib.sh
. "$HERE/lib.sh"   # CACHE, BUILDAH, store_setup
HOST_MERGEJOB=${HOST_MERGEJOB:-$ROOT/.venv/bin/mergejob}
PY=${PY:-$ROOT/.venv/bin/python}
EXPECT_TORCH=${EXPECT_TORCH-$(sed -n 's/^# torch: *torch==//p' "$HERE/constraints.txt" | head -n1)}
COMPARE_EXCLUDE=${COMPARE_EXCLUDE-mergejob.yaml README.md}
CANARY="hf_mergejobCanary$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
HOST_MERGEJOB=$(abspath "$HOST_MERGEJOB")
PY=$(abspath "$PY")

[ -f "$FIXTURE/config.yaml" ] || { echo "no $FIXTURE/config.yaml" >&2; exit 2; }
[ -d "$FIXTURE/models" ] || { echo "no $FIXTURE/models/" >&2; exit 2; }

FAILS=0
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILS=$((FAILS + 1)); }
show() { [ -z "$1" ] || printf '%s\n' "$1" | tr ' ' '\n' | sed '/^$/d; s/^/      /'; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mergejob-image-test.XXXXXX")
CTR=""
cleanup() {
    [ -n "$CTR" ] && rt_rm "$CTR"
    if [ "${KEEP:-}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ----------------------------------------------------------------------- runtime glue
if [ "${FORCE_BUILDAH:-}" != 1 ] && docker info >/dev/null 2>&1; then
    RT=docker
else
    RT=buildah
    store_setup
fi

# The image's config as JSON (OCI image config: .config.Entrypoint, .config.User, ...).
image_config() {
    if [ $RT = docker ]; then
        docker image inspect "$IMAGE" \
            | "$PY" -c 'import json,sys; c=json.load(sys.stdin)[0]["Config"]; print(json.dumps({"config": c}))'
    else
        "${BUILDAH[@]}" inspect --type image "$IMAGE" \
            | "$PY" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]))'
    fi
}

# rt_create NAME MOUNTS... -> container id; mounts as SRC:DST[:ro]
rt_create() {
    local name=$1; shift
    if [ $RT = docker ]; then
        local vols=(); for m in "$@"; do vols+=(-v "$m"); done
        docker create --name "$name" --network none "${vols[@]}" \
            -e HF_HUB_OFFLINE=1 -e HF_TOKEN="$CANARY" "$IMAGE" >/dev/null
        echo "$name"
    else
        "${BUILDAH[@]}" rm "$name" >/dev/null 2>&1 || true
        "${BUILDAH[@]}" from --pull-never --name "$name" "$IMAGE" >/dev/null
        echo "$name"
    fi
}
rt_rm() {
    if [ $RT = docker ]; then docker rm -f "$1" >/dev/null 2>&1 || true
    else "${BUILDAH[@]}" rm "$1" >/dev/null 2>&1 || true; fi
}
# rt_exec CTR ARGV... runs a command as the image's user, with the test's mounts.
MOUNTS=()
rt_exec() {
    local ctr=$1; shift
    if [ $RT = docker ]; then
        # docker: a throwaway container from the same image, with the same mounts and env.
        local vols=(); for m in "${MOUNTS[@]}"; do vols+=(-v "$m"); done
        docker run --rm --network none "${vols[@]}" -e HF_HUB_OFFLINE=1 \
            -e HF_TOKEN="$CANARY" --entrypoint "$1" "$IMAGE" "${@:2}"
    else
        local vols=(); for m in "${MOUNTS[@]}"; do vols+=(--volume "$m"); done
        "${BUILDAH[@]}" run --isolation chroot "${vols[@]}" \
            --env HF_HUB_OFFLINE=1 --env HF_TOKEN="$CANARY" "$ctr" -- "$@"
    fi
}
# rt_entrypoint CTR: the image's own entrypoint (buildah run does not apply it by itself).
rt_entrypoint() {
    local ctr=$1
    if [ $RT = docker ]; then
        docker start -a "$ctr"
    else
        local -a ep
        mapfile -t ep < <(image_config | "$PY" -c 'import json,sys; [print(a) for a in json.load(sys.stdin)["config"].get("Entrypoint") or []]')
        rt_exec "$ctr" "${ep[@]}"
    fi
}
# rt_rootfs CTR -> a host folder with the container's filesystem (buildah mount / docker export)
rt_rootfs() {
    if [ $RT = docker ]; then
        mkdir -p "$WORK/rootfs"
        docker export "$1" | tar -C "$WORK/rootfs" -xf - 2>/dev/null || true
        echo "$WORK/rootfs"
    else
        "${BUILDAH[@]}" mount "$1"
    fi
}

# sha256 of every file, by relative path
digest_tree() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum); }

# ----------------------------------------------------------------------- 1. config
echo "== $IMAGE ($RT)"
CONFIG_JSON=$(image_config)
cfg() { printf '%s' "$CONFIG_JSON" | "$PY" -c "import json,sys; c=json.load(sys.stdin)['config']; $1"; }
check "entrypoint is [mergejob, run]" \
    test "$(cfg 'print(json.dumps(c.get("Entrypoint")))')" = '["mergejob", "run"]'
check "configured user is 1000" test "$(cfg 'print(c.get("User",""))' | cut -d: -f1)" = 1000
check "HF_HOME=/cache/huggingface" \
    cfg 'sys.exit("HF_HOME=/cache/huggingface" not in (c.get("Env") or []))'
check "no token variable in the image config" \
    cfg 'import re; sys.exit(any(re.search(r"TOKEN|SECRET|PASSWORD", e.split("=")[0]) for e in c.get("Env") or []))'
check "OCI labels source/version/revision" \
    cfg 'l=c.get("Labels") or {}; sys.exit(not all(l.get("org.opencontainers.image."+k) for k in ("source","version","revision")))'

# ----------------------------------------------------------------------- mounts
mkdir -p "$WORK/configmap" "$WORK/out-image" "$WORK/out-host"
cp "$FIXTURE/config.yaml" "$WORK/configmap/config.yaml"
chmod -R a+rX "$WORK/configmap" "$FIXTURE/models" 2>/dev/null || true
chown 1000:1000 "$WORK/out-image" 2>/dev/null || chmod 0777 "$WORK/out-image"
MOUNTS=(
    "$WORK/configmap:/etc/mergejob:ro"
    "$FIXTURE/models:/models:ro"
    "$WORK/out-image:/output"
)
CTR=$(rt_create "mergejob-image-test-$$" "${MOUNTS[@]}")

# ----------------------------------------------------------------------- 2. user, torch
check "process runs as uid 1000" test "$(rt_exec "$CTR" id -u)" = 1000
TORCH_REPORT=$(rt_exec "$CTR" python -c '
import importlib.metadata as m, torch
names = sorted(d.metadata["Name"].lower() for d in m.distributions())
print(torch.__version__, *[n for n in names if n.startswith("nvidia-") or n == "triton"])')
TORCH_VERSION=${TORCH_REPORT%% *}
CUDA_DISTS=${TORCH_REPORT#"$TORCH_VERSION"}
echo "      torch in the image: $TORCH_VERSION ${CUDA_DISTS:+(with $CUDA_DISTS)}"
if [ -n "$EXPECT_TORCH" ]; then
    check "torch is $EXPECT_TORCH" test "$TORCH_VERSION" = "$EXPECT_TORCH"
fi
case $TORCH_VERSION in
    *+cpu) check "CPU torch: no nvidia-*/triton packages" test -z "${CUDA_DISTS// /}" ;;
esac

# ----------------------------------------------------------------------- 3. merge
echo "== entrypoint on $FIXTURE"
t0=$SECONDS
if rt_entrypoint "$CTR" >"$WORK/image.log" 2>&1; then
    pass "entrypoint exited 0 ($((SECONDS - t0)) s)"
else
    fail "entrypoint exited non-zero ($((SECONDS - t0)) s)"; tail -n 30 "$WORK/image.log" | sed 's/^/      /'
fi

# The same spec on the host, with the container paths mapped to the host folders.
"$PY" - "$FIXTURE/config.yaml" "$WORK/host-config.yaml" "$FIXTURE/models" "$WORK/out-host" <<'EOF'
import sys, yaml
src, dst, models, out = sys.argv[1:]
def fix(v):
    if isinstance(v, dict): return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list): return [fix(x) for x in v]
    if isinstance(v, str):
        for cpath, hpath in (("/models", models), ("/output", out)):
            if v == cpath or v.startswith(cpath + "/"):
                return hpath + v[len(cpath):]
    return v
yaml.safe_dump(fix(yaml.safe_load(open(src))), open(dst, "w"), sort_keys=False)
EOF
t0=$SECONDS
if (cd "$WORK" && env -u HF_TOKEN HF_HUB_OFFLINE=1 MERGEJOB_CONFIG="$WORK/host-config.yaml" \
        "$HOST_MERGEJOB" run) >"$WORK/host.log" 2>&1; then
    pass "host merge exited 0 ($((SECONDS - t0)) s)"
else
    fail "host merge exited non-zero"; tail -n 30 "$WORK/host.log" | sed 's/^/      /'
fi
digest_tree "$WORK/out-image" >"$WORK/image.sha256"
digest_tree "$WORK/out-host" >"$WORK/host.sha256"
# Provenance files record the input paths (container vs host), times and the Python
# version, so they cannot match byte for byte: they are only required on both sides.
exclude_re='/('$(printf '%s' "$COMPARE_EXCLUDE" | sed 's/[.]/\\./g; s/ /|/g')')$'
for side in image host; do
    awk '{print $2}' "$WORK/$side.sha256" | grep -E "$exclude_re" >"$WORK/$side.excluded" || true
    grep -v -E "$exclude_re" "$WORK/$side.sha256" >"$WORK/$side.compared" || true
done
if [ -s "$WORK/image.compared" ] && diff -u "$WORK/host.compared" "$WORK/image.compared" >"$WORK/diff" \
    && diff -q "$WORK/host.excluded" "$WORK/image.excluded" >/dev/null; then
    pass "output identical to the host's: $(wc -l <"$WORK/image.compared") files by sha256" \
        "(+ $(wc -l <"$WORK/image.excluded") provenance files present on both: $COMPARE_EXCLUDE)"
else
    fail "output differs from the host's (or is empty)"
    head -n 40 "$WORK/diff" | sed 's/^/      /'
    diff "$WORK/host.excluded" "$WORK/image.excluded" | sed 's/^/      /' || true
fi

# ----------------------------------------------------------------------- 4. tokens, 5. test data
ROOTFS=$(rt_rootfs "$CTR")
token_files=$(grep -rlE 'hf_[A-Za-z0-9]{30,}' "$ROOTFS/root" "$ROOTFS/home" "$ROOTFS/cache" 2>/dev/null || true)
check "no hf_ token in files under /root /home /cache" test -z "$token_files"
show "$token_files"
canary_files=$(grep -rlF "$CANARY" "$ROOTFS" "$WORK/out-image" 2>/dev/null || true)
check "run-time token (canary) not written to the filesystem or the output" test -z "$canary_files"
show "$canary_files"
host_ca=/etc/ssl/certs/ca-certificates.crt
if [ -f "$host_ca" ] && [ -f "$ROOTFS$host_ca" ] && cmp -s "$host_ca" "$ROOTFS$host_ca"; then
    echo "      (the image's CA bundle equals the host's: no host-only CA to tell a baked-in copy by)"
else
    pass "host CA bundle (mounted for pip at build time) not baked into the image"
fi
check "no /src in the image" test ! -e "$ROOTFS/src"
# A repository file of tests/ anywhere (by its distinctive path; tests/**/__init__.py and
# the like match every library's own tests), or a tests/ folder where a copy of the
# repository would land: /, /src, /app, the user's home, the working directory,
# site-packages.
leaked=""
if [ -d "$ROOT/tests" ]; then
    (cd "$ROOT" && find tests -type f -not -path '*/__pycache__/*' -not -name '__init__.py' \
        -not -name 'conftest.py' | sed 's#^#/#') >"$WORK/test-files"
    if [ -s "$WORK/test-files" ]; then
        # A path match is a leak only if the file is ours: a library may ship a test of
        # the same name (numpy/lib/tests/test_io.py beside our tests/test_io.py).
        while IFS= read -r hit; do
            [ -n "$hit" ] || continue
            ours="$ROOT/tests/${hit##*/tests/}"
            if [ -f "$ours" ] && cmp -s "$ROOTFS/${hit#./}" "$ours"; then
                leaked="$leaked ${hit#.}"
            fi
        done < <( (cd "$ROOTFS" && find . -type f) | grep -F -f "$WORK/test-files" || true)
    fi
fi
for d in tests src/tests app/tests home/mergejob/tests work/tests opt/venv/lib/python3*/site-packages/tests; do
    for hit in "$ROOTFS"/$d; do [ -e "$hit" ] && leaked="$leaked ${hit#"$ROOTFS"}"; done
done
check "no file of tests/ in the image" test -z "$leaked"
show "$leaked"
[ $RT = buildah ] && "${BUILDAH[@]}" umount "$CTR" >/dev/null

echo
if [ "$FAILS" -eq 0 ]; then echo "image-test: all checks passed"; else echo "image-test: $FAILS check(s) failed"; exit 1; fi
