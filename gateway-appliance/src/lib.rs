//! dstack gateway appliance (library part).
//!
//! * [`sni`]: TLS ClientHello parsing and the `<id>[-<port>][s|g].<base_domain>` host grammar.
//! * [`routing`]: the table of registered instances, backend selection and per-app limits.
//! * [`dns`]: TXT lookups for custom domains (`_dstack-app-address.<sni>`).
//! * [`proxy`]: the TCP/TLS edge: passthrough, termination, PROXY protocol.
//! * [`acme`]: wildcard certificates from an ACME CA with DNS-01.
//! * [`registration`]: `RegisterCvm`, WireGuard address allocation.
//! * [`config`]: the `gateway.toml` file.

pub mod acme;
pub mod config;
pub mod dns;
pub mod proxy;
pub mod registration;
pub mod routing;
pub mod sni;
