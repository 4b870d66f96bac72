//! Reproducible one-layer OCI images for a static binary (the demo app), written as an OCI image layout and
//! pushed to a plain-HTTP registry (Debian's `docker-registry` on loopback) over the registry API v2.
//!
//! Building needs no Docker and no network: the layer tar is written here with fixed owners and mtimes,
//! gzip'd with a fixed header, and config/manifest are serialized in a fixed field order, so the same
//! binary and options always give the same manifest digest.

pub mod digest;
pub mod image;
pub mod layout;
pub mod registry;
pub mod tar;

pub use digest::Digest;
pub use image::{Blob, BuildError, Image, ImageSpec, MediaTypes, build};
pub use layout::{LayoutError, read_layout, write_layout};
pub use registry::{Registry, RegistryError};

/// Splits `name[:tag]` (the tag defaults to `latest`; a `:` before the last `/` is a registry port).
pub fn split_name_tag(reference: &str) -> (&str, &str) {
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (reference, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_tag() {
        assert_eq!(split_name_tag("demo:v1"), ("demo", "v1"));
        assert_eq!(split_name_tag("demo"), ("demo", "latest"));
        assert_eq!(split_name_tag("127.0.0.1:5000/demo"), ("127.0.0.1:5000/demo", "latest"));
        assert_eq!(split_name_tag("127.0.0.1:5000/demo:x"), ("127.0.0.1:5000/demo", "x"));
    }
}
