//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the regression
//! tests that replay every input the fuzzer ever crashed on
//! (`fuzz/regressions/`). Each must return normally for any input; the
//! invariants they assert are properties of the parsers, not of the input.

use crate::assemble::ChunkAssembler;
use crate::openai::{parse_request, Endpoint};
use crate::sse::SseParser;
use crate::usage::OpenAiStreamFilter;

/// A client's request body, for every endpoint (OpenAI, Anthropic Messages,
/// Responses), and the byte-faithful model splice of passthrough bodies.
pub fn request_parser(data: &[u8]) {
    for ep in [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Messages,
        Endpoint::MessagesCountTokens,
        Endpoint::Responses,
        Endpoint::ResponsesInputTokens,
    ] {
        if let Ok(req) = parse_request(ep, data) {
            if ep == Endpoint::ResponsesInputTokens {
                // The only endpoint whose model may be absent.
                continue;
            }
            // What parsed is a JSON object whose model is a non-empty string,
            // and a chat request in the canonical shape where the API is a chat one.
            assert!(!req.model.is_empty());
            assert!(req.body.contains_key("model"));
            if ep.is_chat() {
                assert!(req.body.get("messages").is_some_and(|m| m.is_array()));
            }
        }
    }
    // Splicing a model into a JSON object changes that value and nothing else.
    if let Ok(serde_json::Value::Object(before)) = serde_json::from_slice(data) {
        if let Some(out) = crate::messages::splice_model(data, "m-x") {
            let after: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&out).expect("a spliced body is JSON");
            assert_eq!(after.get("model"), Some(&serde_json::json!("m-x")));
            assert_eq!(after.len(), before.len());
            for (k, v) in &before {
                if k != "model" {
                    assert_eq!(after.get(k), Some(v), "{k} changed");
                }
            }
        }
    }
}

/// An upstream SSE stream: the first byte picks where the rest is cut into two
/// chunks; events must not depend on how the stream was chunked, and the
/// stream consumers (usage filter, assembler, Anthropic translator) must
/// accept anything.
pub fn sse_parser(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize * stream.len()) / 255;
    let (a, b) = stream.split_at(cut.min(stream.len()));
    let mut whole = SseParser::new(1 << 16);
    let mut split = SseParser::new(1 << 16);
    let one = whole.feed(stream);
    let two = split.feed(a).and_then(|mut e| {
        split.feed(b).map(|more| {
            e.extend(more);
            e
        })
    });
    if let (Ok(one), Ok(two)) = (&one, &two) {
        let raw =
            |v: &Vec<crate::sse::SseEvent>| v.iter().map(|e| e.raw.clone()).collect::<Vec<_>>();
        assert_eq!(raw(one), raw(two), "chunking changed the events");
        assert_eq!(whole.pending(), split.pending());
    }
    let mut filter = OpenAiStreamFilter::new(cut.is_multiple_of(2));
    let _ = filter.feed(a);
    let _ = filter.feed(b);
    let mut asm = ChunkAssembler::new();
    asm.feed(a);
    asm.feed(b);
    let _ = asm.finish();
    let mut anthropic = crate::anthropic::AnthropicStream::new("m", cut % 2 == 1);
    let _ = anthropic.feed(a);
    let _ = anthropic.feed(b);
    // The client-side encoders take the canonical chat stream; the
    // Responses reader takes a provider's Responses stream.
    let mut messages = crate::messages::ChatToMessagesStream::new("m", 1);
    let _ = messages.feed(a);
    let _ = messages.feed(b);
    let req = serde_json::Map::new();
    let mut responses = crate::responses::ChatToResponsesStream::new("resp_f", 0, "m", &req);
    let _ = responses.feed(a);
    let _ = responses.feed(b);
    let _ = responses.finish();
    let mut reader = crate::responses::ResponsesStreamReader::default();
    let _ = reader.feed(a);
    let _ = reader.feed(b);
}

/// An admin API query string (and the dashboard's login form), through every
/// parser the admin endpoints use: each either refuses it with a parameter
/// error or returns values within their bounds.
pub fn admin_query(data: &[u8]) {
    use crate::admin_query as q;
    let query = String::from_utf8_lossy(data);
    const NOW: u64 = 1_800_000_000;
    if let Ok(w) = q::window(&query, NOW, 86_400, &["limit", "group_by", "format"]) {
        assert!(w.from <= w.to && w.to <= q::MAX_INSTANT.max(NOW + 1));
    }
    if let Ok(c) = q::costs(&query, NOW) {
        assert!(c.group_by.iter().flatten().all(|d| !d.is_empty()));
    }
    if let Ok((_, limit)) = q::expensive(&query, NOW, 500) {
        assert!((1..=500).contains(&limit));
    }
    match q::purge(&query) {
        Ok(q::PurgeTarget::Namespace(v) | q::PurgeTarget::Route(v) | q::PurgeTarget::Tenant(v)) => {
            assert!(!v.is_empty())
        }
        Ok(q::PurgeTarget::All) => {}
        Err(e) => assert!(!e.message.is_empty()),
    }
    let _ = q::form_value(&query, "token");
}

#[cfg(test)]
mod tests {
    /// A few thousand deterministic mutations (byte flips, insertions,
    /// truncations, splices of two seeds) of every seed through both entry
    /// points: a quick stand-in for `make fuzz` that runs in every `make test`.
    #[test]
    fn mutated_seeds_never_panic_the_parsers() {
        // CARGO_MANIFEST_DIR at run time: the test binary may come from a
        // shared target dir built in another checkout.
        let root = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
            .join("../../fuzz/seeds");
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for (target, f) in [
            ("request_parser", super::request_parser as fn(&[u8])),
            ("sse_parser", super::sse_parser as fn(&[u8])),
            ("admin_query", super::admin_query as fn(&[u8])),
        ] {
            let dir = root.join(target);
            let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .flatten()
                .map(|e| std::fs::read(e.path()).unwrap())
                .collect();
            assert!(seeds.len() >= 2, "{target}: seeds");
            for i in 0..10_000 {
                let mut d = seeds[i % seeds.len()].clone();
                for _ in 0..(1 + next() % 4) {
                    let at = (next() as usize) % (d.len() + 1);
                    match next() % 5 {
                        0 if !d.is_empty() => {
                            let at = at.min(d.len() - 1);
                            d[at] = next() as u8;
                        }
                        1 => {
                            const BYTES: &[u8] = b"{}[]\",:\\0ae\n%&=+9";
                            d.insert(at, BYTES[(next() as usize) % BYTES.len()]);
                        }
                        2 => d.truncate(at),
                        3 => {
                            let other = &seeds[(next() as usize) % seeds.len()];
                            let from = (next() as usize) % (other.len() + 1);
                            d.splice(at..at, other[from..].iter().copied().take(64));
                        }
                        _ => {
                            if at < d.len() {
                                d.remove(at);
                            }
                        }
                    }
                }
                f(&d);
            }
        }
    }
}
