//! TLS on the API and admin listeners. Pingora's rustls listener is built
//! once, at start, with two hooks that read the *current* runtime snapshot at every
//! handshake: [`CertResolver`] hands out the certificate of the running
//! config and [`ClientVerifier`] checks client certificates against its CAs.
//! A reload that brings new files (or new contents) swaps the snapshot, so
//! new handshakes get the new certificate while established connections keep
//! the session they negotiated: nothing is dropped.

use crate::Shared;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use smartllm_config::tls::TlsError;
use smartllm_config::TlsConfig;
use std::sync::Arc;

/// The listener's TLS material in a runtime snapshot.
pub struct ListenerTls {
    pub certified_key: Arc<CertifiedKey>,
    /// Present when `server.tls.client_ca_file` is set: clients must
    /// present a certificate one of its CAs signed.
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// sha256 of the served end-entity certificate.
    pub fingerprint: String,
    /// When it becomes valid and expires (Unix seconds).
    pub validity: Option<(i64, i64)>,
    /// What is odd about the files though they load (see
    /// [`smartllm_config::tls::TlsMaterial::warnings`]).
    pub warnings: Vec<String>,
    /// sha256 of the client CAs (subjects and keys; empty without them):
    /// what a resumed session must have begun under (see [`Sessions`]).
    pub client_auth: String,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("fingerprint", &self.fingerprint)
            .field("client_auth", &self.client_verifier.is_some())
            .finish()
    }
}

/// Which listener: its TLS settings and material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Api,
    Admin,
}

impl Listener {
    /// Its settings in `smartllm.yaml`.
    pub fn setting(self) -> &'static str {
        match self {
            Listener::Api => "server.tls",
            Listener::Admin => "server.admin_tls",
        }
    }

    /// Its material in a runtime snapshot.
    pub fn of(self, rt: &crate::Runtime) -> Option<&Arc<ListenerTls>> {
        match self {
            Listener::Api => rt.tls.as_ref(),
            Listener::Admin => rt.admin_tls.as_ref(),
        }
    }
}

/// Why a listener's TLS files cannot be used (reported under
/// `server.tls.<key>` or `server.admin_tls.<key>`).
#[derive(Debug, thiserror::Error)]
#[error("{}.{key}: {message}", listener.setting())]
pub struct ListenerTlsError {
    pub listener: Listener,
    pub key: &'static str,
    pub message: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ListenerTls {
    /// Read and check the files of `tls` (see [`smartllm_config::tls::load`]).
    pub fn load(listener: Listener, tls: &TlsConfig) -> Result<ListenerTls, ListenerTlsError> {
        let m = smartllm_config::tls::load(tls).map_err(|e: TlsError| ListenerTlsError {
            listener,
            key: e.key(),
            message: e.to_string(),
        })?;
        let client_auth = m.client_roots.as_ref().map_or_else(String::new, |roots| {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for a in &roots.roots {
                h.update((a.subject.len() as u64).to_be_bytes());
                h.update(&a.subject);
                h.update((a.subject_public_key_info.len() as u64).to_be_bytes());
                h.update(&a.subject_public_key_info);
            }
            hex::encode(h.finalize())
        });
        let client_verifier = match m.client_roots {
            None => None,
            Some(roots) => Some(
                WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| ListenerTlsError {
                        listener,
                        key: "client_ca_file",
                        message: format!(
                            "{}: {e}",
                            tls.client_ca_file
                                .as_deref()
                                .unwrap_or(std::path::Path::new(""))
                                .display()
                        ),
                    })?,
            ),
        };
        Ok(ListenerTls {
            certified_key: m.certified_key,
            client_verifier,
            fingerprint: m.fingerprint,
            validity: m.validity,
            warnings: m.warnings,
            client_auth,
        })
    }
}

/// What the served certificates' dates say, at a start and after each
/// reload: a warning when one has expired, is not valid yet or expires
/// within 14 days, and `smartllm_tls_certificate_expiry_timestamp_seconds`
/// (for an alert well before the day: the gateway keeps serving what it
/// was given).
pub fn note_validity(rt: &crate::Runtime) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for listener in [Listener::Api, Listener::Admin] {
        let Some(t) = listener.of(rt) else { continue };
        for w in &t.warnings {
            tracing::warn!(listener = listener.setting(), "{}: {w}", listener.setting());
        }
        let Some(v) = t.validity else { continue };
        metrics::gauge!(crate::metrics::TLS_CERT_EXPIRY, "listener" => listener.setting())
            .set(v.1 as f64);
        if let Some(w) = smartllm_config::tls::validity_warning(v, now) {
            tracing::warn!(listener = listener.setting(), sha256 = %t.fingerprint, "{}: {w}", listener.setting());
        }
    }
}

/// The listener's TLS session cache, kept per client-CA setting: a session
/// begun when no client certificate was asked for (or under other CAs) is
/// not found once a reload asks for one (or changes them), so the client
/// makes a full handshake and its certificate is checked. rustls checks no
/// certificate when it resumes a session; without this, a client that kept
/// a ticket from before the reload would get in without one.
pub struct Sessions {
    inner: Arc<rustls::server::ServerSessionMemoryCache>,
    shared: Arc<Shared>,
    listener: Listener,
}

impl Sessions {
    pub fn new(shared: Arc<Shared>, listener: Listener) -> Self {
        Sessions {
            // rustls's default size.
            inner: rustls::server::ServerSessionMemoryCache::new(256),
            shared,
            listener,
        }
    }

    /// `key` under the client-auth setting in force now.
    fn key(&self, key: &[u8]) -> Vec<u8> {
        let rt = self.shared.runtime.load();
        let auth = self.listener.of(&rt).map_or("", |t| t.client_auth.as_str());
        let mut k = Vec::with_capacity(auth.len() + 1 + key.len());
        k.extend_from_slice(auth.as_bytes());
        k.push(b'|');
        k.extend_from_slice(key);
        k
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("listener", &self.listener)
            .finish()
    }
}

impl rustls::server::StoresServerSessions for Sessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(self.key(&key), value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(&self.key(key))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(&self.key(key))
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Serves the certificate of the running config to each new handshake.
pub struct CertResolver {
    shared: Arc<Shared>,
    listener: Listener,
}

impl CertResolver {
    pub fn new(shared: Arc<Shared>, listener: Listener) -> Self {
        CertResolver { shared, listener }
    }
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertResolver")
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None (TLS turned off by a reload, which needs a restart to take
        // effect, keeps the running files) fails the handshake.
        self.listener
            .of(&self.shared.runtime.load())
            .map(|t| t.certified_key.clone())
    }
}

/// Client-certificate authentication by the running config's CAs; without
/// `client_ca_file`, no certificate is asked for.
pub struct ClientVerifier {
    shared: Arc<Shared>,
    listener: Listener,
    provider: Arc<CryptoProvider>,
}

impl ClientVerifier {
    pub fn new(shared: Arc<Shared>, listener: Listener) -> Self {
        ClientVerifier {
            shared,
            listener,
            provider: provider(),
        }
    }

    fn current(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.listener
            .of(&self.shared.runtime.load())
            .and_then(|t| t.client_verifier.clone())
    }
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.current().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().is_some()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CAs change with the config; a client with one certificate
        // sends it without hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.current() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            // Client certificates were turned off by a reload mid-handshake.
            None => Ok(ClientCertVerified::assertion()),
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
