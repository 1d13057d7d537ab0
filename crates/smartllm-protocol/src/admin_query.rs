//! The admin API's query strings (and the dashboard's login form): decoded
//! as `application/x-www-form-urlencoded` and checked here, so that a
//! caller's typo gets a 400 naming the parameter and no input panics
//! (`fuzzing::admin_query` holds them to that).

/// Why a query was refused: the parameter (when one is to blame), a message
/// saying what to send instead, and the OpenAI-style error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub param: Option<String>,
    pub message: String,
    pub code: &'static str,
}

impl QueryError {
    /// A 400 for a value of `param` the endpoint cannot use.
    pub fn invalid(param: &str, message: String) -> Self {
        Self {
            param: Some(param.to_string()),
            message,
            code: "invalid_value",
        }
    }
}

/// The latest instant a query may name: the end of year 9999 (ledger hours
/// are kept as u32, and nothing is recorded after that).
pub const MAX_INSTANT: u64 = 253_402_300_799;

/// `+` as a space and `%XX` escapes decoded; a `%` not followed by two hex
/// digits stays as it is, and bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded `name=value` pairs of a query or form, in order (a name
/// without `=` has an empty value; empty pairs are skipped).
pub fn pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The first value of `name` in a query or form.
pub fn form_value(form: &str, name: &str) -> Option<String> {
    pairs(form)
        .into_iter()
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// `30s`, `30m`, `24h`, `7d` before `now`, or a unix timestamp; `None` for
/// anything else or past [`MAX_INSTANT`].
pub fn parse_instant(v: &str, now: u64) -> Option<u64> {
    if let Ok(ts) = v.parse::<u64>() {
        return (ts <= MAX_INSTANT).then_some(ts);
    }
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(now.saturating_sub(n.checked_mul(per)?))
}

/// A ledger query's window and its other parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub from: u64,
    pub to: u64,
    /// The parameters other than the window's, each among the `extra` names
    /// the endpoint takes.
    pub rest: Vec<(String, String)>,
}

/// `since`/`from` and `to` of a ledger query (default: the last
/// `default_secs` before `now`); every other parameter must be among `extra`.
pub fn window(
    query: &str,
    now: u64,
    default_secs: u64,
    extra: &[&str],
) -> Result<Window, QueryError> {
    let (mut from, mut to) = (now.saturating_sub(default_secs), now + 1);
    let mut rest = Vec::new();
    for (k, v) in pairs(query) {
        match k.as_str() {
            "since" | "from" => match parse_instant(&v, now) {
                Some(t) => from = t,
                None => {
                    return Err(QueryError::invalid(
                        &k,
                        format!("{k}={v:?}: use a unix timestamp or a duration like 30m, 24h, 7d"),
                    ))
                }
            },
            "to" => match v.parse::<u64>() {
                Ok(t) if t <= MAX_INSTANT => to = t,
                _ => {
                    return Err(QueryError::invalid(
                        &k,
                        format!("to={v:?}: use a unix timestamp"),
                    ))
                }
            },
            _ if extra.contains(&k.as_str()) => rest.push((k, v)),
            _ => {
                let mut known = vec!["since", "from", "to"];
                known.extend_from_slice(extra);
                return Err(QueryError::invalid(
                    &k,
                    format!("unknown parameter {k:?}: use {}", known.join(", ")),
                ));
            }
        }
    }
    if from > to {
        return Err(QueryError::invalid(
            "to",
            format!("the window ends ({to}) before it starts ({from})"),
        ));
    }
    Ok(Window { from, to, rest })
}

/// The rows `GET /admin/costs` answers when the query does not say, and the
/// most it may ask for (the rest are summed into one `(other)` row).
pub const COSTS_DEFAULT_LIMIT: usize = 1000;
pub const COSTS_MAX_LIMIT: usize = 10_000;

/// `GET /admin/costs`: the window, the grouping (names as given, checked by
/// the ledger), whether CSV was asked for and how many rows to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostsQuery {
    pub from: u64,
    pub to: u64,
    /// `None` when the query does not say (the endpoint's default applies).
    pub group_by: Option<Vec<String>>,
    pub csv: bool,
    /// `scope=fleet`: every gateway's ledger (through Redis), not this one's.
    pub fleet: bool,
    /// The costliest rows answered by name (1..=[`COSTS_MAX_LIMIT`], default
    /// [`COSTS_DEFAULT_LIMIT`]); the others are summed into one row.
    pub limit: usize,
    /// Only this tenant's, app's (`tenant/app` or the app's name) or key
    /// name's rows (`tenant=`, `app=`, `key=`).
    pub tenant: Option<String>,
    pub app: Option<String>,
    pub key: Option<String>,
}

pub fn costs(query: &str, now: u64) -> Result<CostsQuery, QueryError> {
    let w = window(
        query,
        now,
        86_400,
        &[
            "group_by", "format", "scope", "limit", "tenant", "app", "key",
        ],
    )?;
    let mut q = CostsQuery {
        from: w.from,
        to: w.to,
        group_by: None,
        csv: false,
        fleet: false,
        limit: COSTS_DEFAULT_LIMIT,
        tenant: None,
        app: None,
        key: None,
    };
    for (k, v) in w.rest {
        if matches!(k.as_str(), "tenant" | "app" | "key") {
            if v.is_empty() {
                return Err(QueryError::invalid(&k, format!("{k}= needs a name")));
            }
            match k.as_str() {
                "tenant" => q.tenant = Some(v),
                "app" => q.app = Some(v),
                _ => q.key = Some(v),
            }
        } else if k == "limit" {
            q.limit = match v.parse::<usize>() {
                Ok(n) if (1..=COSTS_MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(QueryError::invalid(
                        &k,
                        format!("limit={v:?}: use 1 to {COSTS_MAX_LIMIT}"),
                    ))
                }
            };
        } else if k == "scope" {
            q.fleet = match v.as_str() {
                "fleet" => true,
                "local" => false,
                _ => {
                    return Err(QueryError::invalid(
                        &k,
                        format!("scope={v:?}: use local or fleet"),
                    ))
                }
            };
        } else if k == "format" {
            q.csv = match v.as_str() {
                "csv" => true,
                "json" => false,
                _ => {
                    return Err(QueryError::invalid(
                        &k,
                        format!("format={v:?}: use json or csv"),
                    ))
                }
            };
        } else {
            q.group_by = Some(
                v.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    Ok(q)
}

/// `GET /admin/requests/expensive`: the window (unix seconds, `to`
/// exclusive as in the ledger's queries), and how many (1..=`capacity`,
/// default 20 or `capacity` if smaller).
pub fn expensive(
    query: &str,
    now: u64,
    capacity: usize,
) -> Result<(std::ops::Range<u64>, usize), QueryError> {
    let w = window(query, now, 86_400, &["limit"])?;
    let mut limit = 20.min(capacity.max(1));
    for (k, v) in w.rest {
        match v.parse::<usize>() {
            Ok(n) if (1..=capacity).contains(&n) => limit = n,
            _ => {
                return Err(QueryError::invalid(
                    &k,
                    format!("limit={v:?}: use 1 to {capacity}"),
                ))
            }
        }
    }
    Ok((w.from..w.to, limit))
}

/// What `POST /admin/cache/purge` is asked to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    All,
    Namespace(String),
    Route(String),
    Tenant(String),
}

/// `all=true`, `namespace=HEX`, `route=NAME` or `tenant=NAME`: one target.
pub fn purge(query: &str) -> Result<PurgeTarget, QueryError> {
    let mut what = None;
    for (k, v) in pairs(query) {
        if what.is_some() {
            // `all=true&route=fast` purged only `fast`: one target a call.
            return Err(QueryError::invalid(
                &k,
                "purge one thing per call: all=true, namespace=HEX, route=NAME or tenant=NAME"
                    .into(),
            ));
        }
        what = Some(match k.as_str() {
            // Only a plain yes empties the cache: `all=0`, `all=no` or a
            // bare `all=` is a mistake, not a purge of everything.
            "all" if v == "true" || v == "1" => PurgeTarget::All,
            // A namespace is 64 hex digits (a SHA-256): anything else can
            // match nothing.
            "namespace" if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                PurgeTarget::Namespace(v.to_ascii_lowercase())
            }
            "namespace" => {
                return Err(QueryError::invalid(
                    "namespace",
                    format!("namespace={v:?} is no cache namespace (64 hex digits)"),
                ))
            }
            "route" if !v.is_empty() => PurgeTarget::Route(v),
            "tenant" if !v.is_empty() => PurgeTarget::Tenant(v),
            _ => {
                return Err(QueryError::invalid(
                    &k,
                    format!(
                    "unknown purge parameter {k}={v:?}; use all=true, namespace=HEX, route=NAME or tenant=NAME"
                ),
                ))
            }
        });
    }
    what.ok_or(QueryError {
        param: None,
        message: "say what to purge: all=true, namespace=HEX, route=NAME or tenant=NAME".into(),
        code: "missing_required_parameter",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn decodes_forms() {
        assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(percent_decode("%zz%"), "%zz%");
        assert_eq!(percent_decode("%C3%A9%ff"), "é\u{fffd}");
        assert_eq!(
            form_value("x=1&token=ab%26c", "token").as_deref(),
            Some("ab&c")
        );
        assert_eq!(form_value("tok%65n=v", "token").as_deref(), Some("v"));
        assert_eq!(form_value("x=1", "token"), None);
    }

    #[test]
    fn windows_default_and_parse() {
        let w = window("", NOW, 3600, &[]).unwrap();
        assert_eq!((w.from, w.to), (NOW - 3600, NOW + 1));
        let w = window("since=2h&to=1800000100", NOW, 60, &[]).unwrap();
        assert_eq!((w.from, w.to), (NOW - 7200, 1_800_000_100));
        assert_eq!(
            window("from=5d", NOW, 60, &[]).unwrap().from,
            NOW - 5 * 86_400
        );
        // Durations longer than the epoch start at 0; overflowing ones are refused.
        assert_eq!(window("since=99999999d", NOW, 60, &[]).unwrap().from, 0);
        let e = window("since=999999999999999999d", NOW, 60, &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("since"));
        let e = window("to=18446744073709551615", NOW, 60, &[]).unwrap_err();
        assert!(e.message.contains("unix timestamp"), "{e:?}");
        let e = window("from=1800000000&to=1700000000", NOW, 60, &[]).unwrap_err();
        assert!(e.message.contains("before it starts"), "{e:?}");
        let e = window("since=3w", NOW, 60, &[]).unwrap_err();
        assert!(e.message.contains("30m, 24h, 7d"), "{e:?}");
        let e = window("group_by=model", NOW, 60, &["limit"]).unwrap_err();
        assert_eq!(
            e.message,
            "unknown parameter \"group_by\": use since, from, to, limit"
        );
    }

    #[test]
    fn costs_queries_accept_encoded_commas() {
        // What Python's requests sends for params={"group_by": "model,app"}.
        let q = costs("group_by=model%2Capp&format=csv", NOW).unwrap();
        assert_eq!(
            q.group_by,
            Some(vec!["model".to_string(), "app".to_string()])
        );
        assert!(q.csv);
        assert_eq!(costs("", NOW).unwrap().group_by, None);
        let e = costs("format=xml", NOW).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("format"));
        assert!(costs("scope=fleet", NOW).unwrap().fleet);
        assert!(!costs("scope=local", NOW).unwrap().fleet);
        assert_eq!(
            costs("scope=all", NOW).unwrap_err().param.as_deref(),
            Some("scope")
        );
    }

    #[test]
    fn costs_take_a_tenant_an_app_and_a_key() {
        let q = costs("tenant=acme&app=acme%2Fweb&key=batch-1", NOW).unwrap();
        assert_eq!(
            (q.tenant.as_deref(), q.app.as_deref(), q.key.as_deref()),
            (Some("acme"), Some("acme/web"), Some("batch-1"))
        );
        let q = costs("", NOW).unwrap();
        assert!(q.tenant.is_none() && q.app.is_none() && q.key.is_none());
        assert_eq!(
            costs("tenant=", NOW).unwrap_err().param.as_deref(),
            Some("tenant")
        );
    }

    #[test]
    fn costs_limits_are_bounded() {
        assert_eq!(costs("", NOW).unwrap().limit, COSTS_DEFAULT_LIMIT);
        assert_eq!(costs("limit=5&group_by=tenant", NOW).unwrap().limit, 5);
        assert_eq!(costs("limit=10000", NOW).unwrap().limit, COSTS_MAX_LIMIT);
        for bad in ["limit=0", "limit=10001", "limit=-1", "limit=x", "limit="] {
            let e = costs(bad, NOW).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("limit"), "{bad}");
            assert!(e.message.contains("use 1 to 10000"), "{e:?}");
        }
    }

    #[test]
    fn expensive_limits_are_bounded() {
        assert_eq!(
            expensive("", NOW, 500).unwrap(),
            (NOW - 86_400..NOW + 1, 20)
        );
        assert_eq!(expensive("limit=7", NOW, 500).unwrap().1, 7);
        for bad in ["limit=0", "limit=501", "limit=-1", "limit=x"] {
            assert!(expensive(bad, NOW, 500).is_err(), "{bad}");
        }
    }

    #[test]
    fn expensive_windows_keep_their_end() {
        let (w, _) = expensive("from=1700000000&to=1700003600", NOW, 500).unwrap();
        assert_eq!(w, 1_700_000_000..1_700_003_600);
        assert!(!w.contains(&1_700_003_600), "to is exclusive");
        let e = expensive("from=1800000000&to=1700000000", NOW, 500).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("to"));
    }

    #[test]
    fn purges_say_what() {
        assert_eq!(purge("all=true").unwrap(), PurgeTarget::All);
        for no in ["all=0", "all=no", "all=", "all=False"] {
            assert_eq!(purge(no).unwrap_err().param.as_deref(), Some("all"), "{no}");
        }
        assert_eq!(
            purge("route=my%20route").unwrap(),
            PurgeTarget::Route("my route".into())
        );
        let ns = "AB12".repeat(16);
        assert_eq!(
            purge(&format!("namespace={ns}")).unwrap(),
            PurgeTarget::Namespace(ns.to_ascii_lowercase())
        );
        for bad in ["namespace=ab12", "namespace=tenant-acme", "namespace="] {
            assert_eq!(
                purge(bad).unwrap_err().param.as_deref(),
                Some("namespace"),
                "{bad}"
            );
        }
        assert_eq!(
            purge("all=true&route=fast").unwrap_err().param.as_deref(),
            Some("route")
        );
        assert_eq!(purge("").unwrap_err().code, "missing_required_parameter");
        assert_eq!(
            purge("all=false").unwrap_err().param.as_deref(),
            Some("all")
        );
        assert_eq!(purge("route=").unwrap_err().param.as_deref(), Some("route"));
        assert_eq!(
            purge("tenant=team%20a").unwrap(),
            PurgeTarget::Tenant("team a".into())
        );
        assert_eq!(
            purge("tenant=").unwrap_err().param.as_deref(),
            Some("tenant")
        );
        assert_eq!(
            purge("tenant=a&route=b").unwrap_err().param.as_deref(),
            Some("route")
        );
    }
}
