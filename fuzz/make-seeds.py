#!/usr/bin/env python3
"""Writes the committed seed inputs of the cargo-fuzz targets that have no natural fixture files
(fuzz/seeds/<target>/). Independent of the Rust code: the bytes are built from the formats' specs with Python's
standard library (ssl for a real ClientHello), `cryptography` (env blob) and `cryptsetup` (LUKS header); a seed
whose tool is missing is skipped with a message. Run from anywhere: python3 fuzz/make-seeds.py
"""
import json
import os
import shutil
import ssl
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEEDS = os.path.join(HERE, "seeds")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def copy_fixture(target, name, path):
    with open(os.path.join(ROOT, path), "rb") as f:
        put(target, name, f.read())


# --- app-compose / sys-config: the committed simulator fixtures of crates/types ---
copy_fixture("app_compose", "simulator", "crates/types/tests/fixtures/simulator-app-compose.json")
put("app_compose", "bash-runner", json.dumps({
    "manifest_version": 2, "name": "b", "runner": "bash", "init_script": ["echo hi"],
    "allowed_envs": ["A", "B_1"], "port_policy": {"ports": [{"port": 443, "pp": True}], "restrict_mode": True},
    "key_provider": "kms", "key_provider_id": "00ff", "event_log_version": 2, "swap_size": "1G",
}, separators=(",", ":")))
copy_fixture("sys_config", "sys-config", "crates/types/tests/fixtures/simulator-sys-config.json")
copy_fixture("sys_config", "appkeys", "crates/types/tests/fixtures/simulator-appkeys.json")
put("sys_config", "instance-info", json.dumps({"instance_id_seed": "11" * 20, "instance_id": "", "app_id": "22" * 20}))

# --- pRPC: [type index][encoding 0=protobuf 1=json 2=query][body]; indexes follow fuzz_targets/prpc.rs ---
REGISTER_CVM, GET_APP_KEY, SIGN_CERT, VM_CONFIGURATION, SIM_GET_QUOTE_RESPONSE = 9, 14, 17, 26, 38


def pb_varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def pb_field(num, wire, payload):
    key = pb_varint(num << 3 | wire)
    if wire == 0:
        return key + pb_varint(payload)
    return key + pb_varint(len(payload)) + payload


put("prpc", "register-json", bytes([REGISTER_CVM, 1]) + json.dumps(
    {"client_public_key": "x" * 44, "port_policy": {"ports": [{"port": 443, "pp": True}], "restrict_mode": True}}).encode())
put("prpc", "register-pb", bytes([REGISTER_CVM, 0]) + pb_field(1, 2, b"k" * 44)
    + pb_field(2, 2, pb_field(1, 2, pb_field(1, 0, 443) + pb_field(2, 0, 1)) + pb_field(2, 0, 1)))
put("prpc", "appkey-query", bytes([GET_APP_KEY, 2]) + b"api_version=1&vm_config=%7B%22cpu_count%22%3A1%7D")
put("prpc", "signcert-json", bytes([SIGN_CERT, 1]) + json.dumps(
    {"api_version": 1, "csr": "30" * 8, "signature": "0x" + "AB" * 65, "vm_config": "{}"}).encode())
put("prpc", "vmconfig-json", bytes([VM_CONFIGURATION, 1]) + json.dumps(
    {"name": "a", "image": "img", "compose_file": "{}", "vcpu": 1, "memory": 1024, "disk_size": 2,
     "ports": [{"protocol": "tcp", "host_port": 8080, "vm_port": 80}]}).encode())
put("prpc", "simquote-pb", bytes([SIM_GET_QUOTE_RESPONSE, 0]) + pb_field(1, 2, b"\x04\x00" + b"\x00" * 62))

# --- ClientHello: a real one from Python's TLS stack, with SNI and ALPN ---
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2", "http/1.1"])
for i, sni in enumerate(["app1-8080s.apps.test", "0123456789abcdef0123456789abcdef01234567-443g.apps.test"]):
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(inc, out, server_hostname=sni)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    put("client_hello", f"hello-{i}", out.read())

# --- gateway headers: [pick even = PROXY protocol, odd = DNS TXT answer] ---
put("gateway_headers", "pp-v1", b"\x00PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n")
v2_addr = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack(">HH", 51234, 443)
put("gateway_headers", "pp-v2", b"\x00" + b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(v2_addr)) + v2_addr)
qname = b"".join(bytes([len(l)]) + l for l in b"_dstack-app-address.shop.example.org".split(b".")) + b"\x00"
txt = b"app3:8443"
answer = b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 60, len(txt) + 1) + bytes([len(txt)]) + txt
put("gateway_headers", "dns-txt", b"\x01" + struct.pack(">HHHHHH", 0x1234, 0x8180, 1, 1, 0, 0)
    + qname + struct.pack(">HH", 16, 1) + answer)

# --- env blob: [pick odd = plaintext document, even = raw blob for secret [0x42; 32]] ---
doc = json.dumps({"env": [{"key": "API_TOKEN", "value": "a b"}, {"key": "MODE", "value": "x\ny"},
                          {"key": "NOT_ALLOWED", "value": "1"}]}).encode()
put("env_blob", "document", b"\x01" + doc)
try:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw
    app_pub = X25519PrivateKey.from_private_bytes(b"\x42" * 32).public_key()
    eph = X25519PrivateKey.from_private_bytes(b"\x07" * 32)
    shared = eph.exchange(app_pub)
    iv = b"\x09" * 12
    blob = eph.public_key().public_bytes(raw, serialization.PublicFormat.Raw) + iv + AESGCM(shared).encrypt(iv, doc, None)
    put("env_blob", "blob", b"\x00" + blob)
except ImportError:
    print("env_blob: python3-cryptography missing; blob seed skipped", file=sys.stderr)

# --- LUKS: header and JSON metadata of a disk formatted the way guest-init formats one ---
if shutil.which("cryptsetup"):
    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "disk.img")
        with open(img, "wb") as f:
            f.truncate(20 << 20)
        subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
                        "--key-size", "512", "--offset", "32768", "--sector-size", "512", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", "--hash", "sha256", "--key-file", "-", img],
                       input=b"00" * 32, check=True)
        with open(img, "rb") as f:
            put("luks_header", "binary-header", b"\x00" + f.read(4096))
        meta = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", img], capture_output=True, check=True)
        put("luks_header", "metadata", b"\x01" + meta.stdout)
else:
    print("luks_header: cryptsetup missing; seeds skipped", file=sys.stderr)

# --- LUKS disk decision: [ctl][image head]; see fuzz_targets/common/luks_disk.rs ---
put("luks_disk", "blank", b"\x00")
if shutil.which("cryptsetup"):
    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "disk.img")
        with open(img, "wb") as f:
            f.truncate(20 << 20)
        subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
                        "--key-size", "512", "--offset", "32768", "--sector-size", "512", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", "--hash", "sha256", "--key-file", "-", img],
                       input=b"00" * 32, check=True)
        with open(img, "rb") as f:
            head = f.read(0x8000)  # primary header + JSON area, then the secondary header at 0x4000
        put("luks_disk", "formatted", b"\x00" + head)
        put("luks_disk", "primary-wiped", b"\x10" + head)
        put("luks_disk", "secondary-at-1m", b"\x07" + head[:0x4000])
else:
    print("luks_disk: cryptsetup missing; LUKS seeds skipped", file=sys.stderr)
if shutil.which("mkfs.ext4"):
    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "ext4.img")
        with open(img, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
        with open(img, "rb") as f:
            put("luks_disk", "ext4", b"\x00" + f.read(0x10000))
else:
    print("luks_disk: mkfs.ext4 missing; ext4 seed skipped", file=sys.stderr)

# --- virtio: [flags][queue headers: size, desc, avail, used (u16 LE each)][memory image from address 0] ---
def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


NEXT, WRITE = 1, 2


def queue_image(size, desc_at, avail_at, used_at, chains, data, mem):
    """Writes a split queue with `chains` (lists of descriptors, chained in order) into `mem`."""
    table, heads, i = b"", [], 0
    for chain in chains:
        heads.append(i)
        for j, (addr, length, flags) in enumerate(chain):
            last = j + 1 == len(chain)
            table += desc(addr, length, flags | (0 if last else NEXT), 0 if last else i + 1)
            i += 1
    mem[desc_at:desc_at + len(table)] = table
    avail = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    mem[avail_at:avail_at + len(avail)] = avail
    mem[used_at:used_at + 4] = b"\x00\x00\x00\x00"
    for addr, blob in data:
        mem[addr:addr + len(blob)] = blob
    return struct.pack("<HHHH", size, desc_at, avail_at, used_at)


def virtio_seed(flags, queues, mem_len=0x3000):
    mem = bytearray(mem_len)
    headers = b"".join(queue_image(*q, mem) for q in queues)
    return bytes([flags]) + headers + bytes(mem)


blk_hdr = lambda ty, sector: struct.pack("<IIQ", ty, 0, sector)
put("virtio_blk", "read-write-flush", virtio_seed(0, [(16, 0x0, 0x100, 0x200, [
    [(0x1000, 16, 0), (0x1400, 1024, WRITE), (0x1f00, 1, WRITE)],
    [(0x1010, 16, 0), (0x1800, 512, 0), (0x1f01, 1, WRITE)],
    [(0x1020, 16, 0), (0x1f02, 1, WRITE)],
    [(0x1030, 16, 0), (0x1c00, 20, WRITE), (0x1f03, 1, WRITE)],
], [(0x1000, blk_hdr(0, 2)), (0x1010, blk_hdr(1, 5)), (0x1020, blk_hdr(4, 0)), (0x1030, blk_hdr(8, 0))])]))
net_tx = b"\x00" * 12 + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + b"\x45" * 46
put("virtio_net", "tx-and-rx", virtio_seed(0x40, [
    (16, 0x0, 0x100, 0x200, [[(0x1000, 1526, WRITE)], [(0x1800, 8, WRITE), (0x1900, 2048, WRITE)]], []),
    (16, 0x300, 0x400, 0x500, [[(0x2000, 12, 0), (0x2010, len(net_tx) - 12, 0)]], [(0x2000, net_tx[:12]), (0x2010, net_tx[12:])]),
], mem_len=0x3000))
# vsock: a REQUEST from guest port 5000 to host port 1234 (the echo service), then RW data, on the TX queue.
def vsock_hdr(op, length=0, src_port=5000, dst_port=1234, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, buf_alloc, fwd_cnt)


put("virtio_vsock", "connect-and-send", virtio_seed(0, [
    (16, 0x0, 0x100, 0x200, [[(0x1000, 4096, WRITE)], [(0x2000, 4096, WRITE)]], []),
    (16, 0x300, 0x400, 0x500, [[(0x2f00, 44, 0)], [(0x2f40, 44, 0), (0x2f80, 5, 0)]],
     [(0x2f00, vsock_hdr(1)), (0x2f40, vsock_hdr(5, length=5)), (0x2f80, b"hello")]),
], mem_len=0x3000))
print("seeds written under", SEEDS)
