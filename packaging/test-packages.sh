#!/usr/bin/env bash
# Package test (make test-packages, part of make test): build the .deb and the
# .rpm; check both list the same files; install the .deb into a clean Debian
# 12 root (debootstrap minbase, cached as a tarball outside git) with apt
# resolving its dependencies; run the installed binary as the installed user
# with the installed config and assets against mock-llm; upgrade over an
# edited config (kept); purge (config and state gone). Needs root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
: "${CARGO_TARGET_DIR:=$HOME/.cache/smartllm-target}"
export CARGO_TARGET_DIR
# One package test at a time: the packages it builds and the root seed are fixed paths.
mkdir -p "$CARGO_TARGET_DIR"
exec 9>"$CARGO_TARGET_DIR/.test-packages.lock"
flock 9
seed="$HOME/.cache/smartllm-debroot-bookworm.tar"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# The Kubernetes config maps' smartllm.yaml, with the shipped conf/, is a valid config.
cargo build --release --locked --workspace --bins >/dev/null 2>&1
for cm in configmap.yaml sidecar.yaml; do
    d=$(mktemp -d)
    cp conf/* "$d/"
    awk '/^  smartllm.yaml: \|/{f=1;next} f&&/^    /{print substr($0,5);next} f{f=0}' \
        "packaging/kubernetes/$cm" >"$d/smartllm.yaml"
    grep -q '^server:' "$d/smartllm.yaml" || fail "no smartllm.yaml in packaging/kubernetes/$cm"
    "$CARGO_TARGET_DIR/release/smartllm" check --config "$d" >/dev/null || fail "packaging/kubernetes/$cm: invalid smartllm.yaml"
    rm -rf "$d"
done
say "the Kubernetes config maps hold valid configs"

deb=$(packaging/build-package.sh deb | tail -1)
rpm=$(packaging/build-package.sh rpm | tail -1)
say "built $(basename "$deb") ($(du -h "$deb" | cut -f1)), $(basename "$rpm") ($(du -h "$rpm" | cut -f1))"

expected="/usr/bin/smartllm
/usr/lib/smartllm/libonnxruntime.so.1.31.1
/usr/share/smartllm/model.int8.onnx
/usr/share/smartllm/model.onnx
/usr/share/smartllm/paraphrase-l3.int8.onnx
/usr/share/smartllm/paraphrase-l3.onnx
/usr/share/smartllm/tokenizer.json
/usr/lib/systemd/system/smartllm.service
/etc/default/smartllm
/etc/smartllm/smartllm.yaml
/etc/smartllm/providers.yaml
/etc/smartllm/models.yaml
/etc/smartllm/routes.yaml
/etc/smartllm/cache.yaml
/etc/smartllm/keys.yaml
/etc/smartllm/tasks.tsv
/etc/smartllm/router-learned.json
/usr/share/doc/smartllm/README.md"
rpm_files=$(rpm -qlp "$rpm" 2>/dev/null)
deb_files=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
for f in $expected; do
    grep -qx "$f" <<<"$rpm_files" || fail "rpm lacks $f"
    grep -qx "$f" <<<"$deb_files" || fail "deb lacks $f"
done
rpm_conf=$(rpm -qp --configfiles "$rpm" 2>/dev/null)
for f in $(grep '^/etc/' <<<"$expected"); do
    grep -qx "$f" <<<"$rpm_conf" || fail "rpm: $f is not a config file"
done
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/smartllm/smartllm.yaml \
    || fail "deb: /etc/smartllm/smartllm.yaml is not a conffile"
rpm -qp --scripts "$rpm" 2>/dev/null | grep -q useradd || fail "rpm creates no user"
say "rpm -qlp and dpkg-deb -c list the binary, ONNX Runtime, assets, unit and config"

work=$(mktemp -d /tmp/smartllm-pkgtest.XXXXXX)
mock_pid=""
gw=""
cleanup() {
    [ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null || true
    if [ -n "$gw" ]; then
        kill "$gw" 2>/dev/null || true
        wait "$gw" 2>/dev/null || true
    fi
    umount "$work/root/proc" 2>/dev/null || umount -l "$work/root/proc" 2>/dev/null || true
    if mountpoint -q "$work/root/proc"; then
        echo "cleanup: $work/root/proc is still mounted; left $work in place" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
if [ ! -s "$seed" ]; then
    say "debootstrap --variant=minbase bookworm (cached in $seed)"
    debootstrap --variant=minbase bookworm "$work/seed" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
    tar -C "$work/seed" -cf "$seed.tmp" . && mv "$seed.tmp" "$seed"
    rm -rf "$work/seed"
fi
mkdir "$work/root"
tar -C "$work/root" -xf "$seed"
cp /etc/resolv.conf "$work/root/etc/resolv.conf"
mount -t proc proc "$work/root/proc"
cp "$deb" "$work/root/tmp/smartllm.deb"
in_root() { chroot "$work/root" "$@"; }
in_root test ! -e /usr/bin/smartllm || fail "the root is not clean"
say "apt-get install ./smartllm.deb in a clean Debian 12 root"
in_root apt-get update -q >"$work/apt.log" 2>&1 || { tail "$work/apt.log"; fail "apt-get update"; }
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends /tmp/smartllm.deb \
    >>"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log"; fail "apt-get install"; }
in_root id smartllm >/dev/null || fail "no smartllm user"
[ "$(in_root stat -c %U:%a /var/lib/smartllm)" = "smartllm:750" ] || fail "/var/lib/smartllm owner/mode"
[ "$(in_root stat -c %U:%G:%a /etc/smartllm)" = "root:smartllm:750" ] || fail "/etc/smartllm owner/mode"
in_root /usr/bin/smartllm check --config /etc/smartllm >/dev/null || fail "smartllm check on the installed config"
# The installed unit, checked by the host's systemd (the minbase root has
# none): its commands point into the root, everything else is verbatim.
unit=$(in_root sh -c 'ls /lib/systemd/system/smartllm.service /usr/lib/systemd/system/smartllm.service 2>/dev/null | head -1')
[ -n "$unit" ] || fail "the package installed no systemd unit"
mkdir "$work/unit"
sed -e "s|/usr/bin/smartllm|$work/root/usr/bin/smartllm|g" -e "s|/bin/kill|$work/root/bin/kill|g" \
    "$work/root$unit" >"$work/unit/smartllm.service"
verify=$(systemd-analyze verify --man=no "$work/unit/smartllm.service" 2>&1) \
    || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify is not clean: $verify"
exposure=$(systemd-analyze security --offline=yes "$work/unit/smartllm.service" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for smartllm.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "systemd-analyze security gave no score"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "systemd exposure $exposure is above 2.0"
say "systemd-analyze verify is clean; systemd-analyze security exposure $exposure"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(port); admin=$(port); mockp=$(port)
"$CARGO_TARGET_DIR/release/mock-llm" --listen "127.0.0.1:$mockp" >/dev/null 2>&1 9>&- &
mock_pid=$!
conf="$work/root/etc/smartllm/smartllm.yaml"
sed -i -e "s|^  listen: .*|  listen: 127.0.0.1:$api|" -e "s|^  admin_listen: .*|  admin_listen: 127.0.0.1:$admin|" \
    -e "s|^  upstream: http://127.0.0.1:8000/v1|  upstream: http://127.0.0.1:$mockp/v1|" \
    -e "s|^  mode: off |  mode: auto|" "$conf"
grep -q "127.0.0.1:$mockp" "$conf" || fail "could not point demo.upstream at mock-llm"
grep -q '^  mode: auto ' "$conf" || fail "could not turn demo mode back on (the package ships demo.mode: off)"
say "smartllm serve as user smartllm, installed config and assets, against mock-llm"
chroot --userspec=smartllm:smartllm "$work/root" env -i HOME=/var/lib/smartllm \
    /usr/bin/smartllm serve --config /etc/smartllm >"$work/serve.log" 2>&1 9>&- &
gw=$!
ready=""
for _ in $(seq 1 120); do
    if curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$gw" 2>/dev/null || break
    sleep 0.25
done
[ -n "$ready" ] || { tail -30 "$work/serve.log"; fail "the installed gateway did not become ready"; }
curl -fs "http://127.0.0.1:$admin/readyz" | grep -q '"embedder"' || fail "/readyz lacks the embedder"
# No usable key ships: the public demo key of `make run` is refused.
demo=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer sk-smartllm-demo' -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "http://127.0.0.1:$api/v1/chat/completions")
[ "$demo" = 401 ] || fail "a fresh install answered $demo to the demo key, not 401"
say "a fresh install answers 401 to the demo key"
# An operator makes a key; the running service reloads keys.yaml and takes it.
key=$(in_root /usr/bin/smartllm keys create pkg-test --tenant pkg --app test --config /etc/smartllm 2>>"$work/keys.log") \
    || { cat "$work/keys.log"; fail "smartllm keys create"; }
case "$key" in sk-smartllm-*) ;; *) fail "keys create printed no key: $key" ;; esac
in_root grep -q "$key" /etc/smartllm/keys.yaml && fail "the key itself was written to keys.yaml"
[ "$(in_root stat -c %U:%G /etc/smartllm/keys.yaml)" = root:smartllm ] || fail "keys create changed keys.yaml's owner"
status=""
for _ in $(seq 1 60); do
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" -H 'content-type: application/json' \
        -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "http://127.0.0.1:$api/v1/chat/completions")
    [ "$status" = 200 ] && break
    sleep 0.25
done
[ "$status" = 200 ] || { tail -30 "$work/serve.log"; fail "the key made by keys create got $status"; }
say "smartllm keys create: the key works once the service reloads, only its hash is stored"
answer=$(curl -fs -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello from the package test"}]}' \
    "http://127.0.0.1:$api/v1/chat/completions") || { tail -30 "$work/serve.log"; fail "chat request"; }
grep -q '"Mock reply to:' <<<"$answer" || fail "unexpected answer: $answer"
again=$(curl -fsi -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello from the package test"}]}' \
    "http://127.0.0.1:$api/v1/chat/completions")
grep -qi '^x-smartllm-cache: hit' <<<"$again" || fail "second request not a cache hit"
kill -TERM "$gw"
wait "$gw" || fail "smartllm exited non-zero on SIGTERM"
gw=""
[ -n "$(ls -A "$work/root/var/lib/smartllm/db" 2>/dev/null)" ] || fail "no RocksDB in /var/lib/smartllm"
say "served a chat (and a cache hit) and stopped cleanly on SIGTERM"

echo "# edited by the package test" >>"$conf"
DEBIAN_FRONTEND=noninteractive in_root dpkg -i --force-confold /tmp/smartllm.deb >>"$work/apt.log" 2>&1 \
    || fail "reinstall (upgrade path)"
grep -q "edited by the package test" "$conf" || fail "the upgrade replaced an edited conffile"
say "upgrade kept the edited /etc/smartllm/smartllm.yaml"
in_root dpkg --purge smartllm >>"$work/apt.log" 2>&1 || fail "purge"
for p in /usr/bin/smartllm /etc/smartllm /var/lib/smartllm /usr/share/smartllm /usr/lib/smartllm; do
    in_root test ! -e "$p" || fail "purge left $p"
done
say "purge removed binary, assets, config and state"
say "package tests passed"
