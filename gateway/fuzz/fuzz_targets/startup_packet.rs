//! A client's first message: startup, SSL/GSS requests and cancel requests. Nothing may
//! panic, and a packet that parses leaves the rest of the buffer alone.
#![no_main]

use airlock::proxy::postgres::wire;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(_)) = wire::parse_startup(&mut buf) {
        assert!(buf.len() < data.len());
    }
});
