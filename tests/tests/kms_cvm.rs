//! The KMS as a CVM: the `kms` appliance (`image-build/appliances/kms`) packaged for this run by
//! `xtask appliance --only kms --binaries … --set …` (this VM manager's simulator root pinned), its image
//! pushed to the stack's registry and checked against the published digest, deployed exactly as published
//! (`app-compose.json`: key provider none, the KMS cannot take keys from itself) with its RPC port 8000
//! forwarded, in the 1 vCPU / 2048 MiB shape the image publishes measurements for. Inside the CVM it
//! auto-bootstraps with its guest agent as its TEE; from outside we then verify, as a relying party would,
//! `GetMeta`'s `bootstrap_info.attestation`: the simulated quote under the pinned simulator root, its report
//! data binding the bootstrapped root CA key and k256 key, MRTD/RTMR0-2 equal to the image's
//! `measurements.json`, the event log replaying to RTMR3 with `compose-hash`/`app-id` equal to
//! `appliances.json`'s `kms` entry and `key-provider` none. Its RPC certificate (`attest_rpc_cert`) carries
//! an RA-TLS attestation of the same app.
//!
//! Inputs: the `dstack_e2e` crate docs (`DSTACK_E2E_IMAGE`, `DSTACK_DEMO_APP_BIN`, `VHOST_DEVICE_VSOCK`,
//! Debian `docker-registry`) plus `DSTACK_KMS_BIN`, the static `dstack-kms` (`cargo xtask appliance --only kms`
//! builds it into `target-static/x86_64-unknown-linux-gnu/release`), and optionally `DSTACK_XTASK` (the xtask
//! binary that packages it; default `cargo run -p xtask`). Missing inputs: loud SKIP, or failure under
//! `DSTACK_REQUIRE_FIXTURES=1`. One CVM boot under TCG.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use dstack_e2e::gateway_cvm::{PackagedGateway, fetch_chain, package_appliance, push};
use dstack_e2e::stack::{IMAGE_NAME, free_port, skip_or_fail, tail};
use dstack_e2e::verify::{Check, Verdict};
use dstack_e2e::{Inputs, KmsOptions, Stack, StackError};
use dstack_host_vmm::manager::VmmApi;
use dstack_measurements::eventlog::{TdxEvent, parse_json_log};
use dstack_measurements::published::{AttestationExtras, MeasurementsJson, diff};
use dstack_measurements::sim::SimRootPin;
use dstack_measurements::verify::{VerifyOptions, verify_quote};
use dstack_ra_tls::verify::{AttestationPolicy, AttestationVerifier};
use dstack_rpc::LocalTransport;
use dstack_rpc::kms::GetMetaResponse;
use dstack_rpc::vmm::{PortMapping, VmConfiguration, VmmClient, VmmServer};
use sha2::{Digest, Sha256};

/// The KMS CVM's shape (one of the image's published measurement shapes).
const VCPUS: u32 = 1;
const MEMORY_MB: u32 = 2048;
/// `KMS_DOMAIN` for this packaging: the KMS bootstraps its RPC certificate for it.
const KMS_DOMAIN: &str = "kms.dstack.test";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn kms_bin() -> Result<PathBuf, StackError> {
    std::env::var_os("DSTACK_KMS_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| StackError::Missing {
            what: "DSTACK_KMS_BIN".into(),
            hint: "the static dstack-kms binary (cargo xtask appliance --only kms builds it into \
                   target-static/x86_64-unknown-linux-gnu/release)"
                .into(),
        })
}

fn check(what: &str, expected: impl Into<String>, actual: impl Into<String>) -> Check {
    let (expected, actual) = (expected.into(), actual.into());
    Check {
        what: what.into(),
        ok: expected == actual,
        expected,
        actual,
    }
}

/// Payload of the last RTMR3 event named `name`, as text for the report.
fn event_payload(events: &[TdxEvent], name: &str) -> Option<Vec<u8>> {
    events
        .iter()
        .rev()
        .find(|e| e.imr == 3 && e.event == name)
        .map(|e| e.event_payload.clone())
}

/// The report data dstack's KMS quotes at bootstrap, recomputed here from dstack's definition
/// (`onboard_service.rs`): `keccak256("dstack-kms-genereted-keys-v1:" ‖ hex(CA SPKI DER) ‖ ";" ‖
/// hex(k256 SEC1 compressed) ‖ ";")`, zero-padded to 64 bytes.
fn bootstrap_report_data(ca_pubkey: &[u8], k256_pubkey: &[u8]) -> [u8; 64] {
    let text = format!(
        "dstack-kms-genereted-keys-v1:{};{};",
        hex::encode(ca_pubkey),
        hex::encode(k256_pubkey)
    );
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&dstack_keys::sig::keccak256(&[text.as_bytes()]));
    out
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Verifies `GetMeta`'s bootstrap attestation against the packaging and the image's measurements.
fn verify_bootstrap(meta: &GetMetaResponse, pin: &SimRootPin, measurements: &Path, pkg: &PackagedGateway) -> Verdict {
    let mut checks = Vec::new();
    let info = meta.bootstrap_info.clone().unwrap_or_default();
    checks.push(check(
        "GetMeta k256 = bootstrap k256",
        hex::encode(&info.k256_pubkey),
        hex::encode(&meta.k256_pubkey),
    ));
    let att: serde_json::Value = match serde_json::from_slice(&info.attestation) {
        Ok(v) => v,
        Err(e) => {
            checks.push(check("bootstrap attestation is JSON", "JSON", e.to_string()));
            return Verdict {
                tcb_status: "-".into(),
                checks,
            };
        }
    };
    checks.push(check(
        "attestation tee",
        "simulated",
        att["tee"].as_str().unwrap_or("(none)"),
    ));
    let quote = hex::decode(att["quote"].as_str().unwrap_or_default()).unwrap_or_default();
    let opts = VerifyOptions {
        now: now(),
        allow_simulated: true,
        simulated_roots: vec![pin.clone()],
        allow_debug: false,
    };
    let verified = match verify_quote(&quote, None, &opts) {
        Ok(v) => v,
        Err(e) => {
            checks.push(check("quote under the simulator root", "valid", e.to_string()));
            return Verdict {
                tcb_status: "-".into(),
                checks,
            };
        }
    };
    checks.push(check("quote under the simulator root", "valid", "valid"));
    let report = &verified.quote.report;
    checks.push(check(
        "report data binds the bootstrap keys",
        hex::encode(bootstrap_report_data(&info.ca_pubkey, &info.k256_pubkey)),
        hex::encode(report.report_data),
    ));
    let events = serde_json::to_vec(&att["event_log"])
        .map_err(|e| e.to_string())
        .and_then(|raw| parse_json_log(&raw).map_err(|e| e.to_string()));
    let events = match events {
        Ok(ev) => ev,
        Err(e) => {
            checks.push(check("event log", "parses", e));
            Vec::new()
        }
    };
    match std::fs::read(measurements)
        .map_err(|e| e.to_string())
        .and_then(|b| MeasurementsJson::parse(&b).map_err(|e| e.to_string()))
    {
        Ok(published) => {
            let extras = AttestationExtras {
                events: Some(&events),
                vcpus: Some(VCPUS),
                memory_bytes: Some(u64::from(MEMORY_MB) << 20),
                os_image_hash: None,
            };
            let d = diff(&published, report, &extras);
            checks.push(check(
                "published shape",
                format!("{VCPUS} vCPU / {MEMORY_MB} MiB"),
                format!("{} vCPU / {} MiB", d.vcpus, d.memory_mb),
            ));
            for r in d.rows {
                checks.push(Check {
                    what: r.register,
                    ok: r.matches,
                    expected: r.expected,
                    actual: r.actual,
                });
            }
        }
        Err(e) => checks.push(check("measurements.json", "readable", e)),
    }
    // Trustworthy only because the replay above matched the quoted RTMR3.
    let payload_hex = |name: &str| event_payload(&events, name).map_or_else(|| format!("(no {name})"), hex::encode);
    checks.push(check(
        "compose-hash event = published",
        pkg.compose_hash.as_str(),
        payload_hex("compose-hash"),
    ));
    checks.push(check(
        "app-id event = published",
        pkg.app_id.as_str(),
        payload_hex("app-id"),
    ));
    let provider = event_payload(&events, "key-provider")
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "(no key-provider)".into());
    checks.push(check("key-provider event", "none", provider));
    Verdict {
        tcb_status: verified.status.to_string(),
        checks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_appliance_boots_in_a_cvm_and_attests_its_bootstrap_keys() {
    let (inputs, kms_bin) = match Inputs::from_env().and_then(|i| Ok((i, kms_bin()?))) {
        Ok(i) => i,
        Err(e) => return skip_or_fail("kms_cvm", &e),
    };
    let xtask = std::env::var_os("DSTACK_XTASK").map(PathBuf::from);
    let measurements = inputs.image_dir.join("measurements.json");
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let stack = Stack::start(dir.path(), inputs, KmsOptions::default()).await.unwrap();

    // Package for this run: the KMS accepts quotes of this VM manager's simulator only (pinned root).
    let signer = dstack_sim_tdx::ensure_signer(&stack.mgr.config.sim_tdx_state_dir()).unwrap();
    let pin_hex = hex::encode(signer.root_pin_spki_sha256());
    let sets = [
        ("KMS_DOMAIN", KMS_DOMAIN.to_owned()),
        ("ALLOW_SIMULATED", "true".to_owned()),
        ("SIMULATED_ROOTS", format!("\"{pin_hex}\"")),
    ];
    let t_pkg = Instant::now();
    let pkg = package_appliance("kms", &kms_bin, xtask.as_deref(), &dir.path().join("appliance"), &sets).unwrap();
    // What is deployed is what was published: its SHA-256 is the compose hash, its prefix the app id.
    let digest = hex::encode(Sha256::digest(pkg.app_compose.as_bytes()));
    assert_eq!(digest, pkg.compose_hash);
    assert_eq!(pkg.app_id, pkg.compose_hash[..40]);
    let compose: serde_json::Value = serde_json::from_str(&pkg.app_compose).unwrap();
    assert_eq!(compose["kms_enabled"], false, "{}", pkg.app_compose);
    assert!(
        compose["docker_compose_file"].as_str().unwrap().contains(&pin_hex),
        "the simulator root pin is not in the measured compose file"
    );
    push(stack.registry_port, &pkg).await.unwrap();
    eprintln!(
        "packaged and pushed in {:.1?}: image {} compose hash {}",
        t_pkg.elapsed(),
        pkg.image,
        pkg.compose_hash
    );

    let port = free_port().unwrap();
    let vmm = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(stack.mgr.clone()))));
    let id = vmm
        .create_vm(VmConfiguration {
            name: "dstack-kms".into(),
            image: IMAGE_NAME.into(),
            compose_file: pkg.app_compose.clone(),
            vcpu: VCPUS,
            memory: MEMORY_MB,
            disk_size: 2,
            ports: vec![PortMapping {
                protocol: "tcp".into(),
                host_port: u32::from(port),
                vm_port: 8000,
                host_address: "127.0.0.1".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .id;

    // Until GetMeta answers: the CVM booted, dockerd pulled the image, the KMS bootstrapped and serves.
    let url = format!("https://127.0.0.1:{port}");
    let t_boot = Instant::now();
    let mut shown = String::new();
    let mut last: String;
    let meta = loop {
        let info = stack.info(&id).await.unwrap();
        assert!(
            info.boot_error.is_empty(),
            "KMS CVM boot error: {}\nserial tail:\n{}",
            info.boot_error,
            tail(&stack.serial_log(&id), 60)
        );
        if info.boot_progress != shown {
            eprintln!(
                "KMS CVM [{:>6.1}s] {}",
                t_boot.elapsed().as_secs_f64(),
                info.boot_progress
            );
            shown = info.boot_progress.clone();
        }
        assert!(
            info.status != "exited" && info.status != "stopped",
            "KMS CVM status {} before GetMeta answered\nserial tail:\n{}",
            info.status,
            tail(&stack.serial_log(&id), 60)
        );
        let client = dstack_host_vmm::cli::kms::kms_client(&url).unwrap();
        match tokio::time::timeout(Duration::from_secs(15), client.get_meta()).await {
            Ok(Ok(meta)) => break meta,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "GetMeta timed out".into(),
        }
        assert!(
            t_boot.elapsed() < BOOT_TIMEOUT,
            "no GetMeta from the KMS CVM after {BOOT_TIMEOUT:?} (boot progress {shown:?}, last {last})\nserial \
             tail:\n{}",
            tail(&stack.serial_log(&id), 60)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let up = t_boot.elapsed();
    eprintln!("KMS CVM {id}: GetMeta answered {up:.1?} after CreateVm");

    let sim_root = std::fs::read(stack.sim_root()).unwrap();
    let pin = SimRootPin::parse(&sim_root).unwrap();
    let verdict = verify_bootstrap(&meta, &pin, &measurements, &pkg);
    eprintln!("KMS bootstrap attestation:\n{}", verdict.report());
    assert!(verdict.ok(), "KMS bootstrap attestation:\n{}", verdict.report());
    assert_eq!(verdict.tcb_status, "Simulated");
    for what in ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3 (event log replay)"] {
        assert!(
            verdict.checks.iter().any(|c| c.what == what && c.ok),
            "no passing {what:?} check:\n{}",
            verdict.report()
        );
    }
    // The same attestation checked against another packaging fails exactly the identity rows.
    let other = PackagedGateway {
        compose_hash: "00".repeat(32),
        app_id: "00".repeat(20),
        ..pkg.clone()
    };
    let wrong = verify_bootstrap(&meta, &pin, &measurements, &other);
    let failed: Vec<&str> = wrong.checks.iter().filter(|c| !c.ok).map(|c| c.what.as_str()).collect();
    assert_eq!(failed, ["compose-hash event = published", "app-id event = published"]);
    // Keys other than the quoted ones do not match the report data.
    let mut swapped = meta.clone();
    if let Some(b) = swapped.bootstrap_info.as_mut() {
        b.k256_pubkey = other_k256(&b.k256_pubkey);
    }
    swapped.k256_pubkey = swapped
        .bootstrap_info
        .as_ref()
        .map(|b| b.k256_pubkey.clone())
        .unwrap_or_default();
    let wrong = verify_bootstrap(&swapped, &pin, &measurements, &pkg);
    let failed: Vec<&str> = wrong.checks.iter().filter(|c| !c.ok).map(|c| c.what.as_str()).collect();
    assert_eq!(failed, ["report data binds the bootstrap keys"]);

    // Its RPC certificate is RA-TLS attested by the same app (`attest_rpc_cert`).
    let chain = fetch_chain(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    let verifier = AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![pin],
        ..Default::default()
    });
    let identity = verifier
        .verify_cert(&chain[0], now())
        .unwrap()
        .expect("the KMS RPC certificate carries an attestation");
    assert_eq!(hex::encode(&identity.compose_hash), pkg.compose_hash);
    assert_eq!(hex::encode(&identity.app_id), pkg.app_id);
    assert_eq!(identity.special_usage.as_deref(), Some("kms:rpc"));
    eprintln!("KMS CVM verified; GetMeta after {up:.1?}, total {:.1?}", t0.elapsed());
}

/// A different valid-looking compressed secp256k1 key (flipped parity byte), to show the report data binds
/// the exact bootstrap key.
fn other_k256(key: &[u8]) -> Vec<u8> {
    let mut other = key.to_vec();
    if let Some(first) = other.first_mut() {
        *first = if *first == 0x02 { 0x03 } else { 0x02 };
    }
    other
}
