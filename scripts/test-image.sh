#!/usr/bin/env bash
# Builds deploy/Dockerfile's runtime stage with buildah (Debian's package)
# from a binary built on the host (BINARY=host; KILN_BIN, the dev build by
# default) on a Debian base made here with debootstrap from the machine's
# configured Debian mirror, then runs the image's own entry point and
# healthcheck from its filesystem: read-only root, a tmpfs /tmp, uid 10001,
# the built-in model and a repository mounted at /models.
#
# Why not `podman run`: on these machines every OCI runtime Debian ships
# fails to start a container: crun with "setrlimit RLIMIT_NOFILE: Operation
# not permitted", runc with "error setting rlimit type 6" (and type 7 with
# --ulimit host), and --cgroups=disabled with "cgroups in hybrid mode not
# supported". Building works with chroot isolation, so the test builds
# with buildah and runs the image's root filesystem with chroot, which is
# what a container adds namespaces to.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
kiln=${KILN_BIN:-target/debug/kiln}
if [ "$(id -u)" != 0 ]; then
  # Mounting the image's root and chroot need root; so does buildah here.
  echo "SKIP runtime image test: needs root (mount, chroot, buildah); run as root to include it"
  exit 0
fi
scripts/deploy-env.sh
export BUILDAH_ISOLATION=chroot
base=localhost/kiln-debian-base:bookworm
image=localhost/kiln:test
# Names no mirror: the one this machine's apt uses.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
  awk '/^deb / {print $2; exit}' /etc/apt/sources.list)

work=$(mktemp -d)
container=""
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  for m in "$work/root/models" "$work/root/tmp" "$work/root"; do mountpoint -q "$m" && umount "$m"; done
  [ -n "$container" ] && buildah rm "$container" >/dev/null
  buildah rmi -f "$image" >/dev/null 2>&1 || true
  # The `host` stage's image, which FROM ${BINARY} made, has no name.
  buildah rmi --prune >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  echo "debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; exit 1; }
  # buildah has no `import`: the tree goes into a scratch container's
  # mounted root (tar keeps owners, modes and device nodes), committed.
  scratch=$(buildah from scratch)
  tar -C "$work/base" -c . | tar -C "$(buildah mount "$scratch")" -x
  buildah umount "$scratch" >/dev/null
  buildah commit --rm "$scratch" "$base" >/dev/null
  rm -rf "$work/base"
fi

# The build context: the Dockerfile's .dockerignore lets only the sources
# and target/release/kiln through; here only the binary is needed.
mkdir -p "$work/context/target/release"
install -m 0755 "$kiln" "$work/context/target/release/kiln"
strip "$work/context/target/release/kiln"
cp .dockerignore "$work/context/"
# --format docker keeps HEALTHCHECK, which the OCI image format drops.
# buildah leaves the working container of a stage another stage builds FROM
# (--force-rm instead fails the build: "identifier is not an image"), so
# the containers this build adds are removed after it.
before=$(buildah containers -q | sort)
buildah bud --format docker --layers=false --build-arg BINARY=host --build-arg RUNTIME_BASE="$base" \
  --target runtime -f deploy/Dockerfile -t "$image" "$work/context" >"$work/build.log" 2>&1 ||
  { cat "$work/build.log"; exit 1; }
comm -13 <(echo "$before") <(buildah containers -q | sort) | xargs -r buildah rm >/dev/null
echo "ok   runtime stage built ($(du -h "$work/context/target/release/kiln" | cut -f1) binary on $base)"

config() { buildah inspect --type image --format "$1" "$image"; }
[ "$(config '{{.OCIv1.Config.User}}')" = 10001:10001 ] || { echo "FAIL: image user is not 10001:10001"; exit 1; }
[ "$(config '{{.OCIv1.Config.Entrypoint}}')" = "[kiln]" ] || { echo "FAIL: entry point"; exit 1; }
health=$(config '{{range .Docker.Config.Healthcheck.Test}}{{.}} {{end}}')
case "$health" in "CMD kiln health "*) ;; *) echo "FAIL: no kiln health HEALTHCHECK: '$health'"; exit 1 ;; esac
echo "ok   image config: user 10001:10001, entry point kiln, healthcheck '${health#CMD }'"

container=$(buildah from "$image")
mkdir -p "$work/root"
mount --bind "$(buildah mount "$container")" "$work/root"
mount -o remount,bind,ro "$work/root"
mount -t tmpfs -o size=64m,mode=1777 tmpfs "$work/root/tmp"
if touch "$work/root/usr/local/bin/x" 2>/dev/null; then echo "FAIL: the root is writable"; exit 1; fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Serves as `docker run --read-only --tmpfs /tmp kiln ARGS` would, waits for
# the image's own healthcheck to pass, and stops it with SIGTERM.
serve() {
  local grpc metrics http check
  grpc=$(free_port)
  metrics=$(free_port)
  http=$(free_port)
  chroot --userspec=10001:10001 "$work/root" /usr/local/bin/kiln "$@" --grpc "127.0.0.1:$grpc" \
    --http "127.0.0.1:$http" --metrics "127.0.0.1:$metrics" >"$work/serve.log" 2>&1 &
  server=$!
  # The image's healthcheck, pointed at this server's port.
  check=${health#CMD }
  check=${check//127.0.0.1:8001/127.0.0.1:$grpc}
  for _ in $(seq 1 300); do
    # shellcheck disable=SC2086 # the healthcheck's words
    if chroot --userspec=10001:10001 "$work/root" $check >/dev/null 2>&1; then
      "$root/$kiln" health --url "127.0.0.1:$grpc" --model risk
      python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$http/v2/models/risk/ready', timeout=5)" ||
        { echo "FAIL: the HTTP listener did not say risk is ready"; exit 1; }
      kill -TERM $server
      wait $server || { cat "$work/serve.log"; echo "FAIL: kiln did not stop cleanly"; exit 1; }
      server=""
      return
    fi
    kill -0 $server 2>/dev/null || { cat "$work/serve.log"; echo "FAIL: kiln serve exited"; exit 1; }
    sleep 0.1
  done
  cat "$work/serve.log"
  echo "FAIL: healthcheck never passed"
  exit 1
}
serve serve
echo "ok   built-in model served (gRPC and HTTP) from a read-only root as uid 10001; healthcheck passed; clean stop on SIGTERM"
mkdir -p "$work/models/risk"
cp -r models/risk/. "$work/models/risk/"
mount --bind -o ro "$work/models" "$work/root/models"
serve serve --repo /models
echo "ok   repository mounted at /models served"
