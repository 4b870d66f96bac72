#!/usr/bin/env bash
# Smoke test for the TDX backend on a real Intel TDX host (see host-vmm/docs/tdx-host.md).
#
# Boots the image in a TD through a running dstack-vmm (`[cvm] backend = "tdx"`), fetches a quote from the
# guest agent with fresh report data, and compares it with the image's published measurements.json.
#
# Environment:
#   IMAGE_DIR    image directory from `dstack-image-build build` (ovmf.fd, bzImage, initramfs.cpio.gz,
#                measurements.json, ...); its basename is the image name the VMM knows it by (IMAGE_NAME)
#   VMM_SOCK     dstack-vmm's pRPC unix socket
#   VCPUS        vCPUs (default 1); MEMORY_MB (default 2048) - a shape listed in measurements.json
#   HOST_PORT    host port relayed to the guest agent (default 18090)
#   RELAY_IMAGE  container image with socat (default alpine/socat:1.8.0.1), pulled by the guest
#   QGS_SOCKET   default /var/run/tdx-qgs/qgs.socket
#   COLLATERAL   optional dcap-qvl collateral JSON for this platform, to verify the quote's signature chain
#   DSTACK_MEASURE  dstack-measure binary (default: from PATH)
#   KEEP_VM=1    leave the VM running afterwards
set -euo pipefail

: "${IMAGE_DIR:?set IMAGE_DIR to the image directory}"
: "${VMM_SOCK:?set VMM_SOCK to the dstack-vmm pRPC socket}"
VCPUS=${VCPUS:-1}
MEMORY_MB=${MEMORY_MB:-2048}
HOST_PORT=${HOST_PORT:-18090}
RELAY_IMAGE=${RELAY_IMAGE:-alpine/socat:1.8.0.1}
QGS_SOCKET=${QGS_SOCKET:-/var/run/tdx-qgs/qgs.socket}
IMAGE_NAME=${IMAGE_NAME:-$(basename "$IMAGE_DIR")}
MEASURE=${DSTACK_MEASURE:-dstack-measure}
WORK=$(mktemp -d)
VM_ID=""

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

vmm() { # vmm <Method> <json body>
    curl -sS --fail-with-body --unix-socket "$VMM_SOCK" -H 'Content-Type: application/json' \
        -d "$2" "http://localhost/prpc/$1?json"
}

cleanup() {
    if [[ -n "$VM_ID" && "${KEEP_VM:-0}" != 1 ]]; then
        vmm RemoveVm "{\"id\":\"$VM_ID\"}" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

say "1. host checks"
[[ "$(cat /sys/module/kvm_intel/parameters/tdx 2>/dev/null)" == Y ]] ||
    fail "kvm_intel is not loaded with tdx=1 (or the kernel lacks CONFIG_KVM_INTEL_TDX)"
kver=$(uname -r)
IFS=. read -r kmaj kmin _ <<<"$kver"
(( kmaj > 6 || (kmaj == 6 && kmin >= 16) )) || fail "kernel $kver < 6.16 has no upstream KVM TDX"
[[ -S "$QGS_SOCKET" ]] || fail "no QGS socket at $QGS_SOCKET (install/start Intel's tdx-qgs)"
dmesg 2>/dev/null | grep -i 'tdx' | tail -n 3 || true

say "2. prediction for ${VCPUS} vCPU / ${MEMORY_MB} MiB"
"$MEASURE" image "$IMAGE_DIR" --vcpus "$VCPUS" --memory "${MEMORY_MB}M" --json >"$WORK/predicted.json"
python3 - "$IMAGE_DIR/measurements.json" "$WORK/predicted.json" "$VCPUS" "$MEMORY_MB" <<'EOF'
import json, sys
published = json.load(open(sys.argv[1]))
predicted = json.load(open(sys.argv[2]))
vcpus, mem = int(sys.argv[3]), int(sys.argv[4])
shape = [s for s in published["shapes"] if s["vcpus"] == vcpus and s["memory_mb"] == mem]
if not shape:
    sys.exit(f"measurements.json has no shape {vcpus} vCPU / {mem} MiB")
flat = json.dumps(predicted)
for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
    if shape[0][reg] not in flat:
        sys.exit(f"{reg}: published {shape[0][reg]} is not what dstack-measure image predicts")
print("published measurements match the prediction")
EOF

say "3. boot the TD"
compose=$(python3 - "$RELAY_IMAGE" <<'EOF'
import json, sys
services = (
    "services:\n"
    "  relay:\n"
    f"    image: {sys.argv[1]}\n"
    "    command: TCP-LISTEN:8080,fork,reuseaddr UNIX-CONNECT:/var/run/dstack.sock\n"
    "    volumes: ['/var/run/dstack.sock:/var/run/dstack.sock']\n"
    "    ports: ['8080:8080']\n"
)
print(json.dumps({
    "manifest_version": 2, "name": "tdx-smoke", "runner": "docker-compose",
    "docker_compose_file": services, "kms_enabled": False, "gateway_enabled": False,
    "local_key_provider_enabled": True, "public_logs": True, "public_sysinfo": True,
    "allowed_envs": [], "no_instance_id": False, "secure_time": False,
}))
EOF
)
body=$(python3 -c 'import json,sys; print(json.dumps({"name":"tdx-smoke","image":sys.argv[1],"compose_file":sys.argv[2],"vcpu":int(sys.argv[3]),"memory":int(sys.argv[4]),"disk_size":4,"ports":[{"protocol":"tcp","host_address":"127.0.0.1","host_port":int(sys.argv[5]),"vm_port":8080}]}))' \
    "$IMAGE_NAME" "$compose" "$VCPUS" "$MEMORY_MB" "$HOST_PORT")
VM_ID=$(vmm CreateVm "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
say "VM $VM_ID created; waiting for the guest agent on 127.0.0.1:$HOST_PORT"
for _ in $(seq 1 180); do
    curl -s -o /dev/null "http://127.0.0.1:$HOST_PORT/Version" && break
    sleep 2
done
curl -sf -o /dev/null "http://127.0.0.1:$HOST_PORT/Version" || fail "guest agent not reachable after 6 minutes"

say "4. quote with fresh report data"
nonce=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
curl -sS --fail-with-body -H 'Content-Type: application/json' -d "{\"report_data\":\"$nonce\"}" \
    "http://127.0.0.1:$HOST_PORT/GetQuote" >"$WORK/attestation.json"
python3 -c 'import json,sys; open(sys.argv[2],"w").write(json.load(open(sys.argv[1]))["quote"])' \
    "$WORK/attestation.json" "$WORK/quote.hex"

say "5. compare"
"$MEASURE" quote --json "$WORK/quote.hex" >"$WORK/quote.json"
python3 - "$WORK/quote.json" "$nonce" <<'EOF'
import json, sys
q = json.load(open(sys.argv[1]))
want = sys.argv[2] + "00" * 32
if q["report_data"] != want:
    sys.exit(f"report_data {q['report_data']} != {want}")
if q["td_attributes"] != "0000001000000000":
    sys.exit(f"td_attributes {q['td_attributes']}: expected SEPT_VE_DISABLE only")
print("quote carries our report data; production TD attributes")
EOF
"$MEASURE" diff "$IMAGE_DIR/measurements.json" "$WORK/attestation.json"
if [[ -n "${COLLATERAL:-}" ]]; then
    "$MEASURE" verify --collateral "$COLLATERAL" "$WORK/quote.hex"
else
    say "COLLATERAL unset: signature chain not verified (fetch collateral for this FMSPC from your PCCS)"
fi
say "PASS: the TD's MRTD and RTMR0-2 match the published measurements"
