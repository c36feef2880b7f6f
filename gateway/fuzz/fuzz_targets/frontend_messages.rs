//! Any bytes a client sends after startup: split into messages, and every message the
//! gateway decodes field by field (strings, rows, row descriptions) is decoded. Nothing
//! may panic, and a message is never longer than the bytes it came in.
#![no_main]

use airlock::proxy::postgres::wire;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Ok(message)) = wire::parse_message(&mut buf) {
        assert!(message.body.len() + 5 <= data.len());
        let mut body: Bytes = message.body.clone();
        while !body.is_empty() {
            match wire::cstr_bytes(&mut body) {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = wire::data_row(&message.body);
        let _ = wire::row_description(&message.body);
    }
});
