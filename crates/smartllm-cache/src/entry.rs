//! Cache entries as stored in RocksDB, optionally sealed with AES-256-GCM.
//!
//! Format: one tag byte, then either the entry's JSON (`PLAIN`) or a 96-bit
//! nonce from the OS random source followed by the AES-256-GCM ciphertext
//! (`SEALED`). A codec with a key writes sealed entries only and refuses plain
//! ones (they could have been written before the key was set, or by anyone who
//! can write the data dir: serving them would defeat the authentication). It
//! opens entries sealed with its current key or, after a rotation, with one of
//! its old keys; the caller re-seals those with the current key.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// When the answer was asked for, in milliseconds (entries stored
    /// before this field have none: their second counts). A purge covers
    /// an answer asked before it, on every gateway of the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_ms: Option<u64>,
    /// The tenant whose request it answered, for a purge of the tenant's
    /// entries (right to erasure). Entries stored before this field have
    /// none: only a purge of their namespace, route or everything removes
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Entry {
    /// When it was asked for, in milliseconds: `asked_ms`, or for an entry
    /// without it the last millisecond of its second (a purge in the same
    /// second lets it through, as before).
    pub fn asked_at_ms(&self) -> u64 {
        self.asked_ms
            .unwrap_or_else(|| self.created_at.saturating_add(1).saturating_mul(1000) - 1)
    }

    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("entry cannot be decrypted with cache.encryption_key_file or any of cache.encryption_old_key_files (sealed with another key, or corrupt)")]
    Decrypt,
    #[error("entry was stored unencrypted (before cache.encryption_key_file was set): not served")]
    Unsealed,
    #[error("entry is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "sealed without the place it belongs to (an earlier release's form, or moved): not used"
    )]
    Unbound,
    #[error("entry cannot be sealed: {0}")]
    Seal(String),
}

/// How a decoded entry was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// In the clear, read by a codec without a key.
    Plain,
    /// With the current key.
    Current,
    /// With one of the old keys: the caller should re-seal it.
    Old,
}

const PLAIN: u8 = 0;
const SEALED: u8 = 1;
/// Sealed with associated data naming its place ([`Codec::seal_bound`]).
const BOUND: u8 = 2;

/// Whether `bytes` were sealed bound to a place ([`Codec::seal_bound`]).
pub(crate) fn is_bound(bytes: &[u8]) -> bool {
    bytes.first() == Some(&BOUND)
}
const NONCE_LEN: usize = 12;

/// Encodes entries, sealing them when a key is configured.
#[derive(Clone)]
pub struct Codec {
    /// Seals every new entry, and is tried first when opening one.
    cipher: Option<Aes256Gcm>,
    /// Keys of earlier rotations: for opening entries only (empty without `cipher`).
    old: Vec<Aes256Gcm>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("encrypted", &self.cipher.is_some())
            .field("old_keys", &self.old.len())
            .finish()
    }
}

/// Why a key file cannot be used (`setting` names the config key).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{setting} {}: {error}", path.display())]
    Read {
        setting: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{setting} {}: {error}", path.display())]
    Hex {
        setting: String,
        path: PathBuf,
        error: hex::FromHexError,
    },
    #[error("{setting} {}: expected 32 raw bytes or 64 hex characters, found {len} bytes (make one with: openssl rand -hex 32)", path.display())]
    Length {
        setting: String,
        path: PathBuf,
        len: usize,
    },
}

/// Read a key file: 32 raw bytes, or 64 hex characters (whitespace ignored).
/// `setting` names the config key in errors.
fn read_key(path: &Path, setting: &str) -> Result<Aes256Gcm, KeyFileError> {
    let raw = std::fs::read(path).map_err(|error| KeyFileError::Read {
        setting: setting.to_string(),
        path: path.to_path_buf(),
        error,
    })?;
    let text = String::from_utf8_lossy(&raw);
    let hex_text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let key = if hex_text.len() == 64 && hex_text.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(&hex_text).map_err(|error| KeyFileError::Hex {
            setting: setting.to_string(),
            path: path.to_path_buf(),
            error,
        })?
    } else {
        raw
    };
    Aes256Gcm::new_from_slice(&key).map_err(|_| KeyFileError::Length {
        setting: setting.to_string(),
        path: path.to_path_buf(),
        len: key.len(),
    })
}

impl Codec {
    pub fn plain() -> Self {
        Codec {
            cipher: None,
            old: Vec::new(),
        }
    }

    /// Read a key file: 32 raw bytes, or 64 hex characters (whitespace ignored).
    pub fn from_key_file(path: &Path) -> Result<Self, KeyFileError> {
        Self::from_key_files(path, &[])
    }

    /// The current key (`cache.encryption_key_file`) seals new entries; the
    /// old ones (`cache.encryption_old_key_files`, same format) only open
    /// entries sealed before a rotation.
    pub fn from_key_files(current: &Path, old: &[PathBuf]) -> Result<Self, KeyFileError> {
        let cipher = read_key(current, "cache.encryption_key_file")?;
        let old = old
            .iter()
            .enumerate()
            .map(|(i, p)| read_key(p, &format!("cache.encryption_old_key_files[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Codec {
            cipher: Some(cipher),
            old,
        })
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Encode an entry: sealed with the current key under a fresh nonce from
    /// the OS random source when there is a key, else in the clear.
    pub fn encode(&self, entry: &Entry) -> Result<Vec<u8>, CodecError> {
        let json = serde_json::to_vec(entry).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        self.seal(json)
    }

    /// Seal any bytes as [`Codec::encode`] seals an entry (the Responses
    /// store's conversations are kept under the same key).
    pub fn seal(&self, json: Vec<u8>) -> Result<Vec<u8>, CodecError> {
        self.seal_with(SEALED, json, b"")
    }

    /// Seal bytes bound to `place` (AES-GCM associated data): they open
    /// only with the same `place` ([`Codec::unseal_bound`]), so sealed
    /// bytes moved elsewhere (another id, another entry) are refused, not
    /// read as that place's. Without a key, in the clear.
    pub fn seal_bound(&self, plain: Vec<u8>, place: &[u8]) -> Result<Vec<u8>, CodecError> {
        self.seal_with(BOUND, plain, place)
    }

    fn seal_with(&self, tag: u8, plain: Vec<u8>, aad: &[u8]) -> Result<Vec<u8>, CodecError> {
        let Some(c) = &self.cipher else {
            let mut out = Vec::with_capacity(1 + plain.len());
            out.push(PLAIN);
            out.extend(plain);
            return Ok(out);
        };
        // 96-bit random nonces: fine for far more than the 2^32 entries per
        // key NIST allows; a rotation starts a fresh key anyway.
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| CodecError::Seal(format!("the OS random source failed: {e}")))?;
        let payload = aes_gcm::aead::Payload {
            msg: plain.as_slice(),
            aad,
        };
        let sealed = c
            .encrypt(Nonce::from_slice(&nonce), payload)
            .map_err(|e| CodecError::Seal(e.to_string()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(tag);
        out.extend_from_slice(&nonce);
        out.extend(sealed);
        Ok(out)
    }

    /// The bytes [`Codec::seal_bound`] sealed for `place`, and how. Refused:
    /// plain bytes when there is a key (`Unsealed`), bytes sealed for
    /// another place (`Decrypt`), and bytes sealed unbound (`Unbound`: an
    /// earlier release's form, converted when the cache opens).
    pub fn unseal_bound(
        &self,
        bytes: &[u8],
        place: &[u8],
    ) -> Result<(Vec<u8>, Sealing), CodecError> {
        match bytes.first() {
            Some(&BOUND) => {}
            Some(&SEALED) => return Err(CodecError::Unbound),
            _ => return self.unseal(bytes),
        }
        let Some(c) = &self.cipher else {
            return Err(CodecError::Decrypt);
        };
        let rest = &bytes[1..];
        if rest.len() <= NONCE_LEN {
            return Err(CodecError::Decrypt);
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::from_slice(nonce);
        let payload = || aes_gcm::aead::Payload {
            msg: ct,
            aad: place,
        };
        if let Ok(plain) = c.decrypt(nonce, payload()) {
            return Ok((plain, Sealing::Current));
        }
        self.old
            .iter()
            .find_map(|o| o.decrypt(nonce, payload()).ok())
            .map(|plain| (plain, Sealing::Old))
            .ok_or(CodecError::Decrypt)
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Entry, CodecError> {
        self.open(bytes).map(|(e, _)| e)
    }

    /// Decode an entry and say how it was stored. With a key, plain entries
    /// are refused (`Unsealed`) and sealed ones open with the current key or
    /// an old one (`Sealing::Old`: re-seal it).
    pub fn open(&self, bytes: &[u8]) -> Result<(Entry, Sealing), CodecError> {
        let (json, sealing) = self.unseal(bytes)?;
        let entry =
            serde_json::from_slice(&json).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        Ok((entry, sealing))
    }

    /// The bytes [`Codec::seal`] sealed, and how: with a key, plain ones are
    /// refused (`Unsealed`).
    pub fn unseal(&self, bytes: &[u8]) -> Result<(Vec<u8>, Sealing), CodecError> {
        let (tag, rest) = bytes
            .split_first()
            .ok_or_else(|| CodecError::Corrupt("empty".into()))?;
        let (json, sealing) = match (*tag, &self.cipher) {
            (PLAIN, None) => (rest.to_vec(), Sealing::Plain),
            (PLAIN, Some(_)) => return Err(CodecError::Unsealed),
            (SEALED, Some(c)) if rest.len() > NONCE_LEN => {
                let (nonce, ct) = rest.split_at(NONCE_LEN);
                let nonce = Nonce::from_slice(nonce);
                if let Ok(json) = c.decrypt(nonce, ct) {
                    (json, Sealing::Current)
                } else {
                    let json = self
                        .old
                        .iter()
                        .find_map(|o| o.decrypt(nonce, ct).ok())
                        .ok_or(CodecError::Decrypt)?;
                    (json, Sealing::Old)
                }
            }
            (SEALED, _) => return Err(CodecError::Decrypt),
            // Bound to a place: only `unseal_bound` opens it.
            (BOUND, _) => return Err(CodecError::Decrypt),
            (t, _) => return Err(CodecError::Corrupt(format!("unknown format {t}"))),
        };
        Ok((json, sealing))
    }
}

/// The exact key (hex) of an entry stored in the clear, whatever the codec:
/// lets a keyed cache that refuses the entry also drop its exact-key pointer.
pub(crate) fn unsealed_exact(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Exact {
        exact: String,
    }
    match bytes.split_first() {
        Some((&PLAIN, json)) => serde_json::from_slice::<Exact>(json).ok().map(|e| e.exact),
        _ => None,
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
            asked_ms: None,
            tenant: None,
        }
    }

    /// Two key files (hex and raw) and a codec for each.
    fn keys(dir: &Path) -> (PathBuf, PathBuf) {
        let k1 = dir.join("k1");
        std::fs::write(
            &k1,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )
        .unwrap();
        let k2 = dir.join("k2");
        std::fs::write(&k2, [7u8; 32]).unwrap();
        (k1, k2)
    }

    #[test]
    fn sealed_round_trip_and_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = keys(dir.path());
        let c1 = Codec::from_key_file(&k1).unwrap();
        let c2 = Codec::from_key_file(&k2).unwrap();
        let bytes = c1.encode(&entry()).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("secret"),
            "plaintext at rest"
        );
        assert_eq!(c1.open(&bytes).unwrap(), (entry(), Sealing::Current));
        assert!(matches!(c2.decode(&bytes), Err(CodecError::Decrypt)));
        assert!(matches!(
            Codec::plain().decode(&bytes),
            Err(CodecError::Decrypt)
        ));
        // A flipped byte anywhere fails authentication.
        for i in 1..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(matches!(c1.decode(&bad), Err(CodecError::Decrypt)), "{i}");
        }
        assert_eq!(
            Codec::plain()
                .open(&Codec::plain().encode(&entry()).unwrap())
                .unwrap(),
            (entry(), Sealing::Plain)
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "too short").unwrap();
        assert!(Codec::from_key_file(&bad)
            .unwrap_err()
            .to_string()
            .contains("64 hex characters"));
        assert!(Codec::from_key_file(&dir.path().join("missing")).is_err());
    }

    /// Nonces come from the OS random source: a thousand encodings of the same
    /// entry never repeat a nonce (a constant or counter-seeded nonce would),
    /// the nonce bits look uniform, every one decodes, and none is drawn from
    /// fastrand.
    #[test]
    fn nonces_are_fresh_for_every_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, _) = keys(dir.path());
        let c = Codec::from_key_file(&k1).unwrap();
        let mut nonces = std::collections::HashSet::new();
        let mut ciphertexts = std::collections::HashSet::new();
        let mut ones = 0u32;
        for _ in 0..1_000 {
            let bytes = c.encode(&entry()).unwrap();
            assert_eq!(bytes[0], SEALED);
            let nonce: [u8; NONCE_LEN] = bytes[1..1 + NONCE_LEN].try_into().unwrap();
            ones += nonce.iter().map(|b| b.count_ones()).sum::<u32>();
            assert!(nonces.insert(nonce), "nonce reused: {nonce:?}");
            ciphertexts.insert(bytes[1 + NONCE_LEN..].to_vec());
            assert_eq!(c.decode(&bytes).unwrap(), entry());
        }
        assert_eq!(ciphertexts.len(), 1_000);
        // Not from fastrand's seedable (predictable) generator: sealing leaves
        // its state alone.
        fastrand::seed(7);
        let next = fastrand::u64(..);
        fastrand::seed(7);
        c.encode(&entry()).unwrap();
        assert_eq!(fastrand::u64(..), next, "nonces drawn from fastrand");
        // 96,000 nonce bits: about half set (5 standard deviations is ±775).
        let bits = 1_000 * NONCE_LEN as u32 * 8;
        assert!(ones.abs_diff(bits / 2) < 775, "{ones} of {bits} bits set");
    }

    /// With a key, an entry stored in the clear is refused, not served; its
    /// exact key is still readable so the cache can drop its pointer.
    #[test]
    fn a_keyed_codec_refuses_plain_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, _) = keys(dir.path());
        let plain = Codec::plain().encode(&entry()).unwrap();
        let keyed = Codec::from_key_file(&k1).unwrap();
        assert!(matches!(keyed.decode(&plain), Err(CodecError::Unsealed)));
        assert_eq!(unsealed_exact(&plain).as_deref(), Some("ex"));
        assert_eq!(unsealed_exact(&keyed.encode(&entry()).unwrap()), None);
    }

    /// Rotation: old keys open what they sealed (reported as `Old`, so it gets
    /// re-sealed); new entries are sealed with the current key only (a codec
    /// holding just the old key cannot open them); an unknown key opens
    /// nothing.
    #[test]
    fn rotation_reads_old_keys_and_writes_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = keys(dir.path());
        let c = dir.path().join("k3");
        std::fs::write(&c, "ff".repeat(32)).unwrap();
        let only_a = Codec::from_key_file(&a).unwrap();
        let sealed_a = only_a.encode(&entry()).unwrap();
        let rotated = Codec::from_key_files(&b, std::slice::from_ref(&a)).unwrap();
        assert_eq!(rotated.open(&sealed_a).unwrap(), (entry(), Sealing::Old));
        let sealed_b = rotated.encode(&entry()).unwrap();
        assert_eq!(
            rotated.open(&sealed_b).unwrap(),
            (entry(), Sealing::Current)
        );
        assert!(matches!(only_a.decode(&sealed_b), Err(CodecError::Decrypt)));
        assert_eq!(
            Codec::from_key_file(&b).unwrap().decode(&sealed_b).unwrap(),
            entry()
        );
        // Only B: what A sealed is refused.
        assert!(matches!(
            Codec::from_key_file(&b).unwrap().decode(&sealed_a),
            Err(CodecError::Decrypt)
        ));
        // A wrong key, current or old, opens nothing.
        let wrong = Codec::from_key_files(&c, std::slice::from_ref(&b)).unwrap();
        assert!(matches!(wrong.decode(&sealed_a), Err(CodecError::Decrypt)));
        // Several old keys: each is tried.
        let many = Codec::from_key_files(&c, &[b.clone(), a.clone()]).unwrap();
        assert_eq!(many.open(&sealed_a).unwrap().1, Sealing::Old);
        assert_eq!(many.open(&sealed_b).unwrap().1, Sealing::Old);
        // A bad old key file is named by its position.
        let err = Codec::from_key_files(&b, &[a.clone(), dir.path().join("missing")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cache.encryption_old_key_files[1] "),
            "{err}"
        );
    }
}
