//! The handshake-signature half of a rustls certificate verifier. Our verifiers check the certificate
//! themselves (RA-TLS evidence, pinned roots, app ids) and leave the handshake signature to rustls' standard
//! code with the provider's algorithms; [`crate::handshake_signatures_from_provider`] writes those three
//! methods once for every `ServerCertVerifier` / `ClientCertVerifier` in the workspace.

#[doc(hidden)]
pub use rustls as __rustls;
#[doc(hidden)]
pub use rustls_pki_types as __pki;

/// Inside an `impl ServerCertVerifier for T` (or `ClientCertVerifier`), implements
/// `verify_tls12_signature`, `verify_tls13_signature` and `supported_verify_schemes` with the
/// `Arc<CryptoProvider>` in field `$field` of `self` (a name, or `0` for a tuple struct).
#[macro_export]
macro_rules! handshake_signatures_from_provider {
    ($field:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &$crate::handshake::__pki::CertificateDer<'_>,
            dss: &$crate::handshake::__rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<
            $crate::handshake::__rustls::client::danger::HandshakeSignatureValid,
            $crate::handshake::__rustls::Error,
        > {
            $crate::handshake::__rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.$field.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &$crate::handshake::__pki::CertificateDer<'_>,
            dss: &$crate::handshake::__rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<
            $crate::handshake::__rustls::client::danger::HandshakeSignatureValid,
            $crate::handshake::__rustls::Error,
        > {
            $crate::handshake::__rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$field.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> ::std::vec::Vec<$crate::handshake::__rustls::SignatureScheme> {
            self.$field.signature_verification_algorithms.supported_schemes()
        }
    };
}
