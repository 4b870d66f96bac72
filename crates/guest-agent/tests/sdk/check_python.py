"""Drives the agent with the unmodified PyPI dstack-sdk (env DSTACK_SIMULATOR_ENDPOINT / TAPPD_SIMULATOR_ENDPOINT).

Checks what can be checked with independent Python crypto (eth_keys, cryptography, hashlib) and prints one JSON
object with the quotes for the Rust side to parse with `measurements`. Any failed check raises.
"""
import hashlib
import json
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from dstack_sdk import DstackClient, TappdClient
from dstack_sdk.dstack_client import replay_rtmr
from eth_hash.auto import keccak
from eth_keys import keys

info = json.loads(os.environ["SIM_INFO"])
app_id = bytes.fromhex(info["app_id"])
out = {"quotes": []}


def recover(digest: bytes, sig: bytes) -> bytes:
    assert len(sig) == 65, len(sig)
    return keys.Signature(sig).recover_public_key_from_msg_hash(digest).to_compressed_bytes()


def check_chain(purpose: str, pubkey: bytes, chain: list) -> None:
    app_pk = recover(keccak(f"{purpose}:{pubkey.hex()}".encode()), chain[0])
    assert app_pk.hex() == info["app_k256_pubkey"], "chain[0] does not recover to the app key"
    kms_pk = recover(keccak(b"dstack-kms-issued:" + app_id + app_pk), chain[1])
    assert kms_pk.hex() == info["kms_k256_pubkey"], "chain[1] does not recover to the KMS key"


client = DstackClient()
tappd = TappdClient()

# Version
v = client.version()
assert v.version, v

# GetKey (secp256k1 and ed25519), deterministic per path, distinct across paths.
k1 = client.get_key("wallet/eth", "ethereum")
k1b = client.get_key("wallet/eth", "ethereum")
k2 = client.get_key("wallet/other", "ethereum")
assert k1.decode_key() == k1b.decode_key() and k1.decode_key() != k2.decode_key()
assert len(k1.decode_key()) == 32
pub = keys.PrivateKey(k1.decode_key()).public_key.to_compressed_bytes()
check_chain("ethereum", pub, k1.decode_signature_chain())
ke = client.get_key("wallet/sol", "solana", "ed25519")
edpub = ed25519.Ed25519PrivateKey.from_private_bytes(ke.decode_key()).public_key().public_bytes_raw()
check_chain("solana", edpub, ke.decode_signature_chain())
assert keys.PrivateKey(k1.decode_key()).public_key.to_compressed_bytes().hex() != info["app_k256_pubkey"]

# GetQuote
rd = b"python-sdk-report-data"
q = client.get_quote(rd)
assert bytes.fromhex(q.report_data)[: len(rd)] == rd
out["quotes"].append({"quote": q.quote, "event_log": q.event_log, "expected_report_data": rd.ljust(64, b"\0").hex()})
rtmrs = q.replay_rtmrs()
out["replayed_rtmr3"] = rtmrs[3]
try:
    client.get_quote(b"x" * 65)
    raise AssertionError("65-byte report data accepted")
except ValueError:
    pass

# Info: tcb_info parses, RTMR3 replays from its event log.
i = client.info()
assert i.app_id == info["app_id"] and i.instance_id == info["instance_id"]
assert i.compose_hash == info["compose_hash"] and i.tcb_info.compose_hash == info["compose_hash"]
rtmr3_events = [e.digest for e in i.tcb_info.event_log if e.imr == 3]
assert replay_rtmr(rtmr3_events) == i.tcb_info.rtmr3, "RTMR3 does not replay"
names = [e.event for e in i.tcb_info.event_log if e.imr == 3]
assert names[:2] == ["system-preparing", "app-id"], names
assert hashlib.sha256(i.tcb_info.app_compose.encode()).hexdigest() == info["compose_hash"]

# EmitEvent: RTMR3 ← sha384(RTMR3 ‖ sha384(le32(0x08000001) ‖ ":" ‖ name ‖ ":" ‖ payload))
before = bytes.fromhex(i.tcb_info.rtmr3)
client.emit_event("python-sdk-event", b"hello")
digest = hashlib.sha384((0x08000001).to_bytes(4, "little") + b":python-sdk-event:hello").digest()
expected = hashlib.sha384(before + digest).hexdigest()
after = client.info().tcb_info.rtmr3
assert after == expected, f"RTMR3 {after} != predicted {expected}"

# GetTlsKey: chain verifies to the KMS root (leaf → app CA → root), key matches the leaf.
t = client.get_tls_key(subject="app.example", alt_names=["app.example", "127.0.0.1"], usage_ra_tls=True)
certs = [x509.load_pem_x509_certificate(c.encode()) for c in t.certificate_chain]
root = x509.load_pem_x509_certificate(open(info["kms_root_ca"], "rb").read())
assert len(certs) == 3 and certs[-1] == root
certs[0].verify_directly_issued_by(certs[1])
certs[1].verify_directly_issued_by(root)
from cryptography.hazmat.primitives.serialization import load_pem_private_key, Encoding, PublicFormat
leaf_key = load_pem_private_key(t.key.encode(), None)
spki = leaf_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
assert spki == certs[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
ext = certs[0].extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.1"))
quote = ext.value.value[2:] if ext.value.value[0] == 0x04 else ext.value.value
log_ext = certs[0].extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.2"))
out["ra_tls"] = {"cert_der": certs[0].public_bytes(Encoding.DER).hex(),
                 "expected_report_data": hashlib.sha512(b"ratls-cert:" + spki).hexdigest()}
try:
    client.get_tls_key(subject="x", not_before=2000, not_after=1000)
    raise AssertionError("not_before >= not_after accepted")
except Exception as e:  # noqa: BLE001
    assert "400" in str(e), e

# Sign / Verify
msg = b"sign me"
for alg, data in [("ed25519", msg), ("secp256k1", msg), ("secp256k1_prehashed", hashlib.sha256(msg).digest())]:
    s = client.sign(alg, data)
    assert client.verify(alg, data, s.decode_signature(), s.decode_public_key()).valid
    assert not client.verify(alg, (b"X" + data)[: len(data)], s.decode_signature(), s.decode_public_key()).valid
    chain = s.decode_signature_chain()
    assert chain[0] == s.decode_signature()
    check_chain("signing", s.decode_public_key(), chain[1:])
    sig = s.decode_signature()
    if alg == "ed25519":
        ed25519.Ed25519PublicKey.from_public_bytes(s.decode_public_key()).verify(sig, data)
    else:
        pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), s.decode_public_key())
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
        algo = ec.ECDSA(Prehashed(hashes.SHA256())) if alg == "secp256k1_prehashed" else ec.ECDSA(hashes.SHA256())
        pk.verify(der, data, algo)

# Legacy Tappd: TdxQuote with sha256 → report_data = sha256("app-data:" ‖ data), zero-padded.
tq = tappd.tdx_quote("tappd-data", "sha256")
out["quotes"].append({"quote": tq.quote, "event_log": tq.event_log,
                      "expected_report_data": hashlib.sha256(b"app-data:tappd-data").digest().ljust(64, b"\0").hex()})
tk = tappd.derive_key("/tls", "tappd.example")
assert "BEGIN PRIVATE KEY" in tk.key and len(tk.certificate_chain) == 3
ti = tappd.info()
assert ti.app_id == info["app_id"]

# Attest: dstack's VersionedAttestation::V0 in SCALE, decoded here independently of the Rust codec.
def scale_compact(b, i):
    mode = b[i] & 3
    if mode == 0:
        return b[i] >> 2, i + 1
    if mode == 1:
        return int.from_bytes(b[i:i + 2], "little") >> 2, i + 2
    if mode == 2:
        return int.from_bytes(b[i:i + 4], "little") >> 2, i + 4
    n = (b[i] >> 2) + 4
    return int.from_bytes(b[i + 1:i + 1 + n], "little"), i + 1 + n


def scale_bytes(b, i):
    n, i = scale_compact(b, i)
    assert i + n <= len(b)
    return b[i:i + n], i + n


ard = b"python-sdk-attest"
att = client.attest(ard).decode_attestation()
assert att[0] == 0 and att[1] == 0, "not V0 / DstackTdx"
aquote, pos = scale_bytes(att, 2)
n, pos = scale_compact(att, pos)
for _ in range(n):  # TdxEvent: imr u32, event_type u32, digest, event, event_payload
    pos += 8
    for _f in range(3):
        _, pos = scale_bytes(att, pos)
n, pos = scale_compact(att, pos)
runtime = []
for _ in range(n):
    name, pos = scale_bytes(att, pos)
    payload, pos = scale_bytes(att, pos)
    runtime.append((name, payload))
areport = att[pos:pos + 64]
pos += 64
config, pos = scale_bytes(att, pos)
assert pos == len(att), "trailing bytes"
assert areport == ard.ljust(64, b"\0")
# TDX v4 quote: 48-byte header, then the TD report: RTMR3 at 472, report_data at 520.
assert aquote[568:632] == areport
mr = bytes(48)
for name, payload in runtime:
    mr = hashlib.sha384(mr + hashlib.sha384((0x08000001).to_bytes(4, "little") + b":" + name + b":" + payload).digest()).digest()
assert mr == aquote[520:568], "runtime events do not replay to the quoted RTMR3"
assert (b"python-sdk-event", b"hello") in runtime
assert config.decode() == client.info().vm_config
out["attestations"] = [{"attestation": att.hex(), "expected_report_data": areport.hex()}]

print(json.dumps(out))
