//! Cache entries as stored in RocksDB, optionally sealed with AES-256-GCM.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    /// hex of the namespace hash
    pub namespace: String,
    /// hex of the exact key
    pub exact: String,
    /// The last user turn the answer was for.
    pub query: String,
    /// The answer, as an OpenAI `chat.completion` JSON document.
    pub response: String,
    pub route: String,
    pub model: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub version: u32,
}

impl Entry {
    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("entry cannot be decrypted (wrong cache.encryption_key_file, or corrupt)")]
    Decrypt,
    #[error("entry is corrupt: {0}")]
    Corrupt(String),
}

const PLAIN: u8 = 0;
const SEALED: u8 = 1;

/// Encodes entries, sealing them when a key is configured.
#[derive(Clone)]
pub struct Codec {
    cipher: Option<Aes256Gcm>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

impl Codec {
    pub fn plain() -> Self {
        Codec { cipher: None }
    }

    /// Read a key file: 32 raw bytes, or 64 hex characters (whitespace ignored).
    pub fn from_key_file(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("cache.encryption_key_file {}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&raw);
        let hex_text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let key = if hex_text.len() == 64 && hex_text.chars().all(|c| c.is_ascii_hexdigit()) {
            hex::decode(&hex_text)
                .map_err(|e| format!("cache.encryption_key_file {}: {e}", path.display()))?
        } else if raw.len() == 32 {
            raw
        } else {
            return Err(format!(
                "cache.encryption_key_file {}: expected 32 raw bytes or 64 hex characters, found {} bytes (make one with: openssl rand -hex 32)",
                path.display(),
                raw.len()
            ));
        };
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|e| format!("cache.encryption_key_file: {e}"))?;
        Ok(Codec {
            cipher: Some(cipher),
        })
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    pub fn encode(&self, entry: &Entry) -> Vec<u8> {
        let json = serde_json::to_vec(entry).unwrap_or_default();
        match &self.cipher {
            None => {
                let mut out = vec![PLAIN];
                out.extend(json);
                out
            }
            Some(c) => {
                let nonce: [u8; 12] = std::array::from_fn(|_| fastrand::u8(..));
                // Encryption of an in-memory buffer with a valid key cannot fail.
                let sealed = c
                    .encrypt(Nonce::from_slice(&nonce), json.as_slice())
                    .unwrap_or_default();
                let mut out = Vec::with_capacity(1 + 12 + sealed.len());
                out.push(SEALED);
                out.extend_from_slice(&nonce);
                out.extend(sealed);
                out
            }
        }
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Entry, CodecError> {
        let (tag, rest) = bytes
            .split_first()
            .ok_or_else(|| CodecError::Corrupt("empty".into()))?;
        let json = match (*tag, &self.cipher) {
            (PLAIN, _) => rest.to_vec(),
            (SEALED, Some(c)) if rest.len() > 12 => {
                let (nonce, ct) = rest.split_at(12);
                c.decrypt(Nonce::from_slice(nonce), ct)
                    .map_err(|_| CodecError::Decrypt)?
            }
            (SEALED, _) => return Err(CodecError::Decrypt),
            (t, _) => return Err(CodecError::Corrupt(format!("unknown format {t}"))),
        };
        serde_json::from_slice(&json).map_err(|e| CodecError::Corrupt(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            id: 7,
            namespace: "ns".into(),
            exact: "ex".into(),
            query: "secret question".into(),
            response: "{\"answer\":\"secret answer\"}".into(),
            route: "auto".into(),
            model: "m".into(),
            created_at: 1,
            expires_at: 10,
            version: 1,
        }
    }

    #[test]
    fn sealed_round_trip_and_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = dir.path().join("k1");
        std::fs::write(
            &k1,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )
        .unwrap();
        let k2 = dir.path().join("k2");
        std::fs::write(&k2, [7u8; 32]).unwrap();
        let c1 = Codec::from_key_file(&k1).unwrap();
        let c2 = Codec::from_key_file(&k2).unwrap();
        let bytes = c1.encode(&entry());
        assert!(
            !String::from_utf8_lossy(&bytes).contains("secret"),
            "plaintext at rest"
        );
        assert_eq!(c1.decode(&bytes).unwrap(), entry());
        assert!(matches!(c2.decode(&bytes), Err(CodecError::Decrypt)));
        assert!(matches!(
            Codec::plain().decode(&bytes),
            Err(CodecError::Decrypt)
        ));
        assert!(Codec::plain()
            .decode(&Codec::plain().encode(&entry()))
            .is_ok());
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "too short").unwrap();
        assert!(Codec::from_key_file(&bad)
            .unwrap_err()
            .contains("64 hex characters"));
        assert!(Codec::from_key_file(&dir.path().join("missing")).is_err());
    }
}
