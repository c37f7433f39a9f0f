#!/usr/bin/env bash
# Builds the project's images for the test cluster's real node without a Docker engine
# (buildah, chroot isolation) and nothing pulled from an image registry:
#
#   base        debootstrap bookworm + Python 3.11      -> localhost/kubetune-base:bookworm
#   pause       busybox-static, the pod sandbox         -> localhost/kubetune/pause:1
#   controller  Dockerfile.controller, BASE_IMAGE=base  -> kubetune/controller:dev
#   trainer     trainer_image/Dockerfile, BASE_IMAGE=base, torch from PyPI -> kubetune/trainer:dev
#               (s5cmd: the testbin's static build, tools/build-testbin.sh s5cmd, copied into
#               the context as tools/s5cmd/prebuilt/s5cmd; GO_IMAGE=base, so nothing is pulled)
#
# Each image is written as an OCI archive under $KUBETUNE_IMAGES (default
# ~/.cache/kubetune/images) and rebuilt only when its inputs change: the stamp next to the
# archive is the sha256 of the Dockerfile, constraints.txt, pyproject.toml and the package
# source (the trainer's also of tools/s5cmd's go.mod, go.sum, tools.go and the s5cmd binary),
# plus the base's stamp and the build args. The host's pip cache is mounted into the builds,
# so a rebuild does not download torch again.
#
#   tools/images.sh build [NAME...]     build what is stale (default: all)
#   tools/images.sh import SOCKET       import every archive into containerd (k8s.io namespace)
#   tools/images.sh names               print NAME=REF lines
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
# shellcheck source=versions.env
source "$here/versions.env"
testbin="${KUBETUNE_TESTBIN:-$HOME/.cache/kubetune/testbin}"
cache="${KUBETUNE_IMAGES:-$HOME/.cache/kubetune/images}"
mirror="${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
pip_cache="${PIP_CACHE_DIR:-$HOME/.cache/pip}"

BASE_REF=localhost/kubetune-base:bookworm
PAUSE_REF=localhost/kubetune/pause:1
CONTROLLER_REF=kubetune/controller:dev
TRAINER_REF=kubetune/trainer:dev

ref_of() {
  case $1 in
    base) echo "$BASE_REF" ;; pause) echo "$PAUSE_REF" ;;
    controller) echo "$CONTROLLER_REF" ;; trainer) echo "$TRAINER_REF" ;;
    *) echo "unknown image $1" >&2; exit 2 ;;
  esac
}

log() { echo "[images] $*" >&2; }

# Storage lives in the cache (kept between runs like the testbin); overlay keeps the
# multi-GB trainer layers from being copied per build step.
buildah_() {
  buildah --root "$cache/buildah/root" --runroot "$cache/buildah/run" \
    --storage-driver overlay "$@"
}

source_hash() { # the inputs of a Python image: files pip install reads
  (
    cd "$repo"
    sha256sum "$@" pyproject.toml constraints.txt README.md
    find orchestrator -type f -name '*.py' -print0 | sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -d' ' -f1
}

stamp_ok() { [[ -f "$cache/$1.tar" && -f "$cache/$1.stamp" && "$(cat "$cache/$1.stamp")" == "$2" ]]; }

# A build context with what the builds need from the host: its CA bundle (the registries
# may be reached through a TLS proxy whose CA only the host trusts) and a pip.conf using it.
build_support() {
  local d="$cache/build-support"
  mkdir -p "$d/pip"
  cp /etc/ssl/certs/ca-certificates.crt "$d/ca.crt"
  printf '[global]\ncert = /etc/xdg/pip/ca.crt\ndisable-pip-version-check = true\n' > "$d/pip/pip.conf"
  cp "$d/ca.crt" "$d/pip/ca.crt"
  mkdir -p "$pip_cache"
  echo "$d"
}

# The name the kubelet looks up: an unqualified `kubetune/trainer:dev` in a pod spec means
# docker.io/kubetune/trainer:dev (buildah itself would have said localhost/...).
qualified() {
  case ${1%%/*} in
    *.*|*:*|localhost) echo "$1" ;;
    *) echo "docker.io/$1" ;;
  esac
}

export_archive() { # NAME: buildah image -> uncompressed OCI archive named as pods name it
  local name=$1 ref; ref=$(ref_of "$1")
  rm -f "$cache/$name.tar.tmp"
  buildah_ push -q --disable-compression "$ref" \
    "oci-archive:$cache/$name.tar.tmp:$(qualified "$ref")" >/dev/null
  mv "$cache/$name.tar.tmp" "$cache/$name.tar"
}

build_base() {
  # Content only, never the path: CI builds from another checkout and must reuse this base.
  local key; key=$(printf '%s\n' "$mirror" "$(sha256sum < "$here/images/base.Dockerfile")" | sha256sum | cut -d' ' -f1)
  if stamp_ok base "$key"; then log "base: up to date"; return; fi
  local t0 d; t0=$(date +%s); d="$cache/base-build"
  rm -rf "$d"; mkdir -p "$d"
  log "base: debootstrap bookworm (minbase + python3) from $mirror ..."
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$d/rootfs" "$mirror" > "$d/debootstrap.log" 2>&1 \
    || { tail -20 "$d/debootstrap.log" >&2; exit 1; }
  rm -rf "$d"/rootfs/var/cache/apt/archives/*.deb "$d"/rootfs/var/lib/apt/lists/*
  tar -C "$d/rootfs" --numeric-owner -cf "$d/rootfs.tar" .
  rm -rf "$d/rootfs"
  cp "$here/images/base.Dockerfile" "$d/Dockerfile"
  buildah_ build -q --isolation chroot -t "$BASE_REF" -f "$d/Dockerfile" "$d" >/dev/null
  export_archive base
  rm -rf "$d"
  echo "$key" > "$cache/base.stamp"
  log "base: built in $(( $(date +%s) - t0 ))s"
}

build_pause() {
  local key; key=$(cat "$here/images/pause.Dockerfile" /bin/busybox | sha256sum | cut -d' ' -f1)
  if stamp_ok pause "$key"; then log "pause: up to date"; return; fi
  local d="$cache/pause-build"
  rm -rf "$d"; mkdir -p "$d"
  cp /bin/busybox "$d/busybox"
  buildah_ build -q --isolation chroot -t "$PAUSE_REF" -f "$here/images/pause.Dockerfile" "$d" >/dev/null
  export_archive pause
  rm -rf "$d"
  echo "$key" > "$cache/pause.stamp"
  log "pause: built"
}

need_space() { # need_space NAME GIB: fail before a build that would fill the disk midway
  local free; free=$(( $(df -Pk "$cache" | awk 'NR==2 {print $4}') / 1048576 ))
  (( free >= $2 )) || { echo "$1: building needs ~$2 GiB free under $cache, $free GiB left" \
    "(a rebuild needs room for a new layer, buildah's commit copy and the archive)" >&2; exit 1; }
}

# The trainer image's s5cmd (trainer_image/Dockerfile, stage s5cmd): the testbin's static
# build (made here if missing or stale, a few seconds with Go's caches warm), copied into the
# build context, which is the repository (no .dockerignore), at the path the Dockerfile takes
# with S5CMD_PREBUILT=1. Prints the context paths that are inputs of the image.
s5cmd_prebuilt() {
  local dst="$repo/tools/s5cmd/prebuilt"
  "$here/build-testbin.sh" s5cmd >&2
  mkdir -p "$dst"
  if ! cmp -s "$testbin/s5cmd" "$dst/s5cmd"; then
    cp "$testbin/s5cmd" "$dst/s5cmd.tmp" && chmod 0755 "$dst/s5cmd.tmp"
    mv "$dst/s5cmd.tmp" "$dst/s5cmd"
  fi
  echo tools/s5cmd/go.mod tools/s5cmd/go.sum tools/s5cmd/tools.go tools/s5cmd/prebuilt/s5cmd
}

# build_python NAME DOCKERFILE [BUILD_ARG...]; $inputs: extra context files of its stamp
build_python() {
  local name=$1 dockerfile=$2; shift 2
  # shellcheck disable=SC2086 # $inputs: space-separated repository paths
  local key; key=$(printf '%s\n' "$(source_hash "$dockerfile" ${inputs:-})" \
    "$(cat "$cache/base.stamp")" "$*" | sha256sum | cut -d' ' -f1)
  if stamp_ok "$name" "$key"; then log "$name: up to date"; return; fi
  local t0 support args=(); t0=$(date +%s); support=$(build_support)
  need_space "$name" "$( [[ $name == trainer ]] && echo 20 || echo 3 )"
  for a in "$@"; do args+=(--build-arg "$a"); done
  log "$name: building $(ref_of "$name") from $dockerfile ..."
  # --layers: the heavy dependency layers are reused when only the package source changed.
  (cd "$repo" && buildah_ build --layers --isolation chroot --network host \
      -v "$support/pip:/etc/xdg/pip:ro" -v "$pip_cache:/root/.cache/pip" \
      --build-arg BASE_IMAGE="$BASE_REF" "${args[@]}" \
      -t "$(ref_of "$name")" -f "$dockerfile" . ) > "$cache/$name.build.log" 2>&1 \
    || { tail -40 "$cache/$name.build.log" >&2; exit 1; }
  export_archive "$name"
  echo "$key" > "$cache/$name.stamp"
  log "$name: built in $(( $(date +%s) - t0 ))s ($(du -sh "$cache/$name.tar" | cut -f1))"
}

# buildah writes these default paths whatever --root says (a CNI lock, a blob-info cache):
# remove the ones that were not there before the build.
host_paths_restore() {
  local p
  for p in "$@"; do rm -rf "$p"; done
}

build() {
  local created=() p
  for p in /etc/cni /var/lib/containers; do [[ -e $p ]] || created+=("$p"); done
  # shellcheck disable=SC2064
  [[ ${#created[@]} -eq 0 ]] || trap "host_paths_restore ${created[*]}" EXIT
  command -v buildah >/dev/null && command -v debootstrap >/dev/null \
    || { echo "buildah/debootstrap missing: run 'make node-deps' (root)" >&2; exit 1; }
  mkdir -p "$cache"
  # Working containers of a build that died midway (a full disk, a killed CI) pin their
  # layers: no build runs now, so none is in use.
  [[ ! -d "$cache/buildah/root" ]] || buildah_ rm --all >/dev/null 2>&1 || true
  local names=("$@"); [[ ${#names[@]} -gt 0 ]] || names=(base pause controller trainer)
  local t0; t0=$(date +%s)
  for n in "${names[@]}"; do
    case $n in
      base) build_base ;;
      pause) build_pause ;;
      controller) build_base; build_python controller Dockerfile.controller ;;
      trainer) build_base; inputs=$(s5cmd_prebuilt)
               build_python trainer trainer_image/Dockerfile \
                 PYTHON=python3.11 TORCH_INDEX_URL=https://pypi.org/simple PIP_NO_CACHE_DIR= \
                 PIP_CACHE_DIR=/root/.cache/pip \
                 GO_IMAGE="$BASE_REF" S5CMD_PREBUILT=1 S5CMD_VERSION="$S5CMD_VERSION"
               inputs= ;;
      *) echo "unknown image $n" >&2; exit 2 ;;
    esac
  done
  prune_storage
  log "done in $(( $(date +%s) - t0 ))s -> $cache"
}

# Superseded builds would grow the cache by gigabytes each (the trainer's torch layer is
# ~6 GB): keep the tagged images and the intermediate images whose top layer lies in a
# tagged image's layer chain (the --layers cache of the next build); remove the rest.
prune_storage() {
  local stale
  stale=$(python3 - "$cache/buildah/root" <<'PY'
import json, sys
root = sys.argv[1]
images = json.load(open(f"{root}/overlay-images/images.json"))
parent = {l["id"]: l.get("parent") for l in json.load(open(f"{root}/overlay-layers/layers.json"))}
keep = set()
for image in images:
    layer = image.get("layer") if image.get("names") else None
    while layer and layer not in keep:
        keep.add(layer)
        layer = parent.get(layer)
print(" ".join(i["id"] for i in images if not i.get("names") and i.get("layer") not in keep))
PY
  )
  # shellcheck disable=SC2086
  [[ -z $stale ]] || buildah_ rmi --force $stale >/dev/null 2>&1 || true
  buildah_ rmi --prune >/dev/null 2>&1 || true
  log "storage: $(du -sh "$cache/buildah" | cut -f1) after pruning $(wc -w <<<"$stale") superseded images"
}

has_image() { # has_image SOCKET REF (no pipe into grep -q: pipefail and SIGPIPE)
  local refs; refs=$(ctr -a "$1" -n k8s.io images ls -q)
  grep -qxF "$2" <<<"$refs"
}

import() { # import SOCKET: every built archive whose digest containerd lacks
  local sock=$1 n ref
  for n in base pause controller trainer; do
    [[ -f "$cache/$n.tar" ]] || continue
    ref=$(ref_of "$n")
    if [[ -f "$cache/$n.imported" && "$(cat "$cache/$n.imported")" == "$(cat "$cache/$n.stamp")@$sock" ]] \
       && has_image "$sock" "$(qualified "$ref")"; then
      continue
    fi
    local t0; t0=$(date +%s)
    # Once more on failure: containerd has been seen to lose a parent snapshot mid-unpack
    # ("parent snapshot ... does not exist") right after a GC; the second import succeeds.
    ctr -a "$sock" -n k8s.io images import "$cache/$n.tar" >/dev/null \
      || { log "import of $ref failed; retrying once"; \
           ctr -a "$sock" -n k8s.io images import "$cache/$n.tar" >/dev/null; }
    if [[ "$(qualified "$ref")" != "$ref" ]] && ! has_image "$sock" "$(qualified "$ref")"; then
      ctr -a "$sock" -n k8s.io images tag --force "$ref" "$(qualified "$ref")" >/dev/null
    fi
    echo "$(cat "$cache/$n.stamp")@$sock" > "$cache/$n.imported"
    log "imported $ref in $(( $(date +%s) - t0 ))s"
  done
  prune_containerd "$sock"
}

# The CRI names each image twice: by tag and by its ID (sha256:...). A re-import moves the
# tag, but the old ID name keeps the superseded image's blobs and unpacked snapshots alive
# (gigabytes per trainer rebuild). Remove ID names whose manifest no tag points at; the
# deletion's synchronous GC frees the content and snapshots.
prune_containerd() {
  local sock=$1 listing stale
  listing=$(ctr -a "$sock" -n k8s.io images ls)
  stale=$(awk 'NR > 1 { if ($1 ~ /^sha256:/) ids[$1] = $3; else tagged[$3] = 1 }
               END { for (i in ids) if (!(ids[i] in tagged)) print i }' <<<"$listing")
  # shellcheck disable=SC2086
  [[ -z $stale ]] || ctr -a "$sock" -n k8s.io images rm --sync $stale >/dev/null
}

case "${1:-}" in
  build) shift; build "$@" ;;
  import) import "${2:?usage: $0 import CONTAINERD_SOCKET}" ;;
  names) for n in base pause controller trainer; do echo "$n=$(ref_of "$n")"; done ;;
  *) echo "usage: $0 build [base|pause|controller|trainer...] | import SOCKET | names" >&2; exit 2 ;;
esac
