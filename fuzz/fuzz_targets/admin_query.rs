#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| smartllm_protocol::fuzzing::admin_query(data));
