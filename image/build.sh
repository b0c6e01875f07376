#!/usr/bin/env bash
# Build the mergejob container image.
#
#   image/build.sh            build the image named in image/IMAGE
#   image/build.sh base       only make (or reuse) the local Debian base image
#   image/build.sh clean [all] drop the buildah storage (and, with all, the cached rootfs)
#
# With a Docker engine that answers (`docker info`), this is a plain `docker build`
# (production: BASE, TORCH_SPEC and TORCH_INDEX_URL default to the Dockerfile's values).
# Without one it uses buildah (chroot isolation; overlay or vfs storage, private, under the
# cache folder: see image/lib.sh) on a base made here with debootstrap, since no container registry is
# reachable; pip inside the build reaches the same wheel folder and local indexes as the
# host through read-only bind mounts that exist only while a RUN step runs.
#
# Environment (all optional):
#   IMAGE            image name:tag            (default: first line of image/IMAGE)
#   MERGEJOB_CACHE   cache root                (default: $HOME/.cache/mergejob)
#   BASE             base image                (buildah default: localhost/mergejob-base:bookworm)
#   TORCH_SPEC       pip spec for torch        (buildah default: the tested version recorded
#                                               in image/constraints.txt, e.g. torch==2.13.0+cpu)
#   TORCH_INDEX_URL  extra index for torch     (buildah default: none; torch comes from the
#                                               wheel folder /opt/wheels)
#   DEBIAN_MIRROR    mirror for debootstrap    (default: the machine's apt sources)
#   LOCAL_FIND_LINKS wheel folders bind-mounted for pip  (buildah; default: /opt/wheels)
#   LOCAL_INDEXES    folders holding simple/ indexes, bind-mounted for pip
#                                              (buildah; default: /opt/pypi /opt/pypi-more)
#   IMAGE_STORAGE_DRIVER  auto (default: overlay where it works), overlay or vfs, for
#                    buildah (see image/lib.sh)
#   FORCE_DOCKER=1 / FORCE_BUILDAH=1           pick the builder explicitly
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
IMAGE=${IMAGE:-$(head -n1 "$HERE/IMAGE")}
# shellcheck source=image/lib.sh
. "$HERE/lib.sh"   # CACHE, FS, BUILDAH, store_setup
SUITE=bookworm
BASE_NAME=localhost/mergejob-base:$SUITE
ROOTFS_TAR=$CACHE/rootfs-$SUITE-minbase.tar.gz

log() { printf '[image/build] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$CACHE"

# ---------------------------------------------------------------- version metadata
VERSION=$(python3 - "$ROOT/pyproject.toml" <<'EOF' 2>/dev/null || true
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])
EOF
)
VERSION=${VERSION:-${IMAGE##*:}}
REVISION=${REVISION:-$(git -C "$ROOT" rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
SOURCE=${IMAGE_SOURCE:-https://github.com/mergejob/mergejob}

tested_torch() {
    # freeze.sh records the torch the tests ran with: "# torch: torch==2.13.0+cpu"
    sed -n 's/^# torch: *//p' "$HERE/constraints.txt" | head -n1
}

# ---------------------------------------------------------------- buildah helpers
ensure_tools() {
    local missing=()
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]})"
    log "installing ${missing[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

# URI of the first configured apt source (deb822 or one-line) that carries SUITE ($1).
apt_uri_for() {
    local suite=$1 uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$suite" '
        BEGIN { RS = "" }
        { u = ""; ok = 0; en = 1
          n = split($0, line, "\n")
          for (i = 1; i <= n; i++) {
            if (line[i] ~ /^URIs:/) { split(line[i], f, /[ \t]+/); u = f[2] }
            if (line[i] ~ /^Suites:/) { m = split(line[i], f, /[ \t]+/)
              for (j = 2; j <= m; j++) if (f[j] == s) ok = 1 }
            if (line[i] ~ /^Enabled:[ \t]*no/) en = 0
          }
          if (ok && en && u != "") { print u; exit } }')
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v s="$suite" '
            $1 == "deb" { k = 2; if ($2 ~ /^\[/) { while ($k !~ /\]$/) k++; k++ }
                          if ($(k+1) == s) { print $k; exit } }')
    fi
    printf '%s\n' "$uri"
}

make_rootfs() {
    [ -s "$ROOTFS_TAR" ] && { log "base rootfs cached: $ROOTFS_TAR"; return 0; }
    ensure_tools debootstrap
    local mirror security dir
    mirror=${DEBIAN_MIRROR:-$(apt_uri_for "$SUITE")}
    mirror=${mirror:-http://deb.debian.org/debian}
    security=$(apt_uri_for "$SUITE-security")
    security=${security:-http://deb.debian.org/debian-security}
    dir=$(mktemp -d "$FS/tmp/rootfs.XXXXXX")
    # shellcheck disable=SC2064
    trap "umount '$dir/proc' 2>/dev/null || true; rm -rf '$dir'" EXIT
    log "debootstrap $SUITE (minbase) from $mirror"
    local t0=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$dir" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    # Point apt at the same mirror, including the security and point-release updates, and
    # take them now, so the base is not just the frozen bookworm release.
    rm -f "$dir/etc/apt/sources.list"
    cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    mount -t proc proc "$dir/proc"
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade' \
        >>"$CACHE/debootstrap.log" 2>&1 || die "apt-get upgrade in the rootfs failed (log: $CACHE/debootstrap.log)"
    umount "$dir/proc"
    # Trim: package caches, apt lists, man pages, logs. /usr/share/doc/*/copyright stays.
    rm -rf "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/var/lib/apt/lists/* "$dir"/var/log/* "$dir"/usr/share/man/* \
        "$dir"/usr/share/info/* "$dir"/tmp/* "$dir"/var/tmp/*
    find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    printf 'Acquire::Languages "none";\n' >"$dir/etc/apt/apt.conf.d/90mergejob"
    log "rootfs: $(du -sh "$dir" | cut -f1), packing"
    tar --numeric-owner --xattrs -C "$dir" --exclude='./dev/*' --exclude='./proc/*' \
        --exclude='./sys/*' -czf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$dir"; trap - EXIT
    log "rootfs ready in $((SECONDS - t0)) s: $ROOTFS_TAR ($(du -h "$ROOTFS_TAR" | cut -f1))"
}

make_base() {
    ensure_tools buildah
    store_setup
    # To refresh the base: rm "$ROOTFS_TAR" and `buildah rmi` it (or drop the cache folder).
    if "${BUILDAH[@]}" inspect --type image "$BASE_NAME" >/dev/null 2>&1; then
        log "base image present: $BASE_NAME"; return 0
    fi
    make_rootfs
    log "importing rootfs as $BASE_NAME"
    local ctr
    ctr=$("${BUILDAH[@]}" from --name mergejob-base-import scratch 2>/dev/null \
          || { "${BUILDAH[@]}" rm mergejob-base-import >/dev/null; \
               "${BUILDAH[@]}" from --name mergejob-base-import scratch; })
    "${BUILDAH[@]}" add "$ctr" "$ROOTFS_TAR" / >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash \
        --label org.opencontainers.image.base.name="debian:$SUITE (debootstrap minbase)" "$ctr"
    "${BUILDAH[@]}" commit --rm --quiet "$ctr" "$BASE_NAME" >/dev/null
}

# ---------------------------------------------------------------- builds
build_docker() {
    local args=(--file "$HERE/Dockerfile" --tag "$IMAGE"
        --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
        --build-arg "SOURCE=$SOURCE")
    [ -n "${BASE:-}" ] && args+=(--build-arg "BASE=$BASE")
    [ -n "${TORCH_SPEC:-}" ] && args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
    [ -n "${TORCH_INDEX_URL+x}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    log "docker build $IMAGE"
    docker build "${args[@]}" "$ROOT"
}

build_buildah() {
    make_base
    local torch_spec=${TORCH_SPEC:-$(tested_torch)}
    [ -n "$torch_spec" ] || die "no TORCH_SPEC and none recorded in image/constraints.txt (run image/freeze.sh)"
    local args=(--layers --pull=never --isolation chroot --format oci
        --file "$HERE/Dockerfile" --tag "$IMAGE"
        --build-arg "BASE=${BASE:-$BASE_NAME}"
        --build-arg "TORCH_SPEC=$torch_spec"
        --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}"
        --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
        --build-arg "SOURCE=$SOURCE"
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    # The same packages the host's pip sees: wheel folder and local simple indexes.
    local find_links="" extra_index="" d
    for d in ${LOCAL_FIND_LINKS-/opt/wheels}; do
        [ -d "$d" ] && { args+=(--volume "$d:$d:ro"); find_links="$find_links $d"; }
    done
    for d in ${LOCAL_INDEXES-/opt/pypi /opt/pypi-more}; do
        [ -d "$d/simple" ] && { args+=(--volume "$d:$d:ro"); extra_index="$extra_index file://$d/simple"; }
    done
    args+=(--build-arg "PIP_FIND_LINKS=${find_links# }" --build-arg "PIP_EXTRA_INDEX_URL=${extra_index# }")
    log "buildah bud $IMAGE (base ${BASE:-$BASE_NAME}, $torch_spec, $DRIVER storage)"
    # Steps are stamped with the seconds since the build began.
    local t0=$SECONDS line
    "${BUILDAH[@]}" bud "${args[@]}" "$ROOT" 2>&1 | while IFS= read -r line; do
        case $line in
            *"STEP "*|*COMMIT*|"Successfully tagged"*) printf '[%4ds] %s\n' $((SECONDS - t0)) "$line" ;;
            *) printf '%s\n' "$line" ;;
        esac
    done
    store_trim
}

image_size() {
    if [ "$1" = docker ]; then
        docker image inspect --format '{{.Size}}' "$IMAGE"
    else
        "${BUILDAH[@]}" images --noheading --format '{{.Size}}' "$IMAGE"
    fi
}

# Drop the buildah storage (all images, layer cache) and its loop file; "clean all" also
# drops the cached debootstrap rootfs.
clean() {
    log "removing buildah storage under $CACHE"
    store_unmount
    rm -rf "$CACHE/fs" "$CACHE/fs.ext4" "$CACHE"/run "$CACHE"/run-* "$CACHE/driver"
    [ "${1:-}" = all ] && rm -f "$ROOTFS_TAR"
    return 0
}

main() {
    local builder
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    case ${1:-} in
        clean) clean "${2:-}"; return ;;
        base) make_base; return ;;
        "") ;;
        *) die "usage: image/build.sh [base|clean [all]]" ;;
    esac
    if [ "${FORCE_BUILDAH:-}" != 1 ] && { [ "${FORCE_DOCKER:-}" = 1 ] || docker info >/dev/null 2>&1; }; then
        builder=docker
    else
        builder=buildah
    fi
    local t0=$SECONDS
    if [ "$builder" = docker ]; then build_docker; else build_buildah; fi
    log "built $IMAGE with $builder in $((SECONDS - t0)) s; size $(image_size "$builder")"
}

main "$@"; exit  # (exit: an edit to this file while it runs cannot be read as more script)
