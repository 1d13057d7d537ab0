//! The saved IVF index under the cache key (`cache.encryption_key_file`).
//! FAISS reads and writes only files, and a sealed cache must never put its
//! index on disk in the clear: the index is written to an in-memory file
//! (`memfd`) and sealed from there in chunks of [`CHUNK`] bytes, each with
//! AES-256-GCM under its own nonce and numbered (its place and the count),
//! so that none can be dropped, repeated or reordered unseen; reading does
//! the reverse. Memory: the serialized index in the memfd (as large as the
//! index; swappable like any anonymous memory) while saving or loading,
//! plus one chunk.

use crate::{Codec, IndexError, Sealing, VectorIndex};
use std::fs::File;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first bytes of a sealed index file.
const MAGIC: &[u8; 8] = b"SLMIVF01";
/// Plaintext bytes per sealed chunk.
pub(crate) const CHUNK: usize = 16 << 20;
/// A chunk's header: its number and the number of chunks.
const HEADER: usize = 16;
/// What sealing adds to a chunk (format tag, nonce, tag), at most.
const SEAL_OVERHEAD: usize = 64;

/// An anonymous file in memory, which FAISS can open by its `/proc` path.
struct MemFile(File);

impl MemFile {
    #[allow(unsafe_code)]
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create takes a NUL-terminated name and flags and
        // returns a new descriptor (or -1), which the File then owns.
        let fd = unsafe { libc::memfd_create(c"smartllm-ivf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor just opened and owned by nobody else.
        Ok(MemFile(unsafe { File::from_raw_fd(fd) }))
    }

    fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> IndexError {
    IndexError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Write `index` (an IVF one; false for a flat one, which is not saved)
/// sealed to `path`, atomically (a temporary file, then a rename).
pub(crate) fn write(index: &VectorIndex, codec: &Codec, path: &Path) -> Result<bool, IndexError> {
    write_chunked(index, codec, path, CHUNK)
}

fn write_chunked(
    index: &VectorIndex,
    codec: &Codec,
    path: &Path,
    chunk: usize,
) -> Result<bool, IndexError> {
    let err = |e: &dyn std::fmt::Display| file_err(path, e);
    let mem = MemFile::new().map_err(|e| err(&e))?;
    if !index.write_ivf_to(&mem.path())? {
        return Ok(false);
    }
    let len = mem.0.metadata().map_err(|e| err(&e))?.len() as usize;
    let chunks = len.div_ceil(chunk).max(1);
    let tmp = path.with_extension("tmp");
    let written = (|| -> Result<(), IndexError> {
        let mut out = BufWriter::new(File::create(&tmp).map_err(|e| err(&e))?);
        out.write_all(MAGIC).map_err(|e| err(&e))?;
        let mut src = &mem.0;
        src.seek(SeekFrom::Start(0)).map_err(|e| err(&e))?;
        let mut left = len;
        for i in 0..chunks {
            let n = left.min(chunk);
            let mut plain = Vec::with_capacity(HEADER + n);
            plain.extend_from_slice(&(i as u64).to_be_bytes());
            plain.extend_from_slice(&(chunks as u64).to_be_bytes());
            plain.resize(HEADER + n, 0);
            src.read_exact(&mut plain[HEADER..]).map_err(|e| err(&e))?;
            left -= n;
            let sealed = codec.seal(plain).map_err(|e| err(&e))?;
            out.write_all(&(sealed.len() as u64).to_be_bytes())
                .map_err(|e| err(&e))?;
            out.write_all(&sealed).map_err(|e| err(&e))?;
        }
        out.into_inner()
            .map_err(|e| err(&e))?
            .sync_all()
            .map_err(|e| err(&e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| err(&e))?;
    Ok(true)
}

/// Read an index [`write`] sealed, and whether it was sealed with an old
/// key (then it should be written again). A file in the clear, or sealed
/// with a key not here, or damaged, is an error.
pub(crate) fn read(
    codec: &Codec,
    path: &Path,
    dim: usize,
) -> Result<(VectorIndex, bool), IndexError> {
    read_chunked(codec, path, dim, CHUNK)
}

fn read_chunked(
    codec: &Codec,
    path: &Path,
    dim: usize,
    chunk: usize,
) -> Result<(VectorIndex, bool), IndexError> {
    let err = |e: &dyn std::fmt::Display| file_err(path, e);
    let mut f = BufReader::new(File::open(path).map_err(|e| err(&e))?);
    let mut magic = [0u8; MAGIC.len()];
    if f.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(err(
            &"is not sealed with the cache key (written before the key was set?)",
        ));
    }
    let mem = MemFile::new().map_err(|e| err(&e))?;
    let mut dst = &mem.0;
    let (mut next, mut count, mut old) = (0u64, None, false);
    loop {
        let mut len = [0u8; 8];
        match f.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(err(&e)),
        }
        let len = u64::from_be_bytes(len) as usize;
        if len > HEADER + chunk + SEAL_OVERHEAD {
            return Err(err(&"is damaged (a chunk too large)"));
        }
        let mut sealed = vec![0u8; len];
        f.read_exact(&mut sealed).map_err(|e| err(&e))?;
        let (plain, sealing) = codec
            .unseal(&sealed)
            .map_err(|e| err(&format!("cannot be opened ({e})")))?;
        old |= sealing == Sealing::Old;
        let (header, body) = plain
            .split_at_checked(HEADER)
            .ok_or_else(|| err(&"is damaged (a chunk without its header)"))?;
        let at = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let of = u64::from_be_bytes(header[8..].try_into().expect("8 bytes"));
        if at != next || *count.get_or_insert(of) != of {
            return Err(err(&"is damaged (chunks out of order)"));
        }
        dst.write_all(body).map_err(|e| err(&e))?;
        next += 1;
    }
    if count != Some(next) {
        return Err(err(&"is damaged (chunks missing)"));
    }
    let index = VectorIndex::read_ivf(&mem.path(), dim)?;
    Ok((index, old))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(dim: usize, n: usize) -> (VectorIndex, Vec<f32>) {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut data = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let v: Vec<f32> = (0..dim).map(|_| rng.f32() - 0.5).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            data.extend(v.into_iter().map(|x| x / norm));
        }
        let ids: Vec<u64> = (0..n as u64).collect();
        (VectorIndex::train_ivf(dim, &data, &ids).unwrap(), data)
    }

    /// Written sealed in chunks, read back the same (searches find the
    /// same ids); in the clear or under another key it cannot be read, nor
    /// with a chunk dropped, repeated or moved.
    #[test]
    fn a_sealed_index_round_trips_and_tampering_shows() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (dir.path().join("k1"), dir.path().join("k2"));
        std::fs::write(&k1, "11".repeat(32)).unwrap();
        std::fs::write(&k2, "22".repeat(32)).unwrap();
        let codec = Codec::from_key_file(&k1).unwrap();
        let dim = 32;
        let (ivf, data) = index(dim, 2000);
        let path = dir.path().join("index.faiss");
        let chunk = 4096;
        assert!(write_chunked(&ivf, &codec, &path, chunk).unwrap());
        let file = std::fs::read(&path).unwrap();
        assert!(file.starts_with(MAGIC));
        assert!(
            VectorIndex::read_ivf(&path, dim).is_err(),
            "not a FAISS file"
        );
        let (back, old) = read_chunked(&codec, &path, dim, chunk).unwrap();
        assert!(!old);
        assert_eq!(back.len(), 2000);
        for q in [0usize, 777, 1999] {
            let query = &data[q * dim..(q + 1) * dim];
            assert_eq!(
                back.search(query, 3).unwrap(),
                ivf.search(query, 3).unwrap()
            );
        }
        // Another key: no; the old key among the old ones: yes, said so.
        let other = Codec::from_key_file(&k2).unwrap();
        assert!(read_chunked(&other, &path, dim, chunk).is_err());
        let rotated = Codec::from_key_files(&k2, std::slice::from_ref(&k1)).unwrap();
        assert!(read_chunked(&rotated, &path, dim, chunk).unwrap().1);
        // The chunks, as (offset, length) past the magic.
        let mut chunks = Vec::new();
        let mut at = MAGIC.len();
        while at < file.len() {
            let len = u64::from_be_bytes(file[at..at + 8].try_into().unwrap()) as usize;
            chunks.push(file[at..at + 8 + len].to_vec());
            at += 8 + len;
        }
        assert!(chunks.len() > 3, "{}", chunks.len());
        let tampered = |parts: Vec<Vec<u8>>| {
            let mut f = MAGIC.to_vec();
            f.extend(parts.concat());
            std::fs::write(&path, f).unwrap();
            read_chunked(&codec, &path, dim, chunk).is_err()
        };
        let mut dropped = chunks.clone();
        dropped.pop();
        assert!(tampered(dropped), "the last chunk dropped");
        let mut swapped = chunks.clone();
        swapped.swap(1, 2);
        assert!(tampered(swapped), "two chunks swapped");
        let mut repeated = chunks.clone();
        repeated.insert(2, chunks[1].clone());
        assert!(tampered(repeated), "a chunk repeated");
        assert!(!tampered(chunks), "the file as written");
    }
}
