//! Any message body: the event parser answers an event or a reason, never panics, and every object it
//! finds has a bucket and a key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_agent::event::{parse, Event};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    match parse(body) {
        Ok(Event::Objects { objects, .. }) => {
            for o in objects {
                assert!(!o.bucket.is_empty() && !o.key.is_empty(), "{o:?}");
            }
        }
        Ok(_) => {}
        Err(reason) => assert!(!reason.to_string().is_empty()),
    }
});
