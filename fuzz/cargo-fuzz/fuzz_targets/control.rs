#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tianwang_fuzz::control(data));
