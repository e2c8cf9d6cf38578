#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringleader_fuzz::credentials(data));
