"""Independent re-implementation of dstack's app key derivation (DESIGN.md section 6) used to cross-check
crates/keys: HKDF-SHA256 written out with hmac/hashlib, P-256 and PKCS#8 from pyca/cryptography (OpenSSL),
X25519 from pyca/cryptography, secp256k1 + Keccak-256 from eth_keys/eth_utils (installed with dstack-sdk;
Keccak needs `eth-hash[pycryptodome]`). Prints `name hex` lines; the first reproduces dstack's own
kdf.rs vector. Run by tests/sdk_interop.rs; its outputs are also pinned in src/app_keys/tests.rs.
"""
import hashlib, hmac
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from eth_keys import keys
from eth_utils import keccak

def hkdf(ikm, info, n=32, salt=b"RATLS"):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest(); out += t; i += 1
    return out[:n]

def derive_dh_secret(root_priv, ctx):
    root_bytes = root_priv.private_numbers().private_value.to_bytes(32, "big")
    child = ec.derive_private_key(int.from_bytes(hkdf(root_bytes, b"".join(ctx)), "big"), ec.SECP256R1())
    der = child.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return hashlib.sha256(der).digest()

root_der = bytes.fromhex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420f57527cea4ab7ffb49af99b158cdc0e3ec06398f528349ea236b7d2afe19cec1a1440342000491f50522407ce29dce3ed7d31a15d80c1c42f13a23552d2b33a0ce09ee11e47bce95936f3e7f80d195f879e28e1b144ef37ac9ab8e36a690cbf930b775897b27")
root = serialization.load_der_private_key(root_der, None)
print("dstack_vector", derive_dh_secret(root, [b"context one", b"context two"]).hex())
root_k256 = hashlib.sha256(b"root-k256").digest()
app_id = bytes(range(20)); inst = bytes([0xee]*20)
print("disk", derive_dh_secret(root, [app_id, inst, b"app-disk-crypt-key"]).hex())
print("disk_noinst", derive_dh_secret(root, [app_id, b"", b"app-disk-crypt-key"]).hex())
env = derive_dh_secret(root, [app_id, b"env-encrypt-key"])
print("env", env.hex())
print("env_pub", x25519.X25519PrivateKey.from_private_bytes(env).public_key().public_bytes_raw().hex())
k = hkdf(root_k256, app_id + b"app-key")
print("k256", k.hex())
app_pub = keys.PrivateKey(k).public_key.to_compressed_bytes()
print("k256_pub", app_pub.hex())
sig = keys.PrivateKey(root_k256).sign_msg_hash(keccak(b"dstack-kms-issued:" + app_id + app_pub))
print("k256_sig", sig.to_bytes().hex())
print("root_k256_pub", keys.PrivateKey(root_k256).public_key.to_compressed_bytes().hex())
# GetKey: path "wallet/eth", purpose "signing"
d = hkdf(k, b"wallet/eth")
print("getkey", d.hex())
dpub = keys.PrivateKey(d).public_key.to_compressed_bytes()
print("getkey_pub", dpub.hex())
print("getkey_sig", keys.PrivateKey(k).sign_msg_hash(keccak(("signing:" + dpub.hex()).encode())).to_bytes().hex())
from cryptography.hazmat.primitives.asymmetric import ed25519
print("ed_pub", ed25519.Ed25519PrivateKey.from_private_bytes(d).public_key().public_bytes_raw().hex())
ts = 1700000000
pub = bytes.fromhex(x25519.X25519PrivateKey.from_private_bytes(env).public_key().public_bytes_raw().hex())
print("env_sig", keys.PrivateKey(root_k256).sign_msg_hash(keccak(b"dstack-env-encrypt-pubkey:" + app_id + pub)).to_bytes().hex())
print("env_sig_v1", keys.PrivateKey(root_k256).sign_msg_hash(keccak(b"dstack-env-encrypt-pubkey:" + app_id + ts.to_bytes(8,"big") + pub)).to_bytes().hex())
ca = ec.derive_private_key(int.from_bytes(hkdf(root.private_numbers().private_value.to_bytes(32,"big"), app_id + b"app-ca"), "big"), ec.SECP256R1())
print("app_ca_scalar", ca.private_numbers().private_value.to_bytes(32,"big").hex())
# Non-KMS providers (dstack-util gen_app_keys_from_seed): seed -> app CA key, disk key, k256 key.
seed = bytes([0x5a] * 32)
seed_ca = ec.derive_private_key(int.from_bytes(hkdf(seed, b"app-key"), "big"), ec.SECP256R1())
print("seed_app_ca_scalar", seed_ca.private_numbers().private_value.to_bytes(32, "big").hex())
seed_disk = ec.derive_private_key(int.from_bytes(hkdf(seed, b"app-disk-key"), "big"), ec.SECP256R1())
print("seed_disk", hashlib.sha256(seed_disk.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())).hexdigest())
print("seed_k256", hkdf(seed, b"app-k256-key").hex())
