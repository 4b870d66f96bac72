// Drives the agent with the unmodified npm @phala/dstack-sdk (env DSTACK_SIMULATOR_ENDPOINT / TAPPD_SIMULATOR_ENDPOINT).
// Independent checks use node:crypto and @noble; prints one JSON object with quotes for the Rust side.
const crypto = require('node:crypto');
const fs = require('node:fs');
const assert = require('node:assert/strict');
const { DstackClient, TappdClient } = require('@phala/dstack-sdk');
const { secp256k1 } = require('@noble/curves/secp256k1');
const { keccak_256 } = require('@noble/hashes/sha3');
const { ed25519 } = require('@noble/curves/ed25519');

const info = JSON.parse(process.env.SIM_INFO);
const appId = Buffer.from(info.app_id, 'hex');
const hex = (b) => Buffer.from(b).toString('hex');

function recover(digest, sig) {
  assert.equal(sig.length, 65);
  return hex(secp256k1.Signature.fromCompact(sig.slice(0, 64)).addRecoveryBit(sig[64]).recoverPublicKey(digest).toRawBytes(true));
}
function checkChain(purpose, pubkey, chain) {
  const appPk = recover(keccak_256(Buffer.from(`${purpose}:${hex(pubkey)}`)), chain[0]);
  assert.equal(appPk, info.app_k256_pubkey, 'chain[0] does not recover to the app key');
  const kmsPk = recover(keccak_256(Buffer.concat([Buffer.from('dstack-kms-issued:'), appId, Buffer.from(appPk, 'hex')])), chain[1]);
  assert.equal(kmsPk, info.kms_k256_pubkey, 'chain[1] does not recover to the KMS key');
}
const sha384 = (b) => crypto.createHash('sha384').update(b).digest();

(async () => {
  const client = new DstackClient();
  const out = { quotes: [] };
  assert.ok((await client.version()).version);

  const k1 = await client.getKey('wallet/eth', 'ethereum');
  const k1b = await client.getKey('wallet/eth', 'ethereum');
  assert.equal(hex(k1.key), hex(k1b.key));
  checkChain('ethereum', secp256k1.getPublicKey(k1.key, true), k1.signature_chain);
  const ke = await client.getKey('wallet/sol', 'solana', 'ed25519');
  checkChain('solana', ed25519.getPublicKey(ke.key), ke.signature_chain);

  const rd = Buffer.from('node-sdk-report-data');
  const q = await client.getQuote(rd);
  out.quotes.push({ quote: q.quote, event_log: q.event_log, expected_report_data: hex(Buffer.concat([rd, Buffer.alloc(64 - rd.length)])) });
  out.replayed_rtmr3 = q.replayRtmrs()[3];

  const i = await client.info();
  assert.equal(i.app_id, info.app_id);
  assert.equal(i.tcb_info.compose_hash, info.compose_hash);
  let mr = Buffer.alloc(48);
  for (const e of i.tcb_info.event_log.filter((e) => e.imr === 3)) mr = sha384(Buffer.concat([mr, Buffer.from(e.digest, 'hex')]));
  assert.equal(hex(mr), i.tcb_info.rtmr3, 'RTMR3 does not replay');

  const t = Buffer.alloc(4); t.writeUInt32LE(0x08000001);
  const digest = sha384(Buffer.concat([t, Buffer.from(':node-sdk-event:'), Buffer.from('hi')]));
  const expected = hex(sha384(Buffer.concat([Buffer.from(i.tcb_info.rtmr3, 'hex'), digest])));
  await client.emitEvent('node-sdk-event', 'hi');
  assert.equal((await client.info()).tcb_info.rtmr3, expected, 'RTMR3 not as predicted');

  const tls = await client.getTlsKey({ subject: 'node.example', altNames: ['node.example'], usageRaTls: true });
  const certs = tls.certificate_chain.map((c) => new crypto.X509Certificate(c));
  const root = new crypto.X509Certificate(fs.readFileSync(info.kms_root_ca));
  assert.equal(certs.length, 3);
  assert.ok(certs[2].raw.equals(root.raw));
  assert.ok(certs[0].verify(certs[1].publicKey) && certs[0].checkIssued(certs[1]));
  assert.ok(certs[1].verify(root.publicKey) && certs[1].checkIssued(root));
  const leafKey = crypto.createPrivateKey(tls.key);
  assert.ok(crypto.createPublicKey(leafKey).export({ format: 'der', type: 'spki' }).equals(certs[0].publicKey.export({ format: 'der', type: 'spki' })));

  const msg = Buffer.from('sign me');
  for (const [alg, data] of [['ed25519', msg], ['secp256k1', msg], ['secp256k1_prehashed', crypto.createHash('sha256').update(msg).digest()]]) {
    const s = await client.sign(alg, data);
    assert.ok((await client.verify(alg, data, s.signature, s.public_key)).valid);
    assert.ok(!(await client.verify(alg, Buffer.concat([Buffer.from('X'), data.subarray(1)]), s.signature, s.public_key)).valid);
    checkChain('signing', s.public_key, s.signature_chain.slice(1));
    if (alg === 'ed25519') assert.ok(ed25519.verify(s.signature, data, s.public_key));
    else {
      const h = alg === 'secp256k1' ? crypto.createHash('sha256').update(data).digest() : data;
      assert.ok(secp256k1.verify(s.signature, h, s.public_key));
    }
  }

  const tappd = new TappdClient();
  const tq = await tappd.tdxQuote('tappd-data', 'sha256');
  const exp = crypto.createHash('sha256').update('app-data:tappd-data').digest();
  out.quotes.push({ quote: tq.quote, event_log: tq.event_log, expected_report_data: hex(Buffer.concat([exp, Buffer.alloc(32)])) });
  const ard = Buffer.from('node-sdk-attest');
  const att = Buffer.from((await client.attest(ard)).attestation, 'hex');
  assert.equal(att[0], 0, 'not VersionedAttestation::V0');
  assert.equal(att[1], 0, 'not AttestationQuote::DstackTdx');
  out.attestations = [{ attestation: hex(att), expected_report_data: hex(Buffer.concat([ard, Buffer.alloc(64 - ard.length)])) }];
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
