#!/usr/bin/env bash
# Build wtbox's docker images locally (no image registry is reachable from our machines):
#   local/debian:bookworm                  debootstrap --variant=minbase, docker import
#   local/wtbox-postgres:15-<hash> (+ :15)  docker/postgres/Dockerfile
#   local/wtbox-victoria-metrics:<hash>    docker/victoria-metrics/Dockerfile
#   local/wtbox-redis:<hash> (+ :7)        docker/redis/Dockerfile (the docker runtime of [backing.*] in tests)
# Idempotent and cached: <hash> covers the recipe (Dockerfile folder + base recipe), an
# image already present is not rebuilt, and the rootfs tarball and built images are kept
# under $WTBOX_IMAGE_CACHE (default /var/cache/wtbox-images) so that a wiped docker
# store is refilled with `docker load` instead of a rebuild.
# stdout: the two lines to export (WTBOX_POSTGRES_IMAGE=..., WTBOX_VICTORIAMETRICS_IMAGE=...);
# progress goes to stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${WTBOX_IMAGE_CACHE:-/var/cache/wtbox-images}
MIRROR=${WTBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BASE_IMAGE=local/debian:$SUITE
# The legacy builder: the docker CLI may lack the buildx plugin, and we need no BuildKit feature.
export DOCKER_BUILDKIT=0

log() { echo "build_images: $*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)."
docker info >/dev/null 2>&1 || die "the docker daemon is not running (scripts/start_dockerd.sh starts it)."
mkdir -p "$CACHE"
# One build at a time per machine (two test sessions may start together).
exec 9>"$CACHE/.lock"
flock 9
T0=$(now)

# Hash of a recipe: the files of a folder (names and contents, sorted) plus extra text.
recipe_hash() {
    local dir=$1 extra=$2
    {
        printf '%s\n' "$extra"
        (cd "$dir" && find . -type f | LC_ALL=C sort | while read -r f; do
            printf '%s\n' "$f"; sha256sum < "$f"; done)
    } | sha256sum | cut -c1-12
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# Keep only the newest cache file of a kind: older hashes are never used again.
prune_cache() {
    local prefix=$1 keep=$2 f
    for f in "$CACHE/$prefix"*; do
        [ -e "$f" ] && [ "$f" != "$keep" ] && rm -f "$f" && log "pruned old cache $f"
    done
    return 0
}

# ---------------------------------------------------------------- base image
BASE_HASH=$(printf 'debootstrap --variant=minbase %s %s\n' "$SUITE" "$MIRROR" | sha256sum | cut -c1-12)
ensure_base() {
    if have_image "$BASE_IMAGE" && [ "$(image_label "$BASE_IMAGE" wtbox.recipe)" = "$BASE_HASH" ]; then
        return 0
    fi
    local tarball="$CACHE/rootfs-debian-$SUITE-minbase-$BASE_HASH.tar" t
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)."
        local dir
        dir=$(mktemp -d /var/tmp/wtbox-rootfs.XXXXXX)
        t=$(now)
        log "debootstrap --variant=minbase $SUITE (cold; about a minute)"
        if ! debootstrap --variant=minbase "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
            rm -rf "$dir"
            die "debootstrap failed; see $CACHE/debootstrap.log."
        fi
        # Smaller image, and apt inside builds should not keep .debs around.
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
        tar -C "$dir" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$dir"
        prune_cache "rootfs-debian-$SUITE-minbase-" "$tarball"
        log "rootfs built in $(since "$t") s"
    fi
    t=$(now)
    docker import -c "LABEL wtbox.recipe=$BASE_HASH" -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
        "$tarball" "$BASE_IMAGE" >/dev/null
    log "imported $BASE_IMAGE in $(since "$t") s"
}

# ---------------------------------------------------------------- app images
# ensure_app NAME TAG [EXTRA_TAG]: build docker/NAME into TAG unless present or cached.
ensure_app() {
    local name=$1 tag=$2 extra=${3:-} t
    local saved="$CACHE/image-${tag//[\/:]/_}.tar"
    if ! have_image "$tag"; then
        if [ -s "$saved" ]; then
            t=$(now)
            docker load -i "$saved" >/dev/null
            log "loaded $tag from $saved in $(since "$t") s"
        else
            ensure_base
            t=$(now)
            log "docker build $tag (apt-get from Debian's mirror)"
            # Host network: apt must reach the mirror even where the bridge cannot forward.
            if ! docker build --network host -q -t "$tag" "$ROOT/docker/$name" >"$CACHE/build-$name.log" 2>&1; then
                die "docker build of $tag failed; see $CACHE/build-$name.log."
            fi
            log "built $tag in $(since "$t") s"
            t=$(now)
            docker save -o "$saved.tmp" "$tag"
            mv "$saved.tmp" "$saved"
            local repo=${tag%%:*}
            prune_cache "image-${repo//\//_}_" "$saved"
            log "saved $tag to the cache in $(since "$t") s"
        fi
    fi
    if [ -n "$extra" ]; then
        docker tag "$tag" "$extra"
    fi
    # Images of older recipes are never used again: don't let them pile up.
    local repo=${tag%%:*} old
    for old in $(docker images "$repo" --format '{{.Repository}}:{{.Tag}}'); do
        if [ "$old" != "$tag" ] && [ "$old" != "$extra" ]; then
            docker rmi "$old" >/dev/null 2>&1 && log "removed old image $old"
        fi
    done
    return 0
}

PG_HASH=$(recipe_hash "$ROOT/docker/postgres" "$BASE_HASH")
VM_HASH=$(recipe_hash "$ROOT/docker/victoria-metrics" "$BASE_HASH")
PG_IMAGE=local/wtbox-postgres:15-$PG_HASH
VM_IMAGE=local/wtbox-victoria-metrics:$VM_HASH
RD_HASH=$(recipe_hash "$ROOT/docker/redis" "$BASE_HASH")
RD_IMAGE=local/wtbox-redis:$RD_HASH

case "${1:-all}" in
    all) ensure_app postgres "$PG_IMAGE" local/wtbox-postgres:15
         ensure_app victoria-metrics "$VM_IMAGE" local/wtbox-victoria-metrics:latest
         ensure_app redis "$RD_IMAGE" local/wtbox-redis:7 ;;
    postgres) ensure_app postgres "$PG_IMAGE" local/wtbox-postgres:15 ;;
    victoria-metrics) ensure_app victoria-metrics "$VM_IMAGE" local/wtbox-victoria-metrics:latest ;;
    redis) ensure_app redis "$RD_IMAGE" local/wtbox-redis:7 ;;
    --print) ;;  # only print the names the current recipes produce
    *) die "usage: build_images.sh [all|postgres|victoria-metrics|redis|--print]" ;;
esac

log "done in $(since "$T0") s"
echo "WTBOX_POSTGRES_IMAGE=$PG_IMAGE"
echo "WTBOX_VICTORIAMETRICS_IMAGE=$VM_IMAGE"
