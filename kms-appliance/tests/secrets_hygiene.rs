//! Secrets hygiene (#13 item 4): a KMS bootstrap plus key releases (one allowed, one refused, one with a bad
//! request) with every log event captured at TRACE level, then the captured text is searched for every secret
//! produced — the root keys from the key files and the released app keys — in hex (both cases), standard and
//! URL-safe base64 (padded or not) and PEM body form. Key files must be 0600. Errors returned to clients are
//! searched too.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use common::*;
use dstack_kms::Kms;
use dstack_rpc::kms::GetAppKeyRequest;

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];
const ROGUE: [u8; 20] = [0x66; 20];

/// Every formatted log line, whatever the thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// RFC 4648 base64 with the given alphabet (standard or URL-safe), padded or not. Written here rather than
/// taken from a crate: kms-appliance does not depend on one, and it is a few lines.
fn base64(data: &[u8], url_safe: bool, pad: bool) -> String {
    let alphabet: &[u8] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if pad {
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
    }
    out
}

#[test]
fn base64_matches_rfc4648_vectors() {
    // RFC 4648 section 10.
    for (plain, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes(), false, true), enc);
        assert_eq!(base64(plain.as_bytes(), false, false), enc.trim_end_matches('='));
    }
    assert_eq!(base64(&[0xfb, 0xff], true, true), "-_8=");
    assert_eq!(base64(&[0xfb, 0xff], false, true), "+/8=");
}

/// The textual forms a secret could leak in.
fn forms(secret: &[u8]) -> Vec<String> {
    let hex = hex::encode(secret);
    vec![
        hex.clone(),
        hex.to_uppercase(),
        base64(secret, false, true),
        base64(secret, false, false),
        base64(secret, true, true),
        base64(secret, true, false),
        // A Debug-formatted byte array, e.g. `[66, 66, ...]`.
        format!("{secret:?}"),
    ]
}

/// Asserts that no form of `secret` (nor a 16-byte window of it, to catch truncated dumps) is in `text`.
fn assert_absent(text: &str, what: &str, secret: &[u8]) {
    assert!(secret.len() >= 16, "{what}: too short to search reliably");
    for f in forms(secret) {
        assert!(!text.contains(&f), "{what} appears in the logs as {f}");
    }
    for w in secret.windows(16).step_by(8) {
        let h = hex::encode(w);
        assert!(!text.contains(&h), "{what} appears (partly) in the logs as hex {h}");
    }
}

/// The base64 body lines of a PEM document (each 64-character line is a distinct, searchable token).
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_in_trace_logs_or_errors_and_key_files_are_private() {
    // Global, so the server's tasks on other runtime threads are captured too (the only test here that logs).
    let capture = Capture::default();
    let writer = capture.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let rogue_sim = cvm(ROGUE, INSTANCE);
    let pins = vec![
        write_pin(dir.path(), "cvm.pem", &app_sim),
        write_pin(dir.path(), "rogue.pem", &rogue_sim),
    ];
    let hook = webhook(vec![APP]).await;
    let kms = Kms::with_tee(config(&certs, pins, true, Some(&hook.url)), Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let req = GetAppKeyRequest {
        api_version: 1,
        vm_config: r#"{"os_image_hash":"5eed00000000000000000000000000000000000000000000000000000000beef"}"#.into(),
    };

    let (cert, key) = client_cert(&app_sim, |_| {});
    let released = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req.clone())
        .await
        .unwrap();
    let (cert, key) = client_cert(&rogue_sim, |_| {});
    let refused = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req.clone())
        .await
        .unwrap_err()
        .to_string();
    let (cert, key) = client_cert(&app_sim, |_| {});
    let bad = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(GetAppKeyRequest {
            api_version: 1,
            vm_config: "{not json".into(),
        })
        .await
        .unwrap_err()
        .to_string();
    drop(handle);

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    // The refused release is logged (a warning naming the policy decision): the capture works.
    assert!(logs.contains("WARN"), "capture saw no warnings: {logs}");
    let levels: Vec<(&str, usize)> = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
        .iter()
        .map(|l| (*l, logs.matches(l).count()))
        .collect();
    eprintln!("captured events by level: {levels:?}");
    let text = format!("{logs}\n{refused}\n{bad}");
    eprintln!(
        "captured {} bytes of logs; refused: {refused}; bad request: {bad}",
        logs.len()
    );

    // Released app keys (the client received them; the server must not log them).
    assert_absent(&text, "disk_crypt_key", &released.disk_crypt_key);
    assert_absent(&text, "env_crypt_key", &released.env_crypt_key);
    assert_absent(&text, "k256_key", &released.k256_key);
    assert_eq!(released.disk_crypt_key.len(), 32);

    // Root secrets, read from the key files; the PEM keys are searched by their body lines and raw scalar.
    let k256 = std::fs::read(certs.join("root-k256.key")).unwrap();
    assert_absent(&text, "root-k256.key", &k256);
    for name in ["root-ca.key", "tmp-ca.key", "rpc.key"] {
        let pem = std::fs::read_to_string(certs.join(name)).unwrap();
        for line in pem_body_lines(&pem) {
            assert!(!text.contains(&line), "{name} PEM body appears in the logs");
        }
        let scalar = dstack_keys::kdf::p256_from_pkcs8_pem(&pem).unwrap().to_bytes();
        assert_absent(&text, name, &scalar);
    }

    for name in ["root-ca.key", "root-k256.key", "tmp-ca.key", "rpc.key"] {
        let mode = std::fs::metadata(certs.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let dir_mode = std::fs::metadata(&certs).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode & 0o077, 0, "key directory is {dir_mode:o}");
}
