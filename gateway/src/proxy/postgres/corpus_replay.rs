//! The fuzz targets' corpora (`gateway/fuzz/corpus`, grown by `cargo fuzz`), replayed on
//! every test run with the targets' own checks: a cheap guard that no input the fuzzer
//! once found interesting panics or overflows a stack today.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};

use super::classify::classify;
use super::wire;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

#[test]
fn frontend_messages() {
    for data in corpus("frontend_messages") {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Ok(message)) = wire::parse_message(&mut buf) {
            assert!(message.body.len() + 5 <= data.len());
            let mut body: Bytes = message.body.clone();
            while !body.is_empty() && wire::cstr_bytes(&mut body).is_ok() {}
            let _ = wire::data_row(&message.body);
            let _ = wire::row_description(&message.body);
        }
    }
}

#[test]
fn startup_packets() {
    for data in corpus("startup_packet") {
        let mut buf = BytesMut::from(&data[..]);
        if let Ok(Some(_)) = wire::parse_startup(&mut buf) {
            assert!(buf.len() < data.len());
        }
    }
}

#[test]
fn classifier() {
    // On a tokio worker's stack size, as in the gateway.
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            for data in corpus("classifier") {
                if let Ok(text) = std::str::from_utf8(&data)
                    && let Ok(statements) = classify(text)
                {
                    for statement in &statements {
                        assert!(text.contains(statement.text.as_str()));
                    }
                }
            }
        })
        .unwrap()
        .join()
        .unwrap();
}
