//! Incremental Server-Sent Events parser. Feed it network chunks as they come;
//! it yields each complete event (with its raw bytes, to forward untouched) and
//! keeps partial ones until the rest arrives. `\n`, `\r\n` and `\r` line endings
//! are accepted; an event larger than the configured bound is an error, so a
//! misbehaving upstream cannot grow memory without limit.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
    /// The event exactly as received, including its terminating blank line.
    pub raw: Vec<u8>,
}

impl SseEvent {
    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseTooLarge(pub usize);

impl std::fmt::Display for SseTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an SSE event exceeded {} bytes", self.0)
    }
}

#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned without finding the end of an event.
    scanned: usize,
    max_event: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(16 << 20)
    }
}

impl SseParser {
    pub fn new(max_event: usize) -> Self {
        SseParser {
            buf: Vec::new(),
            scanned: 0,
            max_event,
        }
    }

    /// Bytes held that do not yet form a complete event.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Append a chunk and return every event it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseTooLarge> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        // The events are cut from `buf` where they lie and the bytes handed
        // out are drained once at the end: a chunk of many events is not
        // shifted down once per event.
        let (mut start, mut scan) = (0, self.scanned);
        while let Some(end) = find_event_end(&self.buf, scan) {
            if let Some(ev) = parse_event(self.buf[start..end].to_vec()) {
                events.push(ev);
            }
            (start, scan) = (end, end);
        }
        self.buf.drain(..start);
        // Re-scan the last 3 bytes next time: a terminator may straddle chunks.
        self.scanned = self.buf.len().saturating_sub(3);
        if self.buf.len() > self.max_event {
            return Err(SseTooLarge(self.max_event));
        }
        Ok(events)
    }
}

/// How many leading bytes of `buf` are whole events: the position after its
/// last blank line. `from` is where to start looking (bytes before it are
/// known to hold no event end that was not counted already; a terminator may
/// start up to 3 bytes before the data that was new).
pub fn complete_len(buf: &[u8], from: usize) -> usize {
    let (mut end, mut scan) = (0, from);
    while let Some(e) = find_event_end(buf, scan) {
        (end, scan) = (e, e);
    }
    end
}

/// End (exclusive) of the first event in `buf`: the position after a blank line.
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let b = buf[i];
        if b == b'\n' || b == b'\r' {
            // Length of this line terminator.
            let t1 = if b == b'\r' && buf.get(i + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            if b == b'\r' && i + 1 == buf.len() {
                // Could be the start of \r\n: wait for more.
                return None;
            }
            let j = i + t1;
            match buf.get(j) {
                Some(b'\n') => return Some(j + 1),
                Some(b'\r') => {
                    if buf.get(j + 1) == Some(&b'\n') {
                        return Some(j + 2);
                    }
                    if j + 1 == buf.len() {
                        return None;
                    }
                    return Some(j + 1);
                }
                Some(_) => i = j,
                None => return None,
            }
        } else {
            i += 1;
        }
    }
    None
}

fn parse_event(raw: Vec<u8>) -> Option<SseEvent> {
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    if data.is_none() && event.is_none() {
        // Comment-only (keep-alive) block: nothing to deliver.
        return None;
    }
    Some(SseEvent {
        event,
        data: data.unwrap_or_default(),
        raw,
    })
}

/// Serialize one `data:` event.
pub fn data_event(data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// An error a provider reported inside its event stream, after its `200`:
/// Anthropic's `event: error`, or an OpenAI-compatible `data: {"error": ...}`.
/// The stream filters record the first one; the answer is a failure however
/// it ends afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// The provider's error type (`overloaded_error`, `server_error`, ...), if it gave one.
    pub kind: Option<String>,
    /// The provider's error code (`context_length_exceeded`,
    /// `rate_limit_exceeded`, ...), if it gave one: more precise than `kind`,
    /// and what a Responses client reads to tell a full context from an outage.
    pub code: Option<String>,
    pub message: String,
}

impl StreamError {
    /// The error an event reports, if it is one: `event: error`, or a JSON
    /// object whose `error` is set (an object with a `message`, or a string).
    /// Ordinary chunks (no `error` key, or `"error": null`) are not errors.
    pub fn from_event(ev: &SseEvent) -> Option<StreamError> {
        let named = ev.event.as_deref() == Some("error");
        if !named && !ev.data.contains("\"error\"") {
            return None;
        }
        let v: Option<serde_json::Value> = serde_json::from_str(&ev.data).ok();
        let err = v
            .as_ref()
            .and_then(|v| v.get("error"))
            .filter(|e| !e.is_null());
        let text = |v: Option<&serde_json::Value>, k: &str| {
            v.and_then(|v| v.get(k))
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        match err {
            Some(e) if e.is_object() => Some(StreamError {
                kind: text(Some(e), "type"),
                code: text(Some(e), "code"),
                message: text(Some(e), "message").unwrap_or_else(|| e.to_string()),
            }),
            Some(e) => Some(StreamError {
                kind: None,
                code: None,
                message: e.as_str().map_or_else(|| e.to_string(), str::to_string),
            }),
            // `event: error` with a body of its own shape (`{"type": "error",
            // "message": ...}`), or none that parses.
            None if named => Some(StreamError {
                kind: text(v.as_ref(), "code"),
                code: text(v.as_ref(), "code"),
                message: text(v.as_ref(), "message")
                    .unwrap_or_else(|| ev.data.chars().take(512).collect()),
            }),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn complete_len_counts_whole_events_only() {
        assert_eq!(complete_len(b"data: a\n\ndata: b", 0), 9);
        assert_eq!(complete_len(b"data: a\r\n\r\ndata: b\r\n\r\n", 0), 22);
        assert_eq!(complete_len(b"data: a\n", 0), 0);
        // A lone \r at the end may be the first half of \r\n: not yet.
        assert_eq!(complete_len(b"data: a\r\n\r", 0), 0);
        assert_eq!(complete_len(b": ping\n\nevent: x\ndata: {}\n\n", 0), 27);
        // From a later point: the terminator straddling the old end is found.
        assert_eq!(complete_len(b"data: abcdef\n\n", 11), 14);
    }

    use super::*;

    #[test]
    fn events_across_arbitrary_chunking() {
        let stream =
            b": keep-alive\n\ndata: {\"a\":1}\n\nevent: ping\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut p = SseParser::default();
            let mut evs = p.feed(&stream[..split]).unwrap();
            evs.extend(p.feed(&stream[split..]).unwrap());
            assert_eq!(evs.len(), 3, "split at {split}");
            assert_eq!(evs[0].data, "{\"a\":1}");
            assert_eq!(evs[1].event.as_deref(), Some("ping"));
            assert_eq!(evs[1].data, "x\ny");
            assert!(evs[2].is_done());
            assert!(p.pending().is_empty());
        }
    }

    #[test]
    fn byte_by_byte_crlf() {
        let stream = b"data: one\r\n\r\ndata: two\r\n\r\n";
        let mut p = SseParser::default();
        let mut evs = Vec::new();
        for b in stream.iter() {
            evs.extend(p.feed(&[*b]).unwrap());
        }
        assert_eq!(
            evs.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(evs[0].raw, b"data: one\r\n\r\n");
    }

    /// Many events in one chunk all come out, in order, and a partial one
    /// after them is kept for the next chunk.
    #[test]
    fn many_events_in_one_chunk() {
        let mut stream = Vec::new();
        for i in 0..1000 {
            stream.extend_from_slice(format!("data: {i}\n\n").as_bytes());
        }
        stream.extend_from_slice(b"data: tail");
        let mut p = SseParser::default();
        let evs = p.feed(&stream).unwrap();
        assert_eq!(evs.len(), 1000);
        for (i, ev) in evs.iter().enumerate() {
            assert_eq!(ev.data, i.to_string());
            assert_eq!(ev.raw, format!("data: {i}\n\n").into_bytes());
        }
        assert_eq!(p.pending(), b"data: tail");
        let evs = p.feed(b"\n\n").unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, "tail");
        assert!(p.pending().is_empty());
    }

    #[test]
    fn bounded() {
        let mut p = SseParser::new(10);
        assert!(p.feed(b"data: 0123456789abcdef").is_err());
    }

    fn event(raw: &str) -> SseEvent {
        let mut p = SseParser::default();
        let mut evs = p.feed(raw.as_bytes()).unwrap();
        assert_eq!(evs.len(), 1, "{raw}");
        evs.remove(0)
    }

    #[test]
    fn stream_errors_are_recognised_in_each_shape() {
        // OpenAI-compatible: a data event whose `error` is set.
        let e = StreamError::from_event(&event(
            "data: {\"error\": {\"message\": \"overloaded\", \"type\": \"server_error\", \"code\": null}}\n\n",
        ))
        .unwrap();
        assert_eq!(e.message, "overloaded");
        assert_eq!(e.kind.as_deref(), Some("server_error"));
        assert_eq!(e.code, None);
        // The provider's code is kept beside its type.
        let e = StreamError::from_event(&event(
            "data: {\"error\": {\"message\": \"too long\", \"type\": \"invalid_request_error\", \"code\": \"context_length_exceeded\"}}\n\n",
        ))
        .unwrap();
        assert_eq!(e.kind.as_deref(), Some("invalid_request_error"));
        assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
        let e = StreamError::from_event(&event("data: {\"error\": \"boom\"}\n\n")).unwrap();
        assert_eq!((e.kind, e.message.as_str()), (None, "boom"));
        // Anthropic: `event: error`.
        let e = StreamError::from_event(&event(
            "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
        ))
        .unwrap();
        assert_eq!(e.kind.as_deref(), Some("overloaded_error"));
        assert_eq!(e.message, "Overloaded");
        // `event: error` with another body, or none that parses.
        let e = StreamError::from_event(&event(
            "event: error\ndata: {\"type\": \"error\", \"code\": \"server_error\", \"message\": \"lost\"}\n\n",
        ))
        .unwrap();
        assert_eq!(
            (e.kind.as_deref(), e.message.as_str()),
            (Some("server_error"), "lost")
        );
        let e =
            StreamError::from_event(&event("event: error\ndata: upstream went away\n\n")).unwrap();
        assert_eq!(e.message, "upstream went away");
        // Ordinary chunks are not errors, whatever their text says.
        for ok in [
            "data: {\"choices\": [{\"delta\": {\"content\": \"an \\\"error\\\" here\"}}]}\n\n",
            "data: {\"choices\": [], \"error\": null}\n\n",
            "data: {\"choices\": [{\"delta\": {}, \"finish_reason\": \"error\"}]}\n\n",
            "data: [DONE]\n\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        ] {
            assert_eq!(StreamError::from_event(&event(ok)), None, "{ok}");
        }
    }

    #[test]
    fn serialize() {
        assert_eq!(data_event("a\nb"), b"data: a\ndata: b\n\n");
    }
}
