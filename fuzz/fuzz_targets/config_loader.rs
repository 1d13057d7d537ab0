#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| smartllm_config::fuzzing::config_loader(data));
