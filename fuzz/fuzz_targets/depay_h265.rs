#![no_main]
//! H.265 depacketiser on arbitrary packets and losses: never panics, and every
//! frame it hands on is Annex B with a matching content digest.

use libfuzzer_sys::fuzz_target;
use zerodrop_crds::Codec;
use zerodrop_fuzz::{DepayInput, check_depacketizer};

fuzz_target!(|input: DepayInput<'_>| check_depacketizer(Codec::H265, &input));
