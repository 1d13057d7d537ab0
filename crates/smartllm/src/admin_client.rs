//! The CLI's client of the running gateway's admin listener: where it is
//! (`--config` / `--admin`), how to authenticate (`--admin-token` or the
//! config's admin token), and one HTTP/1.1 request per call (over TLS when
//! the config sets `server.admin_tls`, see `admin_tls`).

use anyhow::Context;
use std::path::{Path, PathBuf};

// Which running gateway a command talks to (flattened into `costs` and `cache`).
// A plain comment: a doc comment here would become clap `about` text.
#[derive(clap::Args)]
pub struct AdminTarget {
    /// Config directory of the running gateway (its admin_listen is used).
    #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
    config: PathBuf,
    /// Admin address, overriding the config's (host:port).
    #[arg(long)]
    admin: Option<String>,
    /// Admin API token (default: the config's admin.token_env / admin.token_file).
    #[arg(long, env = "SMARTLLM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Client certificate (PEM) for an admin listener with `server.admin_tls.client_ca_file`.
    #[arg(long, env = "SMARTLLM_ADMIN_CERT", requires = "admin_key")]
    admin_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "SMARTLLM_ADMIN_KEY", requires = "admin_cert")]
    admin_key: Option<PathBuf>,
}

/// One request to the admin listener (HTTP/1.1; TLS with `server.admin_tls`).
pub fn admin_call(target: &AdminTarget, method: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let config = smartllm_config::load_dir(&target.config).ok();
    let addr = match (&target.admin, &config) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.server.admin_listen.to_string(),
        (None, None) => smartllm_config::load_dir(&target.config)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .server
            .admin_listen
            .to_string(),
    };
    let token =
        target
            .admin_token
            .clone()
            .or_else(|| match config.as_ref().map(|c| &c.admin_token) {
                Some(smartllm_config::ApiKeySource::Env(var)) => std::env::var(var)
                    .ok()
                    .or_else(|| env_file_value(Path::new(SERVICE_ENV_FILE), var)),
                Some(smartllm_config::ApiKeySource::File(f)) => std::fs::read_to_string(f)
                    .ok()
                    .map(|t| t.trim().to_string()),
                _ => None,
            });
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let tcp = std::net::TcpStream::connect(&addr).with_context(|| {
        format!("connecting to the admin listener at {addr} (is smartllm running?)")
    })?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    match config.as_ref().and_then(|c| c.server.admin_tls.as_ref()) {
        Some(tls) => {
            let client = target
                .admin_cert
                .as_deref()
                .zip(target.admin_key.as_deref());
            let mut s = crate::admin_tls::connect(tcp, tls, client)?;
            s.write_all(request.as_bytes())
                .with_context(|| format!("TLS to the admin listener at {addr}"))?;
            // A server that closes without close_notify still sent the answer.
            if let Err(e) = s.read_to_end(&mut raw) {
                if raw.is_empty() {
                    return Err(e).with_context(|| format!("TLS to the admin listener at {addr}"));
                }
            }
        }
        None => {
            let mut s = tcp;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if !(200..300).contains(&status) {
        anyhow::bail!("admin API answered {status}: {}", body.trim());
    }
    Ok(body.trim().to_string())
}

/// The service's environment file (the unit's `EnvironmentFile`): where a
/// packaged install keeps `SMARTLLM_ADMIN_TOKEN`, which only systemd reads.
const SERVICE_ENV_FILE: &str = "/etc/default/smartllm";

/// `var`'s value in an environment file of `VAR=value` lines (quotes and an
/// `export ` prefix allowed, comments skipped), as systemd reads it: the
/// last assignment wins.
fn env_file_value(path: &Path, var: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find_map(|l| {
        let l = l.trim();
        let l = l.strip_prefix("export ").unwrap_or(l);
        let (k, v) = l.split_once('=')?;
        if k.trim() != var || l.starts_with('#') {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v);
        (!v.is_empty()).then(|| v.to_string())
    })
}

#[cfg(test)]
mod env_file_tests {
    use super::*;

    #[test]
    fn the_services_environment_file_is_read_as_systemd_reads_it() {
        let path = std::env::temp_dir().join(format!("smartllm-env-{}", std::process::id()));
        std::fs::write(
            &path,
            "# SMARTLLM_ADMIN_TOKEN=commented\nSMARTLLM_ADMIN_TOKEN=old\nOPENAI_API_KEY=sk-x\nSMARTLLM_ADMIN_TOKEN=\"tok en\"\nexport OTHER='q'\nEMPTY=\n",
        )
        .unwrap();
        assert_eq!(
            env_file_value(&path, "SMARTLLM_ADMIN_TOKEN").as_deref(),
            Some("tok en")
        );
        assert_eq!(env_file_value(&path, "OTHER").as_deref(), Some("q"));
        assert_eq!(env_file_value(&path, "EMPTY"), None);
        assert_eq!(env_file_value(&path, "MISSING"), None);
        let _ = std::fs::remove_file(&path);
    }
}
