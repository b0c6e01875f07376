# shellcheck shell=bash
# Shared by image/build.sh and image/test.sh: the cache folder and the buildah setup.
#
# buildah keeps its own storage under the cache folder (chroot isolation, no daemon):
#   $CACHE/fs/storage[-overlay]   --root        $CACHE/run[-overlay]   --runroot
#
# Storage driver, IMAGE_STORAGE_DRIVER:
#   vfs      works anywhere, but copies the whole image tree (1.5 GB here) for every build
#            step and commit: a code-only rebuild takes minutes.
#   overlay  kernel overlayfs (root only): a step stores only its changes; a code-only
#            rebuild takes seconds.
#   auto     (default) overlay where a test overlay mount succeeds, else vfs. The choice is
#            remembered in $CACHE/driver so that build and test use the same storage.
#
# Where the cache lies on a filesystem mounted with "discard" (as this machine's / is) and
# we are root, $CACHE/fs is an ext4 image file ($CACHE/fs.ext4, sparse) loop-mounted
# without discard: on the "discard" filesystem every deleted file costs a synchronous
# discard on the virtual disk, and buildah deletes whole image trees (10 minutes per build
# with vfs). Freed space goes back to the host with fstrim after each build (store_trim).
# IMAGE_STORE_LOOP=0 turns the loop store off, =1 forces it; IMAGE_STORE_SIZE caps it
# (default 48G, sparse).

CACHE=${MERGEJOB_CACHE:-$HOME/.cache/mergejob}/image
FS=$CACHE/fs
export BUILDAH_ISOLATION=chroot
BUILDAH=()
DRIVER=""

_lib_log() { printf '[image] %s\n' "$*" >&2; }

_overlay_works() {
    [ "$(id -u)" -eq 0 ] || return 1
    local d ok=1
    d=$(mktemp -d "$FS/tmp/overlay-probe.XXXXXX") || return 1
    mkdir "$d/l" "$d/u" "$d/w" "$d/m"
    if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
        umount "$d/m"; ok=0
    fi
    rm -rf "$d"
    return $ok
}

store_setup() {
    mkdir -p "$CACHE"
    if ! mountpoint -q "$FS" 2>/dev/null; then
        local want=${IMAGE_STORE_LOOP:-auto}
        if [ "$want" = auto ]; then
            want=0
            case ",$(findmnt -n -o OPTIONS --target "$CACHE" 2>/dev/null)," in
                *,discard,*) [ "$(id -u)" -eq 0 ] && want=1 ;;
            esac
        fi
        if [ "$want" = 1 ]; then
            local img=$CACHE/fs.ext4
            if [ ! -f "$img" ]; then
                truncate -s "${IMAGE_STORE_SIZE:-48G}" "$img"
                mkfs.ext4 -q -F -m 0 -E nodiscard "$img"
            fi
            mkdir -p "$FS"
            if [ -n "$(ls -A "$FS" 2>/dev/null)" ]; then
                _lib_log "$FS is not empty; not mounting $img over it"
            elif mount -o loop,nodiscard,noatime "$img" "$FS"; then
                _lib_log "buildah storage: $img loop-mounted on $FS (no discard)"
            else
                _lib_log "could not loop-mount $img; storage stays on the plain folder (slow deletes)"
            fi
        fi
    fi
    mkdir -p "$FS/tmp"

    DRIVER=${IMAGE_STORAGE_DRIVER:-auto}
    if [ "$DRIVER" = auto ]; then
        DRIVER=$(cat "$CACHE/driver" 2>/dev/null || true)
        if [ -z "$DRIVER" ]; then
            if _overlay_works; then DRIVER=overlay; else DRIVER=vfs; fi
            echo "$DRIVER" >"$CACHE/driver"
            _lib_log "storage driver: $DRIVER (remembered in $CACHE/driver)"
        fi
    fi
    local sfx=${DRIVER#vfs}
    sfx=${sfx:+-$sfx}
    mkdir -p "$FS/storage$sfx" "$CACHE/run$sfx"
    # shellcheck disable=SC2034  # used by the scripts that source this file
    BUILDAH=(buildah --root "$FS/storage$sfx" --runroot "$CACHE/run$sfx" --storage-driver "$DRIVER")
}

# Give the blocks freed inside the loop store back to the host (one batched discard).
store_trim() {
    if mountpoint -q "$FS" 2>/dev/null; then fstrim "$FS" 2>/dev/null || true; fi
}

store_unmount() {
    if mountpoint -q "$FS" 2>/dev/null; then umount "$FS"; fi
}
