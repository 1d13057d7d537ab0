//! What the gateway reads of a buffered OpenAI-shaped answer (chat or legacy
//! completions), read straight from the bytes: no `Value` tree is built for
//! an answer that passes through unchanged. The same figures as reading a
//! parsed `Value` ([`Usage::from_openai`], [`crate::usage::cut_at_length`]),
//! checked against them in the tests.

use crate::Usage;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// The figures of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenAiAnswer {
    /// `usage`, when present and not null.
    pub usage: Option<Usage>,
    /// A choice stopped at the token limit (`finish_reason: "length"`).
    pub cut_at_length: bool,
    /// `choices` is an array.
    pub has_choices: bool,
}

impl OpenAiAnswer {
    /// Read `body`; an error when it is not JSON (any JSON value is read: one
    /// that is not an object has no figures).
    pub fn read(body: &[u8]) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let a = de.deserialize_any(AnswerVisitor)?;
        de.end()?;
        Ok(a)
    }
}

/// Consume any value, keeping nothing (maps and arrays are still checked).
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(|_| ())
}

/// Visitor methods for the kinds of value a field ignores, each answering
/// `$out` (arrays and objects are still read through, so checked).
macro_rules! otherwise {
    ($out:expr; $($kind:ident),*) => { $(otherwise!(@$kind $out);)* };
    (@bool $out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($out) }
    };
    (@i64 $out:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($out) }
    };
    (@u64 $out:expr) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($out) }
    };
    (@f64 $out:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($out) }
    };
    (@str $out:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($out) }
    };
    (@unit $out:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($out) }
    };
    (@seq $out:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($out)
        }
    };
    (@map $out:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($out)
        }
    };
}

struct AnswerVisitor;

impl<'de> Visitor<'de> for AnswerVisitor {
    type Value = OpenAiAnswer;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    otherwise!(OpenAiAnswer::default(); bool, i64, u64, f64, str, unit, seq);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut a = OpenAiAnswer::default();
        let mut tier = crate::usage::ServiceTier::Standard;
        while let Some(key) = map.next_key::<Key>()? {
            match key.0 {
                Field::Usage => a.usage = map.next_value::<UsageField>()?.0,
                Field::ServiceTier => tier = map.next_value::<TierField>()?.0,
                Field::Choices => {
                    let c = map.next_value::<Choices>()?;
                    a.has_choices = c.is_array;
                    a.cut_at_length = c.cut_at_length;
                }
                _ => skip(&mut map)?,
            }
        }
        if let Some(u) = a.usage.as_mut() {
            u.tier = tier;
        }
        Ok(a)
    }
}

/// `service_tier`: the tier a string names; anything else is standard.
struct TierField(crate::usage::ServiceTier);

impl<'de> de::Deserialize<'de> for TierField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TierField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a service tier")
            }
            otherwise!(TierField(crate::usage::ServiceTier::Standard); bool, i64, u64, f64, unit, seq, map);
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TierField, E> {
                Ok(TierField(crate::usage::ServiceTier::parse(s)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys read anywhere in an answer.
#[derive(Clone, Copy)]
enum Field {
    Usage,
    Choices,
    ServiceTier,
    FinishReason,
    PromptTokens,
    CompletionTokens,
    TotalTokens,
    PromptDetails,
    CompletionDetails,
    CachedTokens,
    CacheWriteTokens,
    ReasoningTokens,
    AudioTokens,
    Other,
}

struct Key(Field);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(Key(match k {
                    "usage" => Field::Usage,
                    "choices" => Field::Choices,
                    "service_tier" => Field::ServiceTier,
                    "finish_reason" => Field::FinishReason,
                    "prompt_tokens" => Field::PromptTokens,
                    "completion_tokens" => Field::CompletionTokens,
                    "total_tokens" => Field::TotalTokens,
                    "prompt_tokens_details" => Field::PromptDetails,
                    "completion_tokens_details" => Field::CompletionDetails,
                    "cached_tokens" => Field::CachedTokens,
                    "cache_write_tokens" => Field::CacheWriteTokens,
                    "reasoning_tokens" => Field::ReasoningTokens,
                    "audio_tokens" => Field::AudioTokens,
                    _ => Field::Other,
                }))
            }
        }
        d.deserialize_str(V)
    }
}

/// A count as `Value::as_u64` reads it: a non-negative integer, else 0.
struct Count(u64);

impl<'de> de::Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count")
            }
            otherwise!(Count(0); bool, f64, str, unit, seq, map);
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                Ok(Count(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(n).unwrap_or(0)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `usage`: null is none; an object gives its counts; anything else is a
/// usage of zeros (as reading a `Value` gives).
struct UsageField(Option<Usage>);

impl<'de> de::Deserialize<'de> for UsageField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UsageField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }
            otherwise!(UsageField(Some(Usage::default())); bool, i64, u64, f64, str, seq);
            fn visit_unit<E: de::Error>(self) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageField, A::Error> {
                let mut u = Usage::default();
                let mut total = 0;
                while let Some(key) = map.next_key::<Key>()? {
                    match key.0 {
                        Field::PromptTokens => u.prompt_tokens = map.next_value::<Count>()?.0,
                        Field::TotalTokens => total = map.next_value::<Count>()?.0,
                        Field::CompletionTokens => {
                            u.completion_tokens = map.next_value::<Count>()?.0
                        }
                        Field::PromptDetails => {
                            let d = map.next_value::<Details>()?;
                            u.cached_tokens = d.cached;
                            u.cache_write_tokens = d.cache_write;
                            u.audio_prompt_tokens = d.audio;
                        }
                        Field::CompletionDetails => {
                            let d = map.next_value::<Details>()?;
                            u.reasoning_tokens = d.reasoning;
                            u.audio_completion_tokens = d.audio;
                        }
                        _ => skip(&mut map)?,
                    }
                }
                u.fold_total(total);
                Ok(UsageField(Some(u)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `prompt_tokens_details` / `completion_tokens_details`.
#[derive(Default)]
struct Details {
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    audio: u64,
}

impl<'de> de::Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Details;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a details object")
            }
            otherwise!(Details::default(); bool, i64, u64, f64, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Details, A::Error> {
                let mut out = Details::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key.0 {
                        Field::CachedTokens => out.cached = map.next_value::<Count>()?.0,
                        Field::CacheWriteTokens => out.cache_write = map.next_value::<Count>()?.0,
                        Field::ReasoningTokens => out.reasoning = map.next_value::<Count>()?.0,
                        Field::AudioTokens => out.audio = map.next_value::<Count>()?.0,
                        _ => skip(&mut map)?,
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// `choices`: whether it is an array, and whether any choice stopped at the
/// token limit.
#[derive(Default)]
struct Choices {
    is_array: bool,
    cut_at_length: bool,
}

impl<'de> de::Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choices;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("choices")
            }
            otherwise!(Choices::default(); bool, i64, u64, f64, str, unit, map);
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut out = Choices {
                    is_array: true,
                    cut_at_length: false,
                };
                while let Some(c) = seq.next_element::<Choice>()? {
                    out.cut_at_length |= c.0;
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// One choice: did it stop at the token limit?
struct Choice(bool);

impl<'de> de::Deserialize<'de> for Choice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a choice")
            }
            otherwise!(Choice(false); bool, i64, u64, f64, str, unit, seq);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Choice, A::Error> {
                let mut length = false;
                while let Some(key) = map.next_key::<Key>()? {
                    match key.0 {
                        Field::FinishReason => length = map.next_value::<Reason>()?.0,
                        _ => skip(&mut map)?,
                    }
                }
                Ok(Choice(length))
            }
        }
        d.deserialize_any(V)
    }
}

/// `finish_reason == "length"`.
struct Reason(bool);

impl<'de> de::Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Reason;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a finish reason")
            }
            otherwise!(Reason(false); bool, i64, u64, f64, unit, seq, map);
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Reason, E> {
                Ok(Reason(s == "length"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The figures a parsed `Value` gives.
    fn by_value(body: &[u8]) -> Option<OpenAiAnswer> {
        let v: Value = serde_json::from_slice(body).ok()?;
        Some(OpenAiAnswer {
            usage: Usage::from_openai(&v),
            cut_at_length: crate::usage::cut_at_length(&v),
            has_choices: v.get("choices").is_some_and(Value::is_array),
        })
    }

    #[test]
    fn reads_what_a_value_reads() {
        for body in [
            r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"there\"\n"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":3},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":1}}}"#,
            // xAI: reasoning outside completion_tokens, inside total_tokens.
            r#"{"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":10120,"completion_tokens":1499,"total_tokens":14428,"prompt_tokens_details":{"cached_tokens":128},"completion_tokens_details":{"reasoning_tokens":2809}}}"#,
            r#"{"choices":[{"finish_reason":"stop"},{"finish_reason":"length"}],"usage":null}"#,
            r#"{"choices":[{"text":"abc","finish_reason":"length"}]}"#,
            r#"{"choices":{"finish_reason":"length"},"usage":7}"#,
            r#"{"choices":[1,"x",null,{"finish_reason":null}],"usage":{"prompt_tokens":-3,"completion_tokens":2.5,"prompt_tokens_details":null,"completion_tokens_details":[1]}}"#,
            r#"{"usage":{"prompt_tokens":"12","completion_tokens":{"a":[1,{"b":2}]},"prompt_tokens_details":{"cache_write_tokens":9}}}"#,
            r#"[1,2,{"usage":{"prompt_tokens":1}}]"#,
            r#""just a string""#,
            r#"null"#,
            r#"{}"#,
            r#"{"nested":{"usage":{"prompt_tokens":5}},"choices":[]}"#,
            // The tier served on, before or after the usage.
            r#"{"service_tier":"flex","choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            r#"{"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":3},"service_tier":"priority"}"#,
            r#"{"usage":{"prompt_tokens":3},"service_tier":7}"#,
        ] {
            let want = by_value(body.as_bytes()).unwrap();
            assert_eq!(OpenAiAnswer::read(body.as_bytes()).unwrap(), want, "{body}");
        }
    }

    #[test]
    fn what_is_not_json_is_an_error() {
        for body in [
            "",
            "{",
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"choices":[}"#,
            r#"{"a":1} trailing"#,
            "<html>502</html>",
            r#"{"a":tru}"#,
        ] {
            assert!(by_value(body.as_bytes()).is_none(), "{body}");
            assert!(OpenAiAnswer::read(body.as_bytes()).is_err(), "{body}");
        }
    }
}
