//! The `dstack-kms` binary: auto-bootstrap from kms.toml (no TEE: development mode), then serve GetMeta.

use std::sync::Arc;
use std::time::Duration;

use dstack_rpc::Client;
use dstack_rpc::kms::KmsClient;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Kills the child on drop (only the process this test started).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_auto_bootstraps_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("kms.toml");
    std::fs::write(
        &cfg,
        format!(
            "[rpc]\naddress = \"127.0.0.1\"\nport = {port}\n[core]\ncert_dir = \"{}\"\ntee = \"none\"\n\
             [core.onboard]\nauto_bootstrap_domain = \"localhost\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_dstack-kms"))
            .arg("--config")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut ready = false;
    for _ in 0..200 {
        if certs.join("bootstrap-info.json").exists()
            && tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "dstack-kms did not come up");

    let root = CertificateDer::from_pem_file(certs.join("root-ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let kms = KmsClient::new(
        Client::new(&format!("https://127.0.0.1:{port}/prpc"))
            .unwrap()
            .with_tls(Arc::new(tls))
            .with_server_name("localhost")
            .unwrap(),
    );
    let meta = kms.get_meta().await.unwrap();
    assert!(meta.is_dev);
    assert_eq!(meta.k256_pubkey.len(), 33);
    // No TEE: the bootstrap carries no attestation.
    assert!(meta.bootstrap_info.unwrap().attestation.is_empty());
    // Without a client certificate, key release is refused with the reason.
    let e = kms.get_app_key(Default::default()).await.unwrap_err().to_string();
    assert!(e.contains("none was presented"), "{e}");
}
