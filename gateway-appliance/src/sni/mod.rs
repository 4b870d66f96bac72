//! Reading the destination from the first bytes of a connection.

pub mod client_hello;
pub mod host;

pub use client_hello::{ClientHelloError, ClientHelloInfo, parse_client_hello, parse_client_hello_bounded};
pub use host::{Destination, HostError, TlsMode, parse_host, parse_subdomain, subdomain_of};
