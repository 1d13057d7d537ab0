//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the regression
//! tests that replay every input the fuzzer ever crashed on
//! (`fuzz/regressions/`). Each must return normally for any input; the
//! invariants they assert are properties of the parsers, not of the input.

use crate::assemble::ChunkAssembler;
use crate::openai::{parse_request, Endpoint};
use crate::sse::SseParser;
use crate::usage::OpenAiStreamFilter;

/// A client's request body, for every endpoint.
pub fn request_parser(data: &[u8]) {
    for ep in [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ] {
        if let Ok(req) = parse_request(ep, data) {
            // What parsed is a JSON object whose model is a non-empty string.
            assert!(!req.model.is_empty());
            assert!(req.body.contains_key("model"));
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
    let mut filter = OpenAiStreamFilter::new(cut % 2 == 0);
    let _ = filter.feed(a);
    let _ = filter.feed(b);
    let mut asm = ChunkAssembler::new();
    asm.feed(a);
    asm.feed(b);
    let _ = asm.finish();
    let mut anthropic = crate::anthropic::AnthropicStream::new("m", cut % 2 == 1);
    let _ = anthropic.feed(a);
    let _ = anthropic.feed(b);
}
