//! Image tokens of a request, as each provider counts them, for the
//! per-request cost cap: images are priced as prompt tokens, and their
//! base64 bytes are no text to tokenize.
//!
//! - OpenAI: `detail: low` is 85 tokens; otherwise the image is scaled to fit
//!   2048x2048, then so its shortest side is at most 768, and costs 85 + 170
//!   per 512-pixel tile.
//! - Anthropic: about width x height / 750 tokens, the image first scaled so
//!   its long edge is at most 1568 pixels (at most about 1600 tokens).
//!
//! Sizes are read from the image's header when it is inline (base64 PNG,
//! GIF or JPEG); an image by URL, or one whose size cannot be read, is
//! assumed to be of the size that costs the most.

use serde_json::{Map, Value};

/// Which rule counts the image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageRule {
    OpenAi,
    Anthropic,
}

/// One image of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Image {
    /// (width, height) in pixels, when the header says.
    pub size: Option<(u32, u32)>,
    /// OpenAI's `detail: low`.
    pub low_detail: bool,
}

impl Image {
    pub fn tokens(&self, rule: ImageRule) -> u64 {
        match rule {
            ImageRule::OpenAi => {
                if self.low_detail {
                    return 85;
                }
                // Unknown: 2048x768 after scaling, 4x2 tiles, the most there is.
                let (w, h) = self.size.unwrap_or((2048, 768));
                let (mut w, mut h) = (f64::from(w.max(1)), f64::from(h.max(1)));
                let fit = (2048.0 / w.max(h)).min(1.0);
                (w, h) = (w * fit, h * fit);
                let short = (768.0 / w.min(h)).min(1.0);
                (w, h) = (w * short, h * short);
                let tiles = (w / 512.0).ceil() * (h / 512.0).ceil();
                85 + 170 * tiles as u64
            }
            ImageRule::Anthropic => {
                let Some((w, h)) = self.size else { return 1600 };
                let (mut w, mut h) = (f64::from(w.max(1)), f64::from(h.max(1)));
                let fit = (1568.0 / w.max(h)).min(1.0);
                (w, h) = (w * fit, h * fit);
                ((w * h / 750.0).ceil() as u64).min(1600)
            }
        }
    }
}

/// The images of a request body (Chat `image_url` parts, Anthropic `image`
/// blocks, Responses `input_image` items), and the body without their
/// inline data (what is left to tokenize as text), when it had any.
pub fn scan(body: &Map<String, Value>) -> (Vec<Image>, Option<Map<String, Value>>) {
    let mut images = Vec::new();
    let mut stripped = body.clone();
    for v in stripped.values_mut() {
        walk(v, &mut images);
    }
    let stripped = (!images.is_empty()).then_some(stripped);
    (images, stripped)
}

/// Runs of base64 at least this long are inline data (images, files), not
/// text: prompts have spaces and punctuation far more often.
const DATA_RUN: usize = 1024;

/// Tokens the prompt an image stands for is estimated at, where its data
/// was not counted as text (about a high-detail 1024x1024 image).
const TOKENS_PER_DATA_RUN: u64 = 1600;

/// The rate limits' estimate of a raw request body's tokens, before it is
/// parsed: about 4 bytes a token of text, with inline base64 data (a 4 MB
/// image is about 1,600 tokens, not a million) counted per run instead.
pub fn estimate_body_tokens(body: &[u8]) -> u64 {
    let is_b64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    let (mut data, mut runs, mut run) = (0usize, 0u64, 0usize);
    for b in body {
        if is_b64(b) {
            run += 1;
        } else {
            if run >= DATA_RUN {
                data += run;
                runs += 1;
            }
            run = 0;
        }
    }
    if run >= DATA_RUN {
        data += run;
        runs += 1;
    }
    ((body.len() - data) as u64).div_ceil(4) + runs * TOKENS_PER_DATA_RUN
}

fn walk(v: &mut Value, out: &mut Vec<Image>) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(|v| walk(v, out)),
        Value::Object(o) => {
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
            let found = match kind {
                "image_url" | "input_image" => {
                    let low = o
                        .get("image_url")
                        .and_then(|u| u.get("detail"))
                        .or_else(|| o.get("detail"))
                        .and_then(Value::as_str)
                        == Some("low");
                    let url = match o.get_mut("image_url") {
                        Some(Value::Object(u)) => u.get_mut("url"),
                        other => other,
                    };
                    Some((take_data(url), low))
                }
                "image" => {
                    let data = o.get_mut("source").and_then(|s| s.get_mut("data"));
                    Some((take_data(data), false))
                }
                _ => None,
            };
            match found {
                Some((bytes, low_detail)) => out.push(Image {
                    size: bytes.as_deref().and_then(size_of),
                    low_detail,
                }),
                None => o.values_mut().for_each(|v| walk(v, out)),
            }
        }
        _ => {}
    }
}

/// The first bytes of an inline image (a data URL or bare base64), its
/// text emptied; None for an image by URL.
fn take_data(v: Option<&mut Value>) -> Option<Vec<u8>> {
    let v = v?;
    let s = v.as_str()?;
    if s.starts_with("http://") || s.starts_with("https://") {
        return None;
    }
    let b64 = s.split_once("base64,").map_or(s, |(_, d)| d);
    let head = decode_prefix(b64, 48 << 10);
    *v = Value::String(String::new());
    Some(head)
}

/// Decode up to `max` bytes of base64 (standard alphabet; stops at the
/// first byte outside it).
fn decode_prefix(s: &str, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => break,
        };
        acc = (acc << 6) | u32::from(d);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            if out.len() >= max {
                break;
            }
        }
    }
    out
}

/// (width, height) from a PNG, GIF or JPEG header.
pub fn size_of(b: &[u8]) -> Option<(u32, u32)> {
    let be16 = |i: usize| Some(u32::from(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])));
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        return Some((be32(16)?, be32(20)?));
    }
    if b.starts_with(b"GIF8") {
        let le16 = |i: usize| Some(u32::from(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?])));
        return Some((le16(6)?, le16(8)?));
    }
    if b.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        while i + 9 < b.len() {
            if b[i] != 0xFF {
                return None;
            }
            let marker = b[i + 1];
            let len = be16(i + 2)? as usize;
            if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
                return Some((be16(i + 7)?, be16(i + 5)?));
            }
            i += 2 + len;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_data_is_not_counted_as_text() {
        let text = br#"{"messages":[{"role":"user","content":"Describe this picture, please."}]}"#;
        assert_eq!(estimate_body_tokens(text), (text.len() as u64).div_ceil(4));
        let image = "iVBORw0KGgo".repeat(400_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"What is it?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
        );
        let t = estimate_body_tokens(body.as_bytes());
        assert!(
            t > TOKENS_PER_DATA_RUN && t < TOKENS_PER_DATA_RUN + 100,
            "{t}"
        );
        // A long word of text is not data.
        let long = "a".repeat(DATA_RUN - 1);
        assert_eq!(
            estimate_body_tokens(long.as_bytes()),
            (long.len() as u64).div_ceil(4)
        );
    }
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for k in 0..=c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            }
        }
        out
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut p = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        p.extend(w.to_be_bytes());
        p.extend(h.to_be_bytes());
        p.extend([8, 6, 0, 0, 0]);
        p
    }

    #[test]
    fn each_provider_counts_image_tokens_its_way() {
        let img = |w, h| Image {
            size: Some((w, h)),
            low_detail: false,
        };
        // OpenAI's examples: 1024x1024 high -> 768x768, 4 tiles, 765 tokens;
        // 2048x4096 -> 1024x2048 -> 768x1536, 6 tiles, 1105 tokens.
        assert_eq!(img(1024, 1024).tokens(ImageRule::OpenAi), 765);
        assert_eq!(img(2048, 4096).tokens(ImageRule::OpenAi), 1105);
        let low = Image {
            size: Some((4000, 4000)),
            low_detail: true,
        };
        assert_eq!(low.tokens(ImageRule::OpenAi), 85);
        // Anthropic: 1000x1000 / 750 = 1334; big images capped near 1600.
        assert_eq!(img(1000, 1000).tokens(ImageRule::Anthropic), 1334);
        assert_eq!(img(8000, 8000).tokens(ImageRule::Anthropic), 1600);
        let unknown = Image {
            size: None,
            low_detail: false,
        };
        assert_eq!(unknown.tokens(ImageRule::OpenAi), 85 + 170 * 8);
        assert_eq!(unknown.tokens(ImageRule::Anthropic), 1600);
    }

    #[test]
    fn images_are_found_sized_and_stripped() {
        let data = format!("data:image/png;base64,{}", b64(&png(1024, 1024)));
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": data, "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png", "detail": "low"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(&png(300, 200))}},
        ]}]});
        let (images, stripped) = scan(body.as_object().unwrap());
        assert_eq!(
            images,
            vec![
                Image {
                    size: Some((1024, 1024)),
                    low_detail: false
                },
                Image {
                    size: None,
                    low_detail: true
                },
                Image {
                    size: Some((300, 200)),
                    low_detail: false
                },
            ]
        );
        let text = serde_json::to_string(&stripped.unwrap()).unwrap();
        assert!(
            !text.contains("base64,iVBOR") && text.contains("example.com"),
            "{text}"
        );
        let gif = b"GIF89a\x40\x01\xf0\x00";
        assert_eq!(size_of(gif), Some((320, 240)));
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC0, 0, 17, 8, 0x01, 0xE0, 0x02, 0x80, 3,
        ];
        assert_eq!(size_of(&jpeg), Some((640, 480)));
        assert_eq!(scan(json!({"messages": []}).as_object().unwrap()).1, None);
    }
}
