//! dstack gateway appliance (library part).
//!
//! * [`sni`]: TLS ClientHello parsing and the `<id>[-<port>][s|g].<base_domain>` host grammar.
//! * [`routing`]: the table of registered instances, backend selection and per-app limits.
//! * [`dns`]: TXT lookups for custom domains (`_dstack-app-address.<sni>`).
//! * [`proxy`]: the TCP/TLS edge: passthrough, termination, PROXY protocol.
//! * [`acme`]: wildcard certificates from an ACME CA with DNS-01.
//! * [`registration`]: `RegisterCvm`, WireGuard address allocation.
//! * [`admin`]: health, status and Prometheus metrics.
//! * [`attest`]: RA-TLS identity of registering CVMs and the RPC TLS config.
//! * [`rpc_identity`]: the RPC certificate (files, self-signed, or from the guest agent, renewed).
//! * [`rpc_tls`]: `[core.rpc]` + `[core.kms]` wired together (identity, KMS root, revocation list).
//! * [`auth_webhook`]: the registration webhook (fail closed).
//! * [`sync`]: state shared between gateway nodes over RA-TLS.
//! * [`wg`]: userspace WireGuard (boringtun) for the gateway and the guest.
//! * [`config`]: the `gateway.toml` file.

pub mod acme;
pub mod admin;
pub mod attest;
pub mod auth_webhook;
pub mod config;
pub mod dns;
pub mod proxy;
pub mod registration;
pub mod routing;
pub mod rpc_identity;
pub mod rpc_tls;
pub mod sni;
pub mod sync;
pub mod wg;
