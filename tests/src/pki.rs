//! Test-only PKI (see `pki/README.md`): a CA and a server certificate for `localhost` /
//! `127.0.0.1` it signed. Never trust it outside tests.

/// The CA certificate to trust (e.g. `OTEL_EXPORTER_OTLP_CERTIFICATE`).
pub const CA_PEM: &str = include_str!("pki/ca.pem");
/// The server certificate (leaf), signed by [`CA_PEM`].
pub const SERVER_CERT_PEM: &str = include_str!("pki/server.pem");
/// The server's PKCS#8 private key.
pub const SERVER_KEY_PEM: &str = include_str!("pki/server.key");
