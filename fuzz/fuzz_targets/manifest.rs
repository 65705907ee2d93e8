#![no_main]
//! The manifest parser and validator on arbitrary text: errors, never panics.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = zerodrop_crds::parse_manifests(&String::from_utf8_lossy(data));
});
