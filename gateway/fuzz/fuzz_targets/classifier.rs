//! Statement text → parse on a sized stack → classification. Nothing may panic or
//! overflow a stack; a classification names every statement the parser found.
#![no_main]

use airlock::proxy::postgres::classify::classify;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(statements) = classify(text) {
            for statement in &statements {
                assert!(text.contains(statement.text.as_str()) || statement.text.is_empty());
            }
        }
    }
});
