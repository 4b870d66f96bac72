//! dstack-compatible KMS appliance: attested key release.
//!
//! * [`config`]: `kms.toml` (dstack field names, documented defaults).
//! * [`store`]: key files in `cert_dir` with dstack's names, written atomically with mode 0600.
//! * [`bootstrap`]: first start — root CA (P-256), root k256 key, temp CA and RPC certificate, attested by the
//!   KMS's own TEE; the `Onboard` service (`Bootstrap`, `Finish`).
//! * [`policy`]: `BootInfo` (dstack's JSON) and the authorization APIs: `dev`, `webhook` and `onchain`.
//! * [`onchain`]: our `KmsRegistry` / `AppAuth` contracts (`contracts/`), asked with `eth_call`; admin
//!   operations. [`chain`]: the minimal JSON-RPC client and transaction signing underneath.
//! * [`service`]: the `KMS` service — `GetAppKey`, `GetAppEnvEncryptPubKey`, `GetMeta`, `GetTempCaCert`,
//!   `SignCert`, `GetKmsKey`.
//! * [`tls`]: the RA-TLS server configuration (client certificates optional at the TLS layer; methods that
//!   need an attested caller check it themselves).
//! * [`server`]: wiring it together (what the `dstack-kms` binary runs).
//!
//! * [`onboard`]: replication — `Onboard.Onboard` fetches the root keys from another KMS over mutually attested
//!   RA-TLS (`GetKmsKey`), each side asking its policy whether the other is an allowed KMS.
//! * [`image`]: OS image verification (`[core.image]`) and the image cache; [`admin_service`]: the `Admin`
//!   service (`ClearImageCache`, `RevokeCerts`) on its own token-protected listener.
//! * [`revocation`]: revoked certificates (`revocations.json` in `cert_dir`) and the CRL signed by the root CA
//!   that the KMS publishes (`Revocation.GetCrl`, `GET /prpc/GetCrl`); RA-TLS verifiers load it with
//!   [`dstack_ra_tls::RevocationList`] / [`dstack_ra_tls::RevocationSet`]; the KMS refuses callers presenting a
//!   revoked certificate it issued.
//! * [`replication`]: a replica copies the source's revocations at onboarding and then pulls them periodically.
//! * [`attestation_info`] serves `Onboard.GetAttestationInfo`.

pub mod admin;
pub mod admin_service;
pub mod attestation_info;
pub mod bootstrap;
pub mod chain;
pub mod config;
pub mod image;
pub mod onboard;
pub mod onchain;
pub mod policy;
pub mod replication;
pub mod revocation;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

pub use config::KmsConfig;
pub use server::{Kms, KmsHandle};

/// Errors of the KMS library.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("key storage: {0}")]
    Storage(String),
    #[error("already bootstrapped: {0}")]
    AlreadyBootstrapped(String),
    #[error("not bootstrapped: {0}")]
    NotBootstrapped(String),
    #[error("key generation: {0}")]
    KeyGen(String),
    #[error("TEE: {0}")]
    Tee(#[from] dstack_tee::TeeError),
    #[error("certificate: {0}")]
    Cert(#[from] dstack_ra_tls::RaTlsError),
    #[error("key derivation: {0}")]
    Keys(#[from] dstack_keys::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
