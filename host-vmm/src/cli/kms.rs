//! Env encryption for `deploy`/`upgrade`: fetch the app's env-encryption public key from the KMS
//! (`KMS.GetAppEnvEncryptPubKey`), check the KMS's secp256k1 signature over it, encrypt with
//! [`dstack_keys::encrypt_env`].
//!
//! Signatures (as dstack's `vmm-cli.py` checks them): `signature_v1` =
//! `Keccak256("dstack-env-encrypt-pubkey" ‖ ":" ‖ app_id ‖ u64_be(timestamp) ‖ public_key)` is preferred,
//! the legacy `signature` (same without the timestamp) is the fallback; the signer is recovered from the
//! 65-byte recoverable signature. With `--kms-signer` the signer must be one of the given compressed
//! public keys (fail closed); without, the recovered signer is printed for the operator to check.
//!
//! Transport: like `vmm-cli.py`, the KMS's TLS certificate is not verified (its RA-TLS chain needs an
//! attestation verifier the CLI does not carry); the signature is what authenticates the key, so pin the
//! signer with `--kms-signer` for anything that matters.

use std::sync::Arc;

use dstack_keys::sig::{ENV_PUBKEY_PREFIX, compressed, message_digest, message_digest_with_timestamp, recover};
use dstack_rpc::Client;
use dstack_rpc::kms::{AppId, KmsClient, PublicKeyResponse};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::CliError;

/// Which signature authenticated the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureKind {
    /// `signature_v1`, with the KMS's timestamp (seconds).
    V1 {
        timestamp: u64,
    },
    Legacy,
}

/// The recovered signer (SEC1 compressed, lowercase hex without `0x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    pub public_key: String,
    pub kind: SignatureKind,
}

/// Recovers the signer of the env public key in `resp` for `app_id` (20 bytes).
pub fn recover_signer(resp: &PublicKeyResponse, app_id: &[u8]) -> Result<Signer, CliError> {
    if resp.public_key.len() != 32 {
        return Err(CliError::Kms(format!(
            "public_key is {} bytes, expected a 32-byte X25519 key",
            resp.public_key.len()
        )));
    }
    let mut v1_err = None;
    if !resp.signature_v1.is_empty() && resp.timestamp != 0 {
        let digest = message_digest_with_timestamp(ENV_PUBKEY_PREFIX, app_id, resp.timestamp, &resp.public_key);
        match recover(&digest, &resp.signature_v1) {
            Ok(k) => {
                return Ok(Signer {
                    public_key: hex::encode(compressed(&k)),
                    kind: SignatureKind::V1 {
                        timestamp: resp.timestamp,
                    },
                });
            }
            Err(e) => v1_err = Some(e.to_string()),
        }
    }
    if !resp.signature.is_empty() {
        let digest = message_digest(ENV_PUBKEY_PREFIX, app_id, &resp.public_key);
        let k = recover(&digest, &resp.signature).map_err(|e| CliError::Kms(format!("signature: {e}")))?;
        return Ok(Signer {
            public_key: hex::encode(compressed(&k)),
            kind: SignatureKind::Legacy,
        });
    }
    Err(CliError::Kms(match v1_err {
        Some(e) => format!("signature_v1: {e}"),
        None => "the KMS sent no signature over the env public key".into(),
    }))
}

/// Checks the signer against the pinned list (hex, `0x` optional, case-insensitive). Empty list: accepted.
pub fn check_signer(signer: &Signer, pinned: &[String]) -> Result<(), CliError> {
    if pinned.is_empty() {
        return Ok(());
    }
    let norm = |s: &str| s.trim().trim_start_matches("0x").to_lowercase();
    if pinned.iter().any(|p| norm(p) == signer.public_key) {
        Ok(())
    } else {
        Err(CliError::Kms(format!(
            "the env public key is signed by {}, which is not one of the --kms-signer keys",
            signer.public_key
        )))
    }
}

/// Accepts any server certificate while still checking the handshake signature (see the module docs).
#[derive(Debug)]
struct UnverifiedServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for UnverifiedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    dstack_ra_tls::handshake_signatures_from_provider!(0);
}

/// A TLS client configuration that does not verify the server (ring provider).
pub fn unverified_tls() -> Result<Arc<rustls::ClientConfig>, CliError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Kms(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(UnverifiedServer(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A KMS pRPC client for `url` (`http(s)://host:port[/prefix]`; no path means dstack's `/prpc`).
pub fn kms_client(url: &str) -> Result<KmsClient<Client>, CliError> {
    let mut client = Client::new(url).map_err(|e| CliError::Kms(format!("KMS URL: {e}")))?;
    let has_path = url
        .split_once("://")
        .map(|(_, rest)| rest.split_once('/').is_some_and(|(_, p)| !p.is_empty()))
        .unwrap_or(false);
    if !has_path {
        client = client.with_path_prefix("/prpc");
    }
    if url.starts_with("https://") {
        client = client.with_tls(unverified_tls()?);
    }
    Ok(KmsClient::new(client))
}

/// Fetches and authenticates the env public key of `app_id` (hex, 40 digits) from the KMS at `url`.
pub async fn fetch_env_pubkey(url: &str, app_id_hex: &str, pinned: &[String]) -> Result<([u8; 32], Signer), CliError> {
    let app_id = hex::decode(app_id_hex.trim_start_matches("0x"))
        .ok()
        .filter(|b| b.len() == 20)
        .ok_or_else(|| CliError::Input(format!("app id {app_id_hex:?} is not 20 bytes of hex")))?;
    let resp = kms_client(url)?
        .get_app_env_encrypt_pub_key(AppId { app_id: app_id.clone() })
        .await
        .map_err(|e| CliError::Kms(format!("GetAppEnvEncryptPubKey at {url}: {e}")))?;
    let signer = recover_signer(&resp, &app_id)?;
    check_signer(&signer, pinned)?;
    let mut key = [0u8; 32];
    key.copy_from_slice(&resp.public_key);
    Ok((key, signer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The legacy-signature example in dstack's `vmm-cli.py` (`verify_signature` doctest): public key
    /// `e33a18…e90a`, app id 20 zero bytes, signed by `0217610d…c38f`.
    #[test]
    fn dstack_legacy_signature_vector() {
        let resp = PublicKeyResponse {
            public_key: hex::decode("e33a1832c6562067ff8f844a61e51ad051f1180b66ec2551fb0251735f3ee90a").unwrap(),
            signature: hex::decode(
                "8542c49081fbf4e03f62034f13fbf70630bdf256a53032e38465a27c36fd6bed\
                 7a5e7111652004aef37f7fd92fbfc1285212c4ae6a6154203a48f5e16cad2cef00",
            )
            .unwrap(),
            ..Default::default()
        };
        let s = recover_signer(&resp, &[0; 20]).unwrap();
        assert_eq!(s.kind, SignatureKind::Legacy);
        assert_eq!(
            s.public_key,
            "0217610d74cbd39b6143842c6d8bc310d79da1d82cc9d17f8876376221eda0c38f"
        );
        check_signer(
            &s,
            &["0x0217610D74CBD39B6143842C6D8BC310D79DA1D82CC9D17F8876376221EDA0C38F".into()],
        )
        .unwrap();
        let e = check_signer(&s, &["02".repeat(33)]).unwrap_err().to_string();
        assert!(e.contains("not one of the --kms-signer"), "{e}");
        // A different app id recovers a different (wrong) signer, which pinning rejects.
        let other = recover_signer(&resp, &[1; 20]);
        assert!(other.is_err() || other.unwrap().public_key != s.public_key);
    }

    #[test]
    fn v1_preferred_and_missing_signatures_refused() {
        let key = dstack_keys::sig::k256_signing_key(&[7; 32]).unwrap();
        let pubkey = [9u8; 32];
        let app = [3u8; 20];
        let ts = 1_700_000_000;
        let resp = PublicKeyResponse {
            public_key: pubkey.to_vec(),
            signature: vec![0; 65],
            timestamp: ts,
            signature_v1: dstack_keys::sign_message_with_timestamp(&key, ENV_PUBKEY_PREFIX, &app, ts, &pubkey).to_vec(),
        };
        let s = recover_signer(&resp, &app).unwrap();
        assert_eq!(s.kind, SignatureKind::V1 { timestamp: ts });
        assert_eq!(s.public_key, hex::encode(compressed(key.verifying_key())));
        let none = PublicKeyResponse {
            public_key: pubkey.to_vec(),
            ..Default::default()
        };
        assert!(
            recover_signer(&none, &app)
                .unwrap_err()
                .to_string()
                .contains("no signature")
        );
        let short = PublicKeyResponse {
            public_key: vec![1; 31],
            ..resp
        };
        assert!(
            recover_signer(&short, &app)
                .unwrap_err()
                .to_string()
                .contains("31 bytes")
        );
    }
}
