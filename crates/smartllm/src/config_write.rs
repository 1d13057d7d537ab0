//! How the CLI replaces a file of a config directory (`keys create`, `cache
//! calibrate --write`, `profile run`): the new text goes to a hidden file
//! of its own (the config watcher skips hidden names; the process id keeps
//! two runs apart), takes the owner, group and mode of the file it replaces
//! (or, for a new file, of `smartllm.yaml` beside it: packages install the
//! config root:smartllm 0640, which the service must still read whatever
//! the operator's umask), and is renamed over it in one step, so a running
//! gateway reloads the old file or the new one, never half of one.

use anyhow::Context;
use std::path::Path;

/// Replace `path` with `text` as described above. The temporary file is
/// made 0600 (a key list is never readable by others, even for a moment),
/// synced before the rename and the directory after it (a power cut leaves
/// the old file or the new one), and removed on any failure.
pub fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    write_replacing(path, text, true)
}

/// `replace` for a file that holds no secret (a trained router model): a
/// new one with no file beside it to take after is 0644 (less the umask),
/// and an owner the caller may not give it (not root) is left as it is. A
/// symbolic link is replaced, not followed (such files may lie in a
/// directory the service can write).
pub fn replace_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write_replacing(path, text, false)
}

fn write_replacing(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A file that is a symbolic link (one key list shared by a fleet's
    // config directories) is replaced where it lies: the link stays a link,
    // and every directory that shares it sees the change.
    let target = if secret { linked_target(path)? } else { None };
    let path = target.as_deref().unwrap_or(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a config file needs a name")?;
    let tmp = dir.join(format!(".{name}.{}.new", std::process::id()));
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let _ = std::fs::remove_file(&tmp);
    let mut cleanup = Cleanup(&tmp, false);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    let like = std::fs::metadata(path)
        .or_else(|_| std::fs::metadata(dir.join(smartllm_config::MAIN_FILE)));
    if let Ok(meta) = like {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // A public file is readable by all whatever it replaces (a model an
        // older version wrote 0600, or an owner the caller cannot give it).
        let mut mode = meta.permissions();
        if !secret {
            mode.set_mode(mode.mode() | 0o044);
        }
        let owned = std::fs::set_permissions(&tmp, mode)
            .and_then(|()| std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid())));
        match owned {
            Ok(()) => {}
            Err(e) if !secret && e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "giving {} the owner and mode of the config it replaces",
                        path.display()
                    )
                })
            }
        }
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    cleanup.1 = true;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The file `path` links to, when it is a symbolic link the CLI follows:
/// one its owner made (root, or the target's own owner). A link someone
/// else planted to another owner's file is refused, not followed (root
/// would overwrite that file). None: not a link.
fn linked_target(path: &Path) -> anyhow::Result<Option<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let Ok(link) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    if !link.file_type().is_symlink() {
        return Ok(None);
    }
    let target = std::fs::canonicalize(path).with_context(|| {
        format!(
            "{} is a symbolic link to a file that cannot be read",
            path.display()
        )
    })?;
    let owner = std::fs::metadata(&target)
        .with_context(|| format!("reading {}", target.display()))?
        .uid();
    // The directory the file is replaced in (and locked in) must be as
    // trusted as the config directory: owned by root or by the config
    // directory's owner, and writable by no one else (who could swap it
    // for a link between the check and the write).
    let admin = path
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .map_or(0, |m| m.uid());
    if let Some(dir) = target.parent() {
        let m = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if (m.uid() != 0 && m.uid() != admin) || m.mode() & 0o022 != 0 {
            anyhow::bail!(
                "{} links into {}, which is not owned by root or the config directory's owner, or is writable by others: not followed",
                path.display(),
                dir.display()
            );
        }
    }
    if link.uid() != 0 && link.uid() != owner {
        anyhow::bail!(
            "{} is a symbolic link owned by uid {} to {}, owned by uid {owner}: not followed (make the link as the file's owner or root)",
            path.display(),
            link.uid(),
            target.display()
        );
    }
    Ok(Some(target))
}

/// [`lock`] on the directory of the file `path` links to, when it is a
/// link out of its own directory (a key list shared by several config
/// directories): two CLIs editing it through two directories take turns.
/// Taken after the config directory's own lock, so the order is always
/// the same. None: not a link, or one within the same directory.
pub fn lock_linked(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let Some(target) = linked_target(path)? else {
        return Ok(None);
    };
    let (Some(dir), Some(own)) = (target.parent(), path.parent()) else {
        return Ok(None);
    };
    let own = std::fs::canonicalize(own).unwrap_or_else(|_| own.to_path_buf());
    if dir == own {
        return Ok(None);
    }
    lock(dir).map(Some)
}

/// An exclusive lock on `dir`'s CLI edits (a hidden `.smartllm.lock`), held
/// until the returned file is dropped: two `keys create` at once (an
/// Ansible loop) each add their key, neither loses the other's.
pub fn lock(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(".smartllm.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_replaced_file_keeps_its_mode_and_a_new_one_takes_the_configs() {
        let dir =
            std::env::temp_dir().join(format!("smartllm-config-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Dir(dir);
        let main = dir.path().join(smartllm_config::MAIN_FILE);
        std::fs::write(&main, "x: 1\n").unwrap();
        std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o640)).unwrap();
        let cache = dir.path().join("cache.yaml");
        std::fs::write(&cache, "old\n").unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o600)).unwrap();
        replace(&cache, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&cache).unwrap(), "new\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o600);
        let profiles = dir.path().join("profiles.yaml");
        replace(&profiles, "p\n").unwrap();
        assert_eq!(mode(&profiles), 0o640);
        // Nothing left behind but the files themselves.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".new"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        let _held = lock(dir.path()).unwrap();
        assert!(std::fs::File::open(dir.path().join(".smartllm.lock"))
            .unwrap()
            .try_lock()
            .is_err());
    }

    /// A config file that is a symbolic link (a fleet's shared key list)
    /// stays one: the file it points to is replaced.
    #[test]
    fn a_linked_file_is_replaced_where_it_lies() {
        let dir = std::env::temp_dir().join(format!("smartllm-linked-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let dir = Dir(dir);
        let shared = dir.path().join("shared/keys.yaml");
        std::fs::write(&shared, "old\n").unwrap();
        let link = dir.path().join("conf/keys.yaml");
        std::os::unix::fs::symlink("../shared/keys.yaml", &link).unwrap();
        replace(&link, "new\n").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "new\n");
        // Not into a directory others may write (they could swap it).
        let shared_dir = dir.path().join("shared");
        std::fs::set_permissions(&shared_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(replace(&link, "open\n").is_err());
        std::fs::set_permissions(&shared_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "new\n");
        // Two directories editing it take turns on the target's directory.
        let held = lock_linked(&link).unwrap().expect("a lock on shared/");
        assert!(
            std::fs::File::open(dir.path().join("shared/.smartllm.lock"))
                .unwrap()
                .try_lock()
                .is_err()
        );
        drop(held);
        // A link another user planted to this one's file is not followed
        // (only when the test may give the link another owner: root).
        if std::os::unix::fs::lchown(&link, Some(4242), None).is_ok() {
            assert!(replace(&link, "planted\n").is_err());
            assert_eq!(std::fs::read_to_string(&shared).unwrap(), "new\n");
        }
        // A file with no secret is replaced, not followed.
        let public = dir.path().join("conf/router.json");
        std::os::unix::fs::symlink("../shared/keys.yaml", &public).unwrap();
        replace_public(&public, "{}").unwrap();
        assert!(!std::fs::symlink_metadata(&public)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "new\n");
        // A link to nothing is an error, not a file put in its place.
        let dangling = dir.path().join("conf/cache.yaml");
        std::os::unix::fs::symlink("../shared/missing.yaml", &dangling).unwrap();
        assert!(replace(&dangling, "x").is_err());
        assert!(std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    /// A file with no secret and nothing beside it to take after is
    /// readable by others (0644 less the umask), not 0600.
    #[test]
    fn a_public_file_is_readable_by_the_service() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(format!("smartllm-public-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Dir(dir);
        let probe = dir.path().join("probe");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o777)
            .open(&probe)
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let allowed = mode(&probe);
        let router = dir.path().join("router.json");
        replace_public(&router, "{}").unwrap();
        assert_eq!(mode(&router), 0o644 & allowed);
        // One an older version wrote 0600 becomes readable too.
        std::fs::set_permissions(&router, std::fs::Permissions::from_mode(0o600)).unwrap();
        replace_public(&router, "{\"v\": 2}").unwrap();
        assert_eq!(mode(&router), 0o644);
        let secret = dir.path().join("keys.yaml");
        replace(&secret, "k").unwrap();
        assert_eq!(mode(&secret), 0o600);
    }
}
