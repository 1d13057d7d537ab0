//! The cost dashboard on the admin listener: `/ui`, a page, a stylesheet and
//! a script built into the binary (no CDN, no build step), which poll the
//! admin JSON API from the browser.
//!
//! With an admin token, a browser cannot send `Authorization`, so `/ui` takes
//! the token once — from a login form (`POST /ui/login`) or `/ui?token=...` —
//! and answers with an HttpOnly, SameSite=Strict session cookie holding a hash
//! of the token (never the token itself; a new token ends every session). The
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

/// What the cookie holds for `token`: a hash, so the cookie never carries
/// the token itself.
pub fn session_value(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"smartllm-ui-session\0");
    h.update(token.as_bytes());
    hex::encode(h.finalize())
}

/// Does the request carry a valid session cookie for `token`?
pub fn cookie_ok(headers: &http::HeaderMap, token: &str) -> bool {
    let want = session_value(token);
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && crate::admin::constant_time_eq(v.as_bytes(), want.as_bytes()))
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
                    redirect(Some(cookie(&session_value(token), SESSION_SECS, secure)))
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
                redirect(Some(cookie(&session_value(token), SESSION_SECS, secure)))
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
        assert!(c.starts_with(&format!("{COOKIE}={}", session_value("s=cr t"))));
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!c.contains("s=cr t"));
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            format!("a=b; {COOKIE}={}", session_value("s=cr t"))
                .parse()
                .unwrap(),
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
        assert!(header(&r, "set-cookie").contains(&session_value("t")));
    }

    #[test]
    fn assets_stay_small() {
        let total = INDEX.len() + SCRIPT.len() + STYLE.len() + LOGIN.len();
        assert!(total < 100 * 1024, "{total} bytes");
    }
}
