# shellcheck shell=bash
# Shared by image/build.sh and image/test.sh: the cache folder and the buildah setup.
#
# buildah keeps its own storage (chroot isolation) under the cache folder:
#   $CACHE/fs/storage[-DRIVER]  --root     $CACHE/run[-DRIVER]  --runroot
# IMAGE_STORAGE_DRIVER: vfs (default; works anywhere) or overlay (kernel overlayfs, needs
# root; each build step then stores only its changes instead of a copy of the whole tree).
# The vfs driver copies the whole image tree for every build step and deletes those copies
# afterwards. On a filesystem mounted with "discard" (as this machine's / is) each deleted
# file costs a synchronous discard on the virtual disk: a build spends ~10 minutes just
# deleting. So where the cache lies on such a filesystem and we are root, $CACHE/fs is an
# ext4 image file ($CACHE/fs.ext4, sparse) loop-mounted without discard. IMAGE_STORE_LOOP=0
# turns that off, =1 forces it; IMAGE_STORE_SIZE sets the image file's size (default 64G,
# sparse: it takes what is written).

CACHE=${MERGEJOB_CACHE:-$HOME/.cache/mergejob}/image
FS=$CACHE/fs
DRIVER=${IMAGE_STORAGE_DRIVER:-vfs}
_sfx=${DRIVER#vfs}; _sfx=${_sfx:+-$_sfx}
# shellcheck disable=SC2034  # used by the scripts that source this file
BUILDAH=(buildah --root "$FS/storage$_sfx" --runroot "$CACHE/run$_sfx" --storage-driver "$DRIVER")
export BUILDAH_ISOLATION=chroot

_lib_log() { printf '[image] %s\n' "$*" >&2; }

store_setup() {
    mkdir -p "$CACHE"
    if mountpoint -q "$FS" 2>/dev/null; then return 0; fi
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
            truncate -s "${IMAGE_STORE_SIZE:-64G}" "$img"
            mkfs.ext4 -q -F -m 0 -E nodiscard "$img"
        fi
        mkdir -p "$FS"
        if [ -n "$(ls -A "$FS" 2>/dev/null)" ]; then
            _lib_log "$FS is not empty; not mounting $img over it (move it away to use the loop store)"
        elif mount -o loop,nodiscard,noatime "$img" "$FS"; then
            _lib_log "buildah storage: $img loop-mounted on $FS (no discard)"
        else
            _lib_log "could not loop-mount $img; buildah storage stays on the plain folder (slow deletes)"
        fi
    fi
    mkdir -p "$FS/storage$_sfx" "$FS/tmp" "$CACHE/run$_sfx"
}

store_unmount() {
    if mountpoint -q "$FS" 2>/dev/null; then umount "$FS"; fi
}
