//! The state a live upgrade hands to the new process (`reactor::handoff`): any bytes are
//! refused or accepted by the checks without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::reactor::Saved;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Saved::decode(data) {
        let _ = s.check(usize::from(data[0] % 16));
    }
});
