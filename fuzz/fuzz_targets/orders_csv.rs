//! Any file as an orders CSV, scanned with a 4 KiB record limit: the accounting of
//! `tests/it/support/scan_check.rs` (the property tests' own) holds.
#![no_main]

// Each target uses one of its checks.
#[allow(dead_code)]
#[path = "../../tests/it/support/scan_check.rs"]
mod scan_check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| scan_check::check_scan(data, 4096));
