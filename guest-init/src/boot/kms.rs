//! Key provider `kms` (DESIGN.md §3 step 5, dstack-facts §4 "Key retrieval"): for each URL of
//! `sys-config.kms_urls` in order, the first that works:
//! 1. an unauthenticated TLS connection to `<url>/prpc` asks `GetTempCaCert` for the KMS root CA and the
//!    temporary client CA (as dstack: the root is trusted on first use unless app-compose pins it with
//!    `key_provider_id` = its SubjectPublicKeyInfo DER, which is checked here before anything else);
//! 2. a fresh P-256 key gets an RA-TLS client certificate: our quote with report data
//!    `SHA-512("ratls-cert:" ‖ SPKI)` and the event log so far, issued by the temporary CA (a dstack KMS
//!    requires that chain at the TLS layer);
//! 3. mutual TLS to the same URL, the server certificate verified by [`KmsServerVerifier`] (chains to that
//!    root, special usage `kms:rpc`, and — when configured — its own attestation);
//! 4. `GetAppKey{api_version: 1, vm_config}`.
//!
//! The same mTLS client backs [`KmsCertSigner`], the guest agent's `GetTlsKey` signer (KMS `SignCert`).
//!
//! Revocation: every verifier built on [`KmsRootChain`] (the KMS's and the gateway's) consults the
//! [`RevocationSet`] kept per KMS root ([`kms_revocations`]). After keys are released, the KMS's CRL
//! (`Revocation.GetCrl`) is fetched over the verified connection and then refreshed in the background
//! ([`CrlRefresher`]); a KMS that publishes none (dstack) leaves chains unchecked, a list that does not
//! verify is never installed, and once installed an expired list refuses every chain under that root.

use std::sync::Arc;
use std::time::Duration;

use dstack_guest_agent::AgentError;
use dstack_guest_agent::cert::{CertSigner, SignFuture};
use dstack_ra_tls::{
    AttestationPolicy, AttestationVerifier, CaCert, CertAttestation, CertRequest, CrlRefresher, RevocationSet,
    parse_cert,
};
use dstack_rpc::Client;
use dstack_rpc::kms::{GetAppKeyRequest, KmsClient, RevocationClient, SignCertRequest};
use dstack_tee::RuntimeEventLog;
use dstack_types::{AppKeys, KeyProvider};
use rcgen::{KeyPair, PublicKeyData};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, Error as TlsError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::runtime::Handle;

use super::keys::{KeyError, KeySource, KmsKeys};
use super::tee::TeeMeasurer;

/// The special usage a KMS RPC certificate carries.
pub const KMS_RPC_USAGE: &str = "kms:rpc";
const CSR_CONFIRM: &str = "please sign cert:";

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The chain half of a verifier for servers certified by the KMS (the KMS itself, gateways): the leaf must
/// chain to the pinned KMS root CA. The host name is not checked: endpoints are IP literals (no DNS in the
/// boot path) and the identity is the root plus what the caller checks in the leaf. rustls's webpki
/// verifier checks the name last, after the chain, so a name mismatch still means the chain verified.
/// Then the chain is checked against the root's revocation list ([`kms_revocations`]).
#[derive(Debug)]
pub(crate) struct KmsRootChain(Arc<WebPkiServerVerifier>, Arc<RevocationSet>);

/// Revocation state per KMS root CA (DER), shared by every verifier and refresher in this process.
static KMS_REVOCATIONS: std::sync::Mutex<Vec<(Vec<u8>, Arc<RevocationSet>)>> = std::sync::Mutex::new(Vec::new());

/// The revocation set for the KMS root `root` (created, with the root pinned, on first use).
pub fn kms_revocations(root: &[u8]) -> Result<Arc<RevocationSet>, String> {
    let mut all = KMS_REVOCATIONS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, set)) = all.iter().find(|(r, _)| r == root) {
        return Ok(Arc::clone(set));
    }
    let set = RevocationSet::new();
    set.add_issuer(root, false).map_err(|e| format!("KMS root CA: {e}"))?;
    all.push((root.to_vec(), Arc::clone(&set)));
    Ok(set)
}

/// KMS roots whose list a background refresher already keeps fresh.
static REFRESHING: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

impl KmsRootChain {
    pub(crate) fn new(root: CertificateDer<'static>, provider: &Arc<CryptoProvider>) -> Result<Self, String> {
        let revocations = kms_revocations(&root)?;
        let mut roots = RootCertStore::empty();
        roots.add(root).map_err(|e| format!("KMS root CA: {e}"))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .build()
            .map(|v| Self(v, revocations))
            .map_err(|e| format!("KMS root CA: {e}"))
    }

    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<(), TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let chain = std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(|c| c.as_ref()));
        self.1
            .check_chain(chain, now.as_secs())
            .map_err(|e| other_err(format!("KMS-issued certificate: {e}")))
    }
}

/// Verifies a KMS RPC server certificate: chain to the KMS root CA, usage `kms:rpc`, and (optional) the
/// certificate's attestation; the host name is not checked ([`KmsRootChain`]): the identity is the pinned
/// root plus the usage, as dstack's `validate_kms_rpc_cert`.
#[derive(Debug)]
pub struct KmsServerVerifier {
    chain: KmsRootChain,
    attestation: Option<Arc<AttestationVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl KmsServerVerifier {
    pub fn new(root: CertificateDer<'static>, attestation: Option<AttestationPolicy>) -> Result<Arc<Self>, String> {
        let provider = provider();
        Ok(Arc::new(Self {
            chain: KmsRootChain::new(root, &provider)?,
            attestation: attestation.map(|p| Arc::new(AttestationVerifier::new(p))),
            provider,
        }))
    }
}

pub(crate) fn other_err(msg: String) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::other(msg),
    ))))
}

impl ServerCertVerifier for KmsServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.chain.verify(end_entity, intermediates, server_name, ocsp, now)?;
        let parsed = parse_cert(end_entity).map_err(|e| other_err(format!("KMS certificate: {e}")))?;
        if parsed.special_usage.as_deref() != Some(KMS_RPC_USAGE) {
            return Err(other_err(format!(
                "KMS certificate usage is {:?}, expected {KMS_RPC_USAGE:?}",
                parsed.special_usage
            )));
        }
        if let Some(att) = &self.attestation {
            match att.verify_cert(end_entity, now.as_secs()) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(other_err("KMS certificate carries no attestation".into())),
                Err(e) => return Err(other_err(format!("KMS certificate attestation: {e}"))),
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    dstack_ra_tls::handshake_signatures_from_provider!(provider);
}

/// The first, unauthenticated connection (dstack's `tls_no_check`): only public data is fetched over it, and
/// what it returns is checked against the pin or through the second, verified connection.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }
    dstack_ra_tls::handshake_signatures_from_provider!(0);
}

/// `<url>/prpc` (dstack appends it unless present).
pub fn prpc_url(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/prpc") {
        u.to_owned()
    } else {
        format!("{u}/prpc")
    }
}

fn client(
    url: &str,
    verifier: Arc<dyn ServerCertVerifier>,
    auth: Option<(Vec<CertificateDer<'static>>, &KeyPair)>,
) -> Result<KmsClient<Client>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let cfg = match auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    let c = Client::new(&prpc_url(url))
        .map_err(|e| e.to_string())?
        .with_tls(Arc::new(cfg))
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(60));
    Ok(KmsClient::new(c))
}

/// A KMS endpoint after the first connection: its root CA and temporary client CA.
#[derive(Debug, Clone)]
pub struct KmsEndpoint {
    pub url: String,
    pub root_pem: String,
    pub root_der: CertificateDer<'static>,
    /// SubjectPublicKeyInfo DER of the root CA (the `key-provider` id).
    pub root_spki: Vec<u8>,
    pub tmp_ca_cert: String,
    pub tmp_ca_key: String,
}

/// How the guest talks to KMSs.
#[derive(Debug, Clone)]
pub struct KmsConnector {
    measurer: Arc<TeeMeasurer>,
    /// Verify the KMS certificate's own attestation too (off by default: the guest has no collateral).
    pub kms_attestation: Option<AttestationPolicy>,
}

impl KmsConnector {
    pub fn new(measurer: Arc<TeeMeasurer>, kms_attestation: Option<AttestationPolicy>) -> Self {
        Self {
            measurer,
            kms_attestation,
        }
    }

    fn log(&self) -> Result<Arc<RuntimeEventLog>, String> {
        self.measurer
            .event_log()
            .ok_or_else(|| "no runtime events measured yet".to_owned())
    }

    /// Step 1: root CA and temporary CA over an unauthenticated connection; the root checked against `pin`.
    pub async fn discover(&self, url: &str, pin: &[u8]) -> Result<KmsEndpoint, String> {
        let c = client(url, Arc::new(AnyServer(provider())), None)?;
        let r = c.get_temp_ca_cert().await.map_err(|e| format!("GetTempCaCert: {e}"))?;
        let root_der =
            CertificateDer::from_pem_slice(r.ca_cert.as_bytes()).map_err(|e| format!("GetTempCaCert ca_cert: {e}"))?;
        let root_spki = parse_cert(&root_der)
            .map_err(|e| format!("GetTempCaCert ca_cert: {e}"))?
            .spki_der;
        if !pin.is_empty() && pin != root_spki.as_slice() {
            return Err(format!(
                "KMS root CA key {} does not match app-compose key_provider_id {}",
                hex::encode(&root_spki),
                hex::encode(pin)
            ));
        }
        Ok(KmsEndpoint {
            url: url.to_owned(),
            root_pem: r.ca_cert,
            root_der,
            root_spki,
            tmp_ca_cert: r.temp_ca_cert,
            tmp_ca_key: r.temp_ca_key,
        })
    }

    /// Steps 2–3: a fresh RA-TLS client certificate and the verified mTLS client.
    pub async fn connect(&self, ep: &KmsEndpoint) -> Result<KmsClient<Client>, String> {
        let log = self.log()?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| format!("client key: {e}"))?;
        let rd = dstack_ra_tls::ra_tls_report_data(&key.subject_public_key_info());
        let quote = log.tee().quote(rd).await.map_err(|e| format!("quote: {e}"))?;
        let event_log = log.full_event_log().await.map_err(|e| format!("event log: {e}"))?;
        let req = CertRequest {
            subject: "dstack-guest".into(),
            usage_client_auth: true,
            attestation: Some(CertAttestation { quote, event_log }),
            ..Default::default()
        };
        let chain = if ep.tmp_ca_cert.is_empty() || ep.tmp_ca_key.is_empty() {
            vec![req.self_signed(&key).map_err(|e| e.to_string())?.der().clone()]
        } else {
            let ca = CaCert::from_pem(&ep.tmp_ca_cert, &ep.tmp_ca_key).map_err(|e| format!("temp CA: {e}"))?;
            let leaf = ca.issue(&req, &key).map_err(|e| format!("client certificate: {e}"))?;
            vec![leaf.der().clone(), ca.cert_der().clone()]
        };
        let verifier = KmsServerVerifier::new(ep.root_der.clone(), self.kms_attestation.clone())?;
        client(&ep.url, verifier, Some((chain, &key)))
    }

    /// Installs the KMS's current CRL for its root (over the verified connection `c`) and keeps it fresh in
    /// the background. Failures are logged: the chains stay unchecked until a list arrives.
    async fn load_crl(&self, ep: &KmsEndpoint, c: &KmsClient<Client>) {
        let set = match kms_revocations(&ep.root_der) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("KMS revocation list: {e}"),
        };
        let crl = RevocationClient::new(c.transport().clone());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match crl.get_crl().await {
            Ok(r) => match set.update_der_from(&ep.root_der, &r.crl, now) {
                Ok(list) => tracing::info!(crl_number = list.content().crl_number, "KMS revocation list installed"),
                Err(e) => tracing::warn!("KMS revocation list refused: {e}"),
            },
            Err(e) => return tracing::warn!("KMS {} publishes no revocation list: {e}", ep.url),
        }
        {
            let mut refreshing = REFRESHING.lock().unwrap_or_else(|p| p.into_inner());
            if refreshing.contains(&ep.root_der.to_vec()) {
                return;
            }
            refreshing.push(ep.root_der.to_vec());
        }
        let (url, root) = (ep.url.clone(), ep.root_der.clone());
        let source = move || {
            let (url, root) = (url.clone(), root.clone());
            async move {
                let verifier = KmsServerVerifier::new(root, None)?;
                let c = client(&url, verifier, None)?;
                let r = RevocationClient::new(c.transport().clone())
                    .get_crl()
                    .await
                    .map_err(|e| format!("GetCrl: {e}"))?;
                Ok(r.crl)
            }
        };
        match CrlRefresher::new(set, &ep.root_der, false, source, dstack_ra_tls::crl::DEFAULT_REFRESH) {
            Ok(r) => {
                // The first refresh is the fetch above; the task starts after one interval.
                let delay = r.interval();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    r.run().await;
                });
            }
            Err(e) => tracing::warn!("KMS revocation list refresher: {e}"),
        }
    }

    /// Steps 1–4 against one KMS.
    pub async fn get_app_key(&self, url: &str, vm_config: &str, pin: &[u8]) -> Result<KmsKeys, String> {
        let ep = self.discover(url, pin).await?;
        let c = self.connect(&ep).await?;
        let r = c
            .get_app_key(GetAppKeyRequest {
                api_version: 1,
                vm_config: vm_config.to_owned(),
            })
            .await
            .map_err(|e| format!("GetAppKey: {e}"))?;
        if r.ca_cert.trim() != ep.root_pem.trim() {
            return Err("GetAppKey returned a different root CA than GetTempCaCert".into());
        }
        self.load_crl(&ep, &c).await;
        Ok(KmsKeys {
            keys: AppKeys {
                disk_crypt_key: r.disk_crypt_key,
                env_crypt_key: r.env_crypt_key,
                k256_key: r.k256_key,
                k256_signature: r.k256_signature,
                gateway_app_id: r.gateway_app_id,
                ca_cert: r.ca_cert,
                key_provider: KeyProvider::Kms {
                    url: url.to_owned(),
                    pubkey: ep.root_spki,
                    tmp_ca_key: ep.tmp_ca_key,
                    tmp_ca_cert: ep.tmp_ca_cert,
                },
            },
            os_image_hash: r.os_image_hash,
        })
    }
}

/// [`KeySource`] over [`KmsConnector`]; blocking calls run on `rt`.
#[derive(Debug)]
pub struct KmsKeySource {
    pub connector: KmsConnector,
    pub rt: Handle,
}

impl KeySource for KmsKeySource {
    fn get_app_keys(&self, kms_urls: &[String], vm_config: &str, pin: &[u8]) -> Result<KmsKeys, KeyError> {
        let mut failures = Vec::new();
        for url in kms_urls {
            tracing::info!("requesting app keys from KMS {url}");
            match self.rt.block_on(self.connector.get_app_key(url, vm_config, pin)) {
                Ok(k) => return Ok(k),
                Err(e) => {
                    tracing::warn!("KMS {url}: {e}");
                    failures.push(format!("{url}: {e}"));
                }
            }
        }
        Err(KeyError::Provider {
            provider: "kms",
            reason: format!("no KMS released keys: {}", failures.join("; ")),
        })
    }
}

/// The agent's certificate signer for KMS apps: KMS `SignCert` with the JSON CSR (api_version 1).
#[derive(Debug)]
pub struct KmsCertSigner {
    pub connector: KmsConnector,
    pub endpoint: KmsEndpoint,
    pub vm_config: String,
}

impl KmsCertSigner {
    /// The signer for keys that came from the KMS at `keys.key_provider.url`.
    pub fn new(connector: KmsConnector, keys: &AppKeys, vm_config: &str) -> Result<Self, String> {
        let KeyProvider::Kms {
            url,
            pubkey,
            tmp_ca_key,
            tmp_ca_cert,
        } = &keys.key_provider
        else {
            return Err("keys did not come from a KMS".into());
        };
        let root_der = CertificateDer::from_pem_slice(keys.ca_cert.as_bytes()).map_err(|e| format!("ca_cert: {e}"))?;
        Ok(Self {
            connector,
            endpoint: KmsEndpoint {
                url: url.clone(),
                root_pem: keys.ca_cert.clone(),
                root_der,
                root_spki: pubkey.clone(),
                tmp_ca_cert: tmp_ca_cert.clone(),
                tmp_ca_key: tmp_ca_key.clone(),
            },
            vm_config: vm_config.to_owned(),
        })
    }

    async fn sign_inner(&self, req: &CertRequest, key: &KeyPair) -> Result<Vec<String>, String> {
        use rcgen::SigningKey;
        let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).ok();
        let mut csr = serde_json::json!({
            "confirm": CSR_CONFIRM,
            "pubkey": hex::encode(key.subject_public_key_info()),
            "config": {
                "org_name": req.org_name,
                "subject": req.subject,
                "subject_alt_names": req.alt_names,
                "usage_server_auth": req.usage_server_auth,
                "usage_client_auth": req.usage_client_auth,
                "ext_quote": req.attestation.is_some(),
                "not_before": req.not_before.and_then(unix),
                "not_after": req.not_after.and_then(unix),
            },
        });
        // usage_ra_tls: the agent quoted this key; the KMS embeds and verifies the attestation.
        if let Some(a) = &req.attestation {
            csr["attestation"] = serde_json::json!({"quote": hex::encode(&a.quote), "event_log": a.event_log});
        }
        let csr = csr.to_string();
        let signature = key.sign(csr.as_bytes()).map_err(|e| format!("signing the CSR: {e}"))?;
        let c = self.connector.connect(&self.endpoint).await?;
        let r = c
            .sign_cert(SignCertRequest {
                api_version: 1,
                csr: csr.into_bytes(),
                signature,
                vm_config: self.vm_config.clone(),
            })
            .await
            .map_err(|e| format!("SignCert at {}: {e}", self.endpoint.url))?;
        Ok(r.certificate_chain)
    }
}

impl CertSigner for KmsCertSigner {
    fn sign<'a>(&'a self, req: &'a CertRequest, key: &'a KeyPair) -> SignFuture<'a> {
        Box::pin(async move { self.sign_inner(req, key).await.map_err(AgentError::Cert) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use dstack_ra_tls::revocation::{CrlContent, RevokedSerial, build_crl};

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A gateway-style chain: leaf (serial `serial`) under an app CA under the KMS root.
    fn app_chain(root: &CaCert, serial: &[u8]) -> Vec<CertificateDer<'static>> {
        let key = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_req = CertRequest {
            subject: "Dstack App CA".into(),
            ca_level: Some(0),
            ..Default::default()
        };
        let app_ca = CaCert::issued_by(&ca_req, key(), root).unwrap();
        let leaf_req = CertRequest {
            subject: "gateway".into(),
            alt_names: vec!["gateway.test".into()],
            usage_server_auth: true,
            app_id: Some(vec![0x9a; 20]),
            ..Default::default()
        };
        let leaf = app_ca.issue_with_serial(&leaf_req, &key(), serial).unwrap();
        vec![leaf.der().clone(), app_ca.cert_der().clone()]
    }

    #[test]
    fn kms_root_chain_honours_the_kms_revocation_list() {
        let root_req = CertRequest {
            subject: "Dstack KMS CA".into(),
            ca_level: Some(1),
            ..Default::default()
        };
        let root = CaCert::self_signed(
            &root_req,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        )
        .unwrap();
        let chain = KmsRootChain::new(root.cert_der().clone(), &provider()).unwrap();
        let revoked = app_chain(&root, &[0x5e, 0x71]);
        let kept = app_chain(&root, &[0x5e, 0x72]);
        let name = ServerName::try_from("10.0.2.2").unwrap();
        let verify = |c: &[CertificateDer<'static>]| {
            chain
                .verify(&c[0], &c[1..], &name, &[], UnixTime::now())
                .map_err(|e| e.to_string())
        };
        // No list published (yet): chains are accepted.
        verify(&revoked).unwrap();

        let t = now();
        let content = CrlContent {
            crl_number: 2,
            this_update: t - 10,
            next_update: t + 3600,
            serials: vec![RevokedSerial {
                serial: vec![0x5e, 0x71],
                revoked_at: t - 10,
            }],
            apps: Vec::new(),
        };
        let crl = build_crl(&root, &content).unwrap();
        let set = kms_revocations(root.cert_der()).unwrap();
        // A tampered list is refused and changes nothing.
        let mut tampered = crl.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(set.update_der_from(root.cert_der(), &tampered, t).is_err());
        verify(&revoked).unwrap();

        set.update_der_from(root.cert_der(), &crl, t).unwrap();
        let e = verify(&revoked).unwrap_err();
        assert!(e.contains("revoked") && e.contains("5e71"), "{e}");
        verify(&kept).unwrap();
        // The gateway verifier shares the same chain check and so the same list.
        let gw = KmsRootChain::new(root.cert_der().clone(), &provider()).unwrap();
        assert!(
            gw.verify(&revoked[0], &revoked[1..], &name, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn prpc_suffix_added_once() {
        assert_eq!(prpc_url("https://10.0.2.2:8000"), "https://10.0.2.2:8000/prpc");
        assert_eq!(prpc_url("https://10.0.2.2:8000/prpc/"), "https://10.0.2.2:8000/prpc");
    }
}
