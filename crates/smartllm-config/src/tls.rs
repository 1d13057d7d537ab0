//! The TLS files of the API listener (`server.tls`): a PEM certificate chain,
//! its private key and, for client-certificate authentication, a PEM bundle of
//! client CAs. [`load`] reads and checks them (the chain parses, the key is
//! one rustls can sign with and belongs to the chain's first certificate, the
//! CAs are usable trust anchors). Validation calls it, so `smartllm check` and
//! a reload name the setting and the file that is wrong; the proxy calls it
//! again to build what its certificate resolver serves.

use crate::TlsConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a listener serves: the certificate chain with its signing key, and
/// the client CAs when client certificates are required.
#[derive(Debug)]
pub struct TlsMaterial {
    pub certified_key: Arc<CertifiedKey>,
    pub client_roots: Option<Arc<RootCertStore>>,
    /// sha256 of the end-entity certificate (hex), for logs and tests.
    pub fingerprint: String,
    /// When the end-entity certificate becomes valid and expires (Unix
    /// seconds); None when its dates do not parse.
    pub validity: Option<(i64, i64)>,
    /// What is odd about the files though they load: a served certificate
    /// that is a CA's, a client CA that is no CA.
    pub warnings: Vec<String>,
}

/// Whether a DER certificate says it is a CA (basicConstraints CA:TRUE);
/// None when it does not parse.
fn is_ca(der: &[u8]) -> Option<bool> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(
        cert.basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca),
    )
}

/// Warn this long before a served certificate expires.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// The validity dates of a DER certificate (Unix seconds).
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// What a served certificate's dates say at `now`: expired, not yet valid,
/// or expiring within [`EXPIRY_WARNING_SECS`]; None when it is fine.
pub fn validity_warning(validity: (i64, i64), now: i64) -> Option<String> {
    let (not_before, not_after) = validity;
    let date = |t: i64| {
        // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
        let z = t.div_euclid(86_400) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}-{d:02}")
    };
    if now >= not_after {
        Some(format!(
            "the certificate expired on {} UTC: clients refuse it",
            date(not_after)
        ))
    } else if now < not_before {
        Some(format!(
            "the certificate is not valid before {} UTC: clients refuse it until then",
            date(not_before)
        ))
    } else if not_after - now < EXPIRY_WARNING_SECS {
        Some(format!(
            "the certificate expires on {} UTC, in {} day(s): renew it",
            date(not_after),
            (not_after - now) / 86_400
        ))
    } else {
        None
    }
}

/// Why a TLS file cannot be used. [`TlsError::key`] is the setting under
/// `server.tls` that names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not valid PEM: {error}", path.display())]
    NotPem {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("{}: the certificate does not parse: {error}", path.display())]
    BadCertificate { path: PathBuf, error: rustls::Error },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unsupported private key: {error}", path.display())]
    BadKey { path: PathBuf, error: rustls::Error },
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: not a usable CA certificate: {error}", path.display())]
    BadCa { path: PathBuf, error: rustls::Error },
}

impl TlsError {
    /// The setting (under `server.tls`) whose file is wrong.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Read { key, .. }
            | TlsError::NotPem { key, .. }
            | TlsError::NoCertificate { key, .. } => key,
            TlsError::BadCertificate { .. } => "cert_file",
            TlsError::NoKey { .. } | TlsError::BadKey { .. } | TlsError::Mismatch { .. } => {
                "key_file"
            }
            TlsError::BadCa { .. } => "client_ca_file",
        }
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        key,
        path: path.to_path_buf(),
        error,
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::NotPem {
            key,
            path: path.to_path_buf(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("key_file", path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|error| TlsError::NotPem {
            key: "key_file",
            path: path.to_path_buf(),
            error,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_path_buf(),
        })
}

/// Read and check the files of `tls`.
pub fn load(tls: &TlsConfig) -> Result<TlsMaterial, TlsError> {
    let chain = certs("cert_file", &tls.cert_file)?;
    let key = private_key(&tls.key_file)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::BadKey {
            path: tls.key_file.clone(),
            error,
        })?;
    let fingerprint = hex::encode(Sha256::digest(chain[0].as_ref()));
    let validity = validity(chain[0].as_ref());
    let mut warnings = Vec::new();
    if is_ca(chain[0].as_ref()) == Some(true) {
        warnings.push(format!(
            "{}: the served certificate is a CA certificate (basicConstraints CA:TRUE, as `openssl req -x509` makes by default): clients on rustls (webpki) refuse it as a server's, most others accept it; issue a server certificate (CA:FALSE) for production",
            tls.cert_file.display()
        ));
    }
    let certified_key = CertifiedKey::new(chain, signing);
    match certified_key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::Mismatch {
                key: tls.key_file.clone(),
                cert: tls.cert_file.clone(),
            })
        }
        Err(error) => {
            return Err(TlsError::BadCertificate {
                path: tls.cert_file.clone(),
                error,
            })
        }
    }
    let client_roots = match &tls.client_ca_file {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certs("client_ca_file", path)? {
                if is_ca(ca.as_ref()) == Some(false) {
                    warnings.push(format!(
                        "{}: a certificate in it is no CA (basicConstraints CA:FALSE or none): only a client presenting that very self-signed certificate passes, none it would have signed",
                        path.display()
                    ));
                }
                roots.add(ca).map_err(|error| TlsError::BadCa {
                    path: path.clone(),
                    error,
                })?;
            }
            Some(Arc::new(roots))
        }
    };
    Ok(TlsMaterial {
        certified_key: Arc::new(certified_key),
        client_roots,
        fingerprint,
        validity,
        warnings,
    })
}

/// Read a provider's `tls_ca_file`: a readable PEM bundle holding at least
/// one certificate, as the proxy requires when it builds the provider, so
/// that a file `serve` would refuse fails `smartllm check` and a reload.
pub(crate) fn ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs("tls_ca_file", path)
}

/// The files `tls` reads, with their settings (for the config's digest).
pub(crate) fn files(tls: &TlsConfig) -> Vec<(&'static str, &Path)> {
    let mut out = vec![
        ("cert_file", tls.cert_file.as_path()),
        ("key_file", tls.key_file.as_path()),
    ];
    if let Some(ca) = &tls.client_ca_file {
        out.push(("client_ca_file", ca.as_path()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificates_dates_are_read_and_warned_about() {
        let pem = include_bytes!("testdata/cert.pem");
        let der = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        // openssl x509 -startdate -enddate: Nov 30 00:47:25 2026 GMT and
        // Nov  6 00:47:25 2126 GMT.
        let v = validity(der.as_ref()).unwrap();
        assert_eq!(v, (1_795_999_645, 4_949_599_645));
        assert_eq!(validity_warning(v, 1_796_000_000), None);
        assert_eq!(
            validity_warning(v, v.1 + 1).unwrap(),
            "the certificate expired on 2126-11-06 UTC: clients refuse it"
        );
        assert_eq!(
            validity_warning(v, v.1 - 3 * 86_400 - 5).unwrap(),
            "the certificate expires on 2126-11-06 UTC, in 3 day(s): renew it"
        );
        assert_eq!(
            validity_warning(v, v.0 - 1).unwrap(),
            "the certificate is not valid before 2026-11-30 UTC: clients refuse it until then"
        );
        assert_eq!(validity(b"not a certificate"), None);
        // (openssl req -x509 marks it a CA.)
        assert_eq!(is_ca(der.as_ref()), Some(true));
        assert_eq!(is_ca(b"not a certificate"), None);
    }
}
