//! TLS client configuration for OTLP/HTTP (rustls + ring): the system roots plus an optional
//! custom CA (`OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`). gRPC uses tonic's own TLS settings.
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The certificates in a PEM buffer; an error unless there is at least one.
pub(crate) fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// `load_native`: trust the system roots too (false for plain-http endpoints, where the
/// config is never used: no need to read the system store).
pub(crate) fn client_config(
    ca_pem: Option<&[u8]>,
    load_native: bool,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut added = 0;
    let mut errors = 0;
    if load_native {
        let native = rustls_native_certs::load_native_certs();
        errors = native.errors.len();
        added = roots.add_parsable_certificates(native.certs).0;
    }
    if let Some(pem) = ca_pem {
        for cert in parse_pem_certs(pem)? {
            roots
                .add(cert)
                .map_err(|e| format!("custom CA rejected: {e}"))?;
        }
    } else if load_native && added == 0 {
        log::warn!(
            "no system CA certificates found ({errors} errors); https export will fail \
             without OTEL_EXPORTER_OTLP_CERTIFICATE"
        );
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const TEST_CA_PEM: &str = ::tests::pki::CA_PEM;

    #[test]
    fn pem_parsing_and_client_config() {
        assert_eq!(parse_pem_certs(TEST_CA_PEM.as_bytes()).unwrap().len(), 1);
        // A chain file: leaf + CA.
        let chain = format!("{}{}", ::tests::pki::SERVER_CERT_PEM, TEST_CA_PEM);
        assert_eq!(parse_pem_certs(chain.as_bytes()).unwrap().len(), 2);
        assert!(parse_pem_certs(b"garbage").is_err());
        assert!(parse_pem_certs(b"").is_err());
        client_config(Some(TEST_CA_PEM.as_bytes()), true).unwrap();
        client_config(None, true).unwrap();
        client_config(None, false).unwrap();
    }
}
