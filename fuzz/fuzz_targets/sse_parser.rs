#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| smartllm_protocol::fuzzing::sse_parser(data));
