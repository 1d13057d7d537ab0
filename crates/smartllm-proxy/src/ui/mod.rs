//! The cost dashboard on the admin listener: `/ui`, a page, a stylesheet and
//! a script built into the binary (no CDN, no build step), which poll the
//! admin JSON API from the browser.
//!
//! With an admin token, a browser cannot send `Authorization`, so `/ui` takes
//! the token once — from a login form (`POST /ui/login`) or `/ui?token=...` —
//! and answers with an HttpOnly, SameSite=Strict session cookie holding when
//! it was issued and a hash of that time with the token (never the token
//! itself). The server ends a session after `SESSION_SECS` whatever the
//! browser keeps (a copied cookie stops working too), and a new token ends
//! every session. The
//! cookie admits only `GET` requests to `/admin/*`: everything that changes
//! state still needs the bearer token, so a cookie cannot be used for a
//! cross-site write. The page's script never sees the token or the cookie.

use http::Response;
use sha2::{Digest, Sha256};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");
const LOGIN: &str = include_str!("login.html");

/// The session cookie's name.
pub const COOKIE: &str = "smartllm_admin";
/// How long a session lasts (seconds).
const SESSION_SECS: u64 = 12 * 3600;

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the cookie holds for `token`, issued at `issued` (Unix seconds):
/// `ISSUED.HASH`, so the cookie never carries the token itself and its time
/// cannot be changed without the token.
pub fn session_value(token: &str, issued: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"smartllm-ui-session\0");
    h.update(issued.to_string().as_bytes());
    h.update(b"\0");
    h.update(token.as_bytes());
    format!("{issued}.{}", hex::encode(h.finalize()))
}

/// Does the request carry a valid session cookie for `token`?
pub fn cookie_ok(headers: &http::HeaderMap, token: &str) -> bool {
    cookie_ok_at(headers, token, now_secs())
}

/// `cookie_ok` at `now` (Unix seconds): the hash matches and the session
/// was issued at most `SESSION_SECS` ago (and not in the future, beyond a
/// minute of clock step).
fn cookie_ok_at(headers: &http::HeaderMap, token: &str, now: u64) -> bool {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(k, _)| *k == COOKIE)
        .any(|(_, v)| {
            let Some(issued) = v.split_once('.').and_then(|(t, _)| t.parse::<u64>().ok()) else {
                return false;
            };
            issued <= now.saturating_add(60)
                && now.saturating_sub(issued) <= SESSION_SECS
                && crate::admin::constant_time_eq(
                    v.as_bytes(),
                    session_value(token, issued).as_bytes(),
                )
        })
}

fn send(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response<Vec<u8>> {
    let body = body.into();
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        )
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

const HTML: &str = "text/html; charset=utf-8";

/// The sign-in form (401), saying so when a token was given and was wrong.
fn login_page(wrong: bool) -> Response<Vec<u8>> {
    if wrong {
        let note = "<p class=\"error\" role=\"alert\">That is not this gateway's admin token.</p>";
        send(401, HTML, LOGIN.replace("<!--error-->", note))
    } else {
        send(401, HTML, LOGIN)
    }
}

fn redirect(set_cookie: Option<String>) -> Response<Vec<u8>> {
    let mut b = Response::builder()
        .status(303)
        .header("location", "/ui")
        .header("content-length", 0)
        .header("cache-control", "no-store")
        .header("referrer-policy", "no-referrer");
    if let Some(c) = set_cookie {
        b = b.header("set-cookie", c);
    }
    b.body(Vec::new())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn cookie(value: &str, max_age: u64, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Whether the request is for the dashboard.
pub fn is_ui(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// A dashboard request. `authorized`: the bearer token or a session cookie
/// (always, without an admin token); `token`: the admin token, if any;
/// `secure`: the admin listener speaks TLS (the cookie is then `Secure`).
pub fn serve(
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    authorized: bool,
    token: Option<&str>,
    secure: bool,
) -> Response<Vec<u8>> {
    match (method, path) {
        // Static assets hold no data: the login page needs the stylesheet.
        ("GET", "/ui/app.css") => send(200, "text/css; charset=utf-8", STYLE),
        ("GET", "/ui/app.js") => send(200, "text/javascript; charset=utf-8", SCRIPT),
        ("GET", "/ui" | "/ui/") => {
            let Some(token) = token else {
                return send(200, HTML, INDEX);
            };
            // `/ui?token=...`: swap the token for a cookie and drop it from the URL.
            if let Some(given) = smartllm_protocol::admin_query::form_value(query, "token") {
                return if crate::admin::constant_time_eq(given.as_bytes(), token.as_bytes()) {
                    redirect(Some(cookie(
                        &session_value(token, now_secs()),
                        SESSION_SECS,
                        secure,
                    )))
                } else {
                    login_page(true)
                };
            }
            if authorized {
                send(200, HTML, INDEX)
            } else {
                login_page(false)
            }
        }
        ("POST", "/ui/login") => {
            let Some(token) = token else {
                return redirect(None);
            };
            let given =
                smartllm_protocol::admin_query::form_value(&String::from_utf8_lossy(body), "token")
                    .unwrap_or_default();
            if crate::admin::constant_time_eq(given.as_bytes(), token.as_bytes()) {
                redirect(Some(cookie(
                    &session_value(token, now_secs()),
                    SESSION_SECS,
                    secure,
                )))
            } else {
                login_page(true)
            }
        }
        ("GET" | "POST", "/ui/logout") => redirect(Some(cookie("", 0, secure))),
        _ => {
            const NOT_FOUND: &str = "Not found. The dashboard is at /ui.\n";
            send(404, "text/plain; charset=utf-8", NOT_FOUND)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(r: &Response<Vec<u8>>, name: &str) -> String {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn open_without_a_token() {
        let r = serve("GET", "/ui", "", b"", true, None, false);
        assert_eq!(r.status(), 200);
        assert!(String::from_utf8_lossy(r.body()).contains("app.js"));
    }

    #[test]
    fn token_swapped_for_a_hashed_cookie() {
        let r = serve(
            "GET",
            "/ui",
            "token=s%3Dcr+t",
            b"",
            false,
            Some("s=cr t"),
            true,
        );
        assert_eq!(r.status(), 303);
        let c = header(&r, "set-cookie");
        let value = c
            .split(';')
            .next()
            .and_then(|c| c.strip_prefix(&format!("{COOKIE}=")))
            .unwrap()
            .to_string();
        let issued: u64 = value.split_once('.').unwrap().0.parse().unwrap();
        assert!(now_secs().abs_diff(issued) < 5);
        assert_eq!(value, session_value("s=cr t", issued));
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!c.contains("s=cr t"));
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            format!("a=b; {COOKIE}={value}").parse().unwrap(),
        );
        assert!(cookie_ok(&h, "s=cr t"));
        assert!(!cookie_ok(&h, "another"));
        // A wrong token, or none: the login form, never the page.
        let r = serve("GET", "/ui", "token=no", b"", false, Some("t"), false);
        assert_eq!(r.status(), 401);
        assert!(String::from_utf8_lossy(r.body()).contains("not this gateway's admin token"));
        let r = serve("GET", "/ui", "", b"", false, Some("t"), false);
        assert_eq!(r.status(), 401);
        assert!(String::from_utf8_lossy(r.body()).contains("<form"));
        let r = serve("POST", "/ui/login", "", b"token=t", false, Some("t"), false);
        assert_eq!(r.status(), 303);
        assert!(header(&r, "set-cookie").contains(&format!("{COOKIE}=")));
    }

    /// The server ends a session after `SESSION_SECS`, whatever the browser
    /// keeps, and a session's time cannot be moved without the token.
    #[test]
    fn sessions_end_on_the_server() {
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::COOKIE,
                format!("{COOKIE}={v}").parse().unwrap(),
            );
            h
        };
        let issued = 1_800_000_000;
        let h = with(&session_value("t", issued));
        assert!(cookie_ok_at(&h, "t", issued));
        assert!(cookie_ok_at(&h, "t", issued + SESSION_SECS));
        assert!(!cookie_ok_at(&h, "t", issued + SESSION_SECS + 1));
        // Issued in the future (a forged or far-skewed clock): refused.
        assert!(!cookie_ok_at(&h, "t", issued - 3600));
        // Another time with the old hash, or no time at all: refused.
        let hash = session_value("t", issued)
            .split_once('.')
            .unwrap()
            .1
            .to_string();
        assert!(!cookie_ok_at(
            &with(&format!("{}.{hash}", issued + 3600)),
            "t",
            issued + SESSION_SECS + 10
        ));
        assert!(!cookie_ok_at(&with(&hash), "t", issued));
        assert!(!cookie_ok_at(&with(""), "t", issued));
    }

    #[test]
    fn assets_stay_small() {
        let total = INDEX.len() + SCRIPT.len() + STYLE.len() + LOGIN.len();
        assert!(total < 100 * 1024, "{total} bytes");
    }
}
