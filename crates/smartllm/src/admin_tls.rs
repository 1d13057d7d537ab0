//! The CLI's TLS to an admin listener with `server.admin_tls`: the gateway's
//! certificate is pinned (the end-entity certificate must be the one in the
//! config's `cert_file`, which this host can read), so no CA or host name is
//! needed; with `client_ca_file`, `--admin-cert` / `--admin-key` give the
//! client certificate.

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

/// Accepts exactly the pinned end-entity certificate.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the admin listener's certificate is not the one in server.admin_tls.cert_file"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pem_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

/// A TLS connection over `tcp` to the admin listener serving `tls.cert_file`.
pub fn connect(
    tcp: TcpStream,
    tls: &smartllm_config::TlsConfig,
    client: Option<(&Path, &Path)>,
) -> anyhow::Result<StreamOwned<ClientConnection, TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = pem_certs(&tls.cert_file)?.swap_remove(0);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { cert, provider }));
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = pem_certs(cert)?;
            let bytes = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            let key = rustls_pemfile::private_key(&mut bytes.as_slice())?
                .with_context(|| format!("{} holds no private key", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    // The certificate is pinned: the name only goes into SNI.
    let name = ServerName::try_from("localhost")?;
    let conn = ClientConnection::new(Arc::new(config), name)?;
    Ok(StreamOwned::new(conn, tcp))
}
