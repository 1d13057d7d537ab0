//! Cache keys. The namespace hashes everything that must match for two
//! requests to share an answer: the tenant, the requested model or route, the
//! resolved model, every sampling parameter, tools and response format, the
//! system prompt and every earlier turn. Only the last user turn varies inside
//! a namespace: it is what gets embedded, and (normalised) what the exact key
//! adds to the namespace.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use smartllm_protocol::openai::content_text;

/// Body fields that never change the answer.
const IGNORED: [&str; 5] = [
    "stream",
    "stream_options",
    "user",
    "safety_identifier",
    "metadata",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub namespace: [u8; 32],
    pub exact: [u8; 32],
    /// The last user turn, as sent.
    pub query: String,
    /// Whose request it is (part of the namespace; kept in the entry so a
    /// tenant's entries can be purged).
    pub tenant: String,
}

impl CacheKey {
    pub fn namespace_hex(&self) -> String {
        hex::encode(self.namespace)
    }
}

/// Whitespace-collapsed, trimmed: the same question typed twice hits
/// exactly. A text laid out by indentation (code) keeps its lines and each
/// line's indentation: only runs of spaces inside a line, trailing spaces,
/// blank lines and line ends (CRLF) are collapsed.
pub fn normalise(text: &str) -> String {
    let collapse = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    if crate::guard::layout(text).is_none() {
        return collapse(text);
    }
    let mut out = String::with_capacity(text.len());
    for line in text.trim().lines().filter(|l| !l.trim().is_empty()) {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&line[..line.len() - line.trim_start().len()]);
        out.push_str(&collapse(line));
    }
    out
}

/// What the exact stage compares: the question without the openers and
/// closers that do not change it ("Quick question:", "Thanks!") or trailing
/// punctuation, whitespace collapsed; case kept (code and names are
/// case-sensitive; the semantic stage handles case).
pub fn exact_text(query: &str) -> String {
    normalise(crate::guard::strip_fillers(query))
}

/// What the semantic stage embeds: the question without its fillers.
pub fn embedding_text(query: &str) -> String {
    crate::guard::strip_fillers(query).to_string()
}

/// The key of a chat request, or `None` when its shape is not cacheable
/// (no final user turn, several choices, or a non-text last turn).
pub fn chat_key(tenant: &str, resolved_model: &str, body: &Map<String, Value>) -> Option<CacheKey> {
    api_chat_key("chat_completions", tenant, resolved_model, body)
}

/// [`chat_key`] for a request that came in through `api` (the endpoint's
/// name: `chat_completions`, `messages`, `responses`), whose body is the
/// canonical chat request it amounts to. Each API has its own namespaces, so
/// a hit always replays an answer given to the same API.
pub fn api_chat_key(
    api: &str,
    tenant: &str,
    resolved_model: &str,
    body: &Map<String, Value>,
) -> Option<CacheKey> {
    let messages = body.get("messages")?.as_array()?;
    let (last, earlier) = messages.split_last()?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return None;
    }
    let content = last.get("content")?;
    if let Value::Array(parts) = content {
        // Images or audio in the question: not a text we can compare.
        if parts
            .iter()
            .any(|p| p.get("type").and_then(Value::as_str) != Some("text"))
        {
            return None;
        }
    }
    let query = content_text(content);
    if query.trim().is_empty() {
        return None;
    }
    let mut rest = Map::new();
    for (k, v) in body {
        if k == "messages" || IGNORED.contains(&k.as_str()) {
            continue;
        }
        rest.insert(k.clone(), v.clone());
    }
    rest.insert("messages".into(), Value::Array(earlier.to_vec()));
    // Who asks (the last turn's `name`) is part of the namespace; a turn
    // without one adds nothing (keys unchanged).
    if let Some(name) = last.get("name").filter(|n| !n.is_null()) {
        rest.insert("smartllm:last_turn_name".into(), name.clone());
    }
    // Keys of serde_json maps are sorted: this serialisation is canonical.
    let canonical = serde_json::to_vec(&rest).ok()?;
    let mut h = Sha256::new();
    for part in [
        b"smartllm-cache-v1".as_slice(),
        tenant.as_bytes(),
        resolved_model.as_bytes(),
        &canonical,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    // Chat Completions keeps the namespaces it always had (no re-warming on upgrade).
    if api != "chat_completions" {
        h.update((api.len() as u64).to_le_bytes());
        h.update(api.as_bytes());
    }
    let namespace: [u8; 32] = h.finalize().into();
    let mut h = Sha256::new();
    h.update(namespace);
    h.update(exact_text(&query).as_bytes());
    Some(CacheKey {
        namespace,
        exact: h.finalize().into(),
        query,
        tenant: tenant.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    fn key(tenant: &str, v: Value) -> CacheKey {
        chat_key(tenant, "m", &body(v)).unwrap()
    }

    #[test]
    fn each_api_has_its_own_namespaces() {
        let b =
            body(json!({"model": "m", "messages": [{"role": "user", "content": "What is Rust?"}]}));
        let chat = chat_key("t", "m", &b).unwrap();
        assert_eq!(
            api_chat_key("chat_completions", "t", "m", &b).unwrap(),
            chat
        );
        let messages = api_chat_key("messages", "t", "m", &b).unwrap();
        assert_ne!(messages.namespace, chat.namespace);
        assert_ne!(messages.exact, chat.exact);
        assert_ne!(
            api_chat_key("responses", "t", "m", &b).unwrap().namespace,
            messages.namespace
        );
    }

    #[test]
    fn what_shares_a_namespace() {
        let base = json!({"model": "auto", "temperature": 0, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Rust?"}]});
        let k = key("t1", base.clone());
        // Streaming, user id and spacing do not matter.
        let mut v = base.clone();
        v["stream"] = json!(true);
        v["user"] = json!("u-9");
        v["safety_identifier"] = json!("s-9");
        v["messages"][1]["content"] = json!("  What   is Rust? ");
        let k2 = key("t1", v);
        assert_eq!(k.namespace, k2.namespace);
        assert_eq!(k.exact, k2.exact);
        // A different question: same namespace, different exact key.
        let mut v = base.clone();
        v["messages"][1]["content"] = json!("Explain Rust");
        let k3 = key("t1", v);
        assert_eq!(k.namespace, k3.namespace);
        assert_ne!(k.exact, k3.exact);
        // Tenant, system prompt, sampling, earlier turns, model: all separate.
        assert_ne!(key("t2", base.clone()).namespace, k.namespace);
        let mut v = base.clone();
        v["messages"][0]["content"] = json!("Be verbose.");
        assert_ne!(key("t1", v).namespace, k.namespace);
        let mut v = base.clone();
        v["temperature"] = json!(0.7);
        assert_ne!(key("t1", v).namespace, k.namespace);
        let mut v = base.clone();
        v["messages"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({"role": "assistant", "content": "Hi"}));
        assert_ne!(key("t1", v).namespace, k.namespace);
        // Who asks (the last turn's name) is part of the namespace.
        let mut alice = base.clone();
        alice["messages"][1]["name"] = json!("alice");
        let mut bob = base.clone();
        bob["messages"][1]["name"] = json!("bob");
        let (alice, bob) = (key("t1", alice), key("t1", bob));
        assert_ne!(alice.namespace, bob.namespace);
        assert_ne!(alice.namespace, k.namespace);
        assert_ne!(
            chat_key("t1", "other", &body(base.clone()))
                .unwrap()
                .namespace,
            k.namespace
        );
    }

    #[test]
    fn code_keeps_its_indentation_in_the_exact_key() {
        let q = |text: &str| exact_text(text);
        let nested = "Why does this print once?\nfor x in xs:\n    print(x)\n    break";
        let after = "Why does this print once?\nfor x in xs:\n    print(x)\nbreak";
        assert_ne!(q(nested), q(after));
        // Typed again with CRLF, trailing and doubled spaces, a blank line.
        let again =
            "Why does  this print once?\r\n\r\nfor x in xs:  \r\n    print(x)\r\n    break\r\n";
        assert_eq!(q(nested), q(again));
        assert_eq!(q(nested), nested);
        // Prose keeps the one-line form it always had (no re-keying; the
        // trailing full stop goes, as ever).
        assert_eq!(
            q("Summarise:\nThe cat sat.\n\nThe dog ran."),
            "Summarise: The cat sat. The dog ran"
        );
    }

    #[test]
    fn uncacheable_shapes() {
        assert!(chat_key(
            "t",
            "m",
            &body(json!({"messages": [{"role": "assistant", "content": "x"}]}))
        )
        .is_none());
        assert!(chat_key(
            "t",
            "m",
            &body(json!({"n": 3, "messages": [{"role": "user", "content": "x"}]}))
        )
        .is_none());
        assert!(chat_key("t", "m", &body(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))).is_none());
        assert!(chat_key(
            "t",
            "m",
            &body(json!({"messages": [{"role": "user", "content": "  "}]}))
        )
        .is_none());
    }
}
