//! dstack's RA-TLS X.509 extension OIDs (Phala's PEN 62397), as in dstack's `ra-tls/src/oids.rs`.

/// TDX quote (raw quote bytes).
pub const TDX_QUOTE: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 1];
/// Event log (JSON array of event-log entries; optionally `ELGZv1` + gzip).
pub const EVENT_LOG: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 2];
/// App id (raw bytes).
pub const APP_ID: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 3];
/// Special certificate usage (UTF-8 text such as `app:ca`, `app:custom`, `kms:rpc`).
pub const CERT_USAGE: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 4];
/// Versioned attestation (SCALE / MessagePack; newer dstack releases).
pub const ATTESTATION: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 8];
/// App info (MessagePack).
pub const APP_INFO: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 9];

/// Dotted form of an OID given as arcs.
pub fn dotted(arcs: &[u64]) -> String {
    arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// Ours, not dstack's: CRL extension revoking every certificate of an app issued before a time (see
/// [`crate::revocation`]). Under Phala's PEN like the others but outside dstack's `.1.x` certificate arc.
pub const APP_REVOCATIONS: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 100, 1];
