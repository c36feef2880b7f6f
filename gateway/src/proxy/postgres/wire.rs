//! The PostgreSQL v3 wire protocol: reading and writing messages, in both directions.
//!
//! Every message is `tag (1 byte) | length (4 bytes, including itself) | body`, except
//! the client's first message, which has no tag. Lengths are checked before anything
//! is allocated: a message over the limit is refused, not buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest message accepted from either side.
pub const MAX_MESSAGE: usize = 64 << 20;

pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// One tagged message.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

/// The client's first message.
#[derive(Debug)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: i32 },
    Startup { params: Vec<(String, String)> },
}

/// The body length a message header announces, checked before anything is allocated.
fn body_len(len: i32, header: usize) -> Result<usize, WireError> {
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l >= header)
        .ok_or_else(|| WireError::Malformed(format!("length {len}")))?;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    Ok(len - header)
}

/// Takes the client's untagged first message off the front of `buf`, or `None` if it
/// has not fully arrived.
pub fn parse_startup(buf: &mut BytesMut) -> Result<Option<Startup>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = body_len(i32::from_be_bytes(buf[..4].try_into().expect("4 bytes")), 4)?;
    if !(4..=10_000).contains(&len) {
        return Err(WireError::Malformed(format!(
            "startup packet of {len} bytes"
        )));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(len).freeze();
    let code = body.get_i32();
    match code {
        SSL_REQUEST => Ok(Some(Startup::Ssl)),
        GSSENC_REQUEST => Ok(Some(Startup::GssEnc)),
        CANCEL_REQUEST if body.remaining() == 8 => Ok(Some(Startup::Cancel {
            pid: body.get_i32(),
            key: body.get_i32(),
        })),
        PROTOCOL_V3 => {
            let mut params = Vec::new();
            loop {
                let key = cstr(&mut body)?;
                if key.is_empty() {
                    break;
                }
                params.push((key, cstr(&mut body)?));
            }
            Ok(Some(Startup::Startup { params }))
        }
        other => Err(WireError::Malformed(format!(
            "unsupported protocol version {}.{}",
            other >> 16,
            other & 0xffff
        ))),
    }
}

/// Takes one tagged message off the front of `buf`; `Err(n)` if it has not fully
/// arrived, where `n` is how many bytes the whole message takes, so the caller can
/// reserve room for it once.
pub fn parse_message(buf: &mut BytesMut) -> Result<Result<Message, usize>, WireError> {
    if buf.len() < 5 {
        return Ok(Err(5));
    }
    let len = body_len(
        i32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")),
        4,
    )?;
    if buf.len() < 5 + len {
        return Ok(Err(5 + len));
    }
    let tag = buf[0];
    buf.advance(5);
    Ok(Ok(Message {
        tag,
        body: buf.split_to(len).freeze(),
    }))
}

/// Reads a NUL-terminated string from the front of `buf`.
pub fn cstr(buf: &mut Bytes) -> Result<String, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Malformed("string without its NUL".into()))?;
    let s = std::str::from_utf8(&buf[..end])
        .map_err(|_| WireError::Malformed("string is not UTF-8".into()))?
        .to_string();
    buf.advance(end + 1);
    Ok(s)
}

/// Reads a NUL-terminated string from the front of `buf`, replacing bytes that are not
/// UTF-8 (the upstream's text is UTF-8; this only keeps a bad byte from hiding a field).
pub fn cstr_lossy(buf: &mut Bytes) -> Result<String, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Malformed("string without its NUL".into()))?;
    let s = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end + 1);
    Ok(s)
}

/// Reads a NUL-terminated string from the front of `buf`; the inner `Err` holds its
/// bytes when they are not UTF-8, so the caller can refuse that statement and go on.
pub fn cstr_bytes(buf: &mut Bytes) -> Result<Result<String, Bytes>, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Malformed("string without its NUL".into()))?;
    let bytes = buf.split_to(end);
    buf.advance(1);
    Ok(match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => Err(bytes),
    })
}

/// Builds one tagged message.
pub fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(tag);
    out.put_i32(0);
    body(&mut out);
    let len = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// Appends a message read from one side, as it was, for the other.
pub fn put_message(out: &mut BytesMut, m: &Message) {
    out.put_u8(m.tag);
    out.put_i32(m.body.len() as i32 + 4);
    out.put_slice(&m.body);
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// An ErrorResponse. `severity` is ERROR or FATAL.
pub fn error_response(severity: &str, code: &str, message: &str, hint: Option<&str>) -> Bytes {
    self::message(b'E', |out| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            out.put_u8(field);
            put_cstr(out, value);
        }
        if let Some(hint) = hint {
            out.put_u8(b'H');
            put_cstr(out, hint);
        }
        out.put_u8(0);
    })
}

/// One field (`M` message, `C` SQLSTATE, …) of an ErrorResponse or NoticeResponse body.
pub fn error_field(body: &Bytes, wanted: u8) -> Option<String> {
    let mut rest = body.clone();
    while let Some(&code) = rest.first() {
        rest.advance(1);
        if code == 0 {
            break;
        }
        let value = cstr_lossy(&mut rest).ok()?;
        if code == wanted {
            return Some(value);
        }
    }
    None
}

/// ReadyForQuery with a transaction status (`I`, `T` or `E`).
pub fn ready_for_query(status: u8) -> Bytes {
    message(b'Z', |out| out.put_u8(status))
}

/// An Authentication message of the given kind with `data` after it.
pub fn authentication(kind: i32, data: &[u8]) -> Bytes {
    message(b'R', |out| {
        out.put_i32(kind);
        out.put_slice(data);
    })
}

/// A column of a RowDescription: name, type OID, and format (0 text, 1 binary).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub type_oid: u32,
    pub format: i16,
}

/// Parses a RowDescription body.
pub fn row_description(body: &Bytes) -> Result<Vec<Field>, WireError> {
    let mut b = body.clone();
    if b.remaining() < 2 {
        return Err(WireError::Malformed("short RowDescription".into()));
    }
    let n = b.get_i16();
    let mut fields = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = cstr(&mut b)?;
        if b.remaining() < 18 {
            return Err(WireError::Malformed("short RowDescription field".into()));
        }
        b.advance(6); // table OID, column number
        let type_oid = b.get_u32();
        b.advance(6); // type size, type modifier
        let format = b.get_i16();
        fields.push(Field {
            name,
            type_oid,
            format,
        });
    }
    Ok(fields)
}

/// Parses a DataRow body into its values (`None` is SQL NULL).
pub fn data_row(body: &Bytes) -> Result<Vec<Option<Bytes>>, WireError> {
    let mut b = body.clone();
    if b.remaining() < 2 {
        return Err(WireError::Malformed("short DataRow".into()));
    }
    let n = b.get_i16();
    let mut values = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.remaining() < 4 {
            return Err(WireError::Malformed("short DataRow value".into()));
        }
        let len = b.get_i32();
        if len < 0 {
            values.push(None);
        } else {
            let len = len as usize;
            if b.remaining() < len {
                return Err(WireError::Malformed("DataRow value past its end".into()));
            }
            values.push(Some(b.split_to(len)));
        }
    }
    Ok(values)
}

/// Builds a DataRow.
pub fn encode_data_row(values: &[Option<Bytes>]) -> Bytes {
    message(b'D', |out| {
        out.put_i16(values.len() as i16);
        for value in values {
            match value {
                None => out.put_i32(-1),
                Some(v) => {
                    out.put_i32(v.len() as i32);
                    out.put_slice(v);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_and_messages_round_trip() {
        let mut packet = BytesMut::new();
        packet.put_i32(0);
        packet.put_i32(PROTOCOL_V3);
        for s in ["user", "g_1", "database", "prod-db", ""] {
            put_cstr(&mut packet, s);
        }
        let len = packet.len() as i32;
        packet[..4].copy_from_slice(&len.to_be_bytes());
        let Some(Startup::Startup { params }) = parse_startup(&mut packet).unwrap() else {
            panic!("startup")
        };
        assert_eq!(
            params,
            [
                ("user".into(), "g_1".into()),
                ("database".into(), "prod-db".into())
            ]
        );

        let row = encode_data_row(&[Some(Bytes::from_static(b"a@b.io")), None]);
        let mut buf = BytesMut::from(&row[..]);
        let msg = parse_message(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(msg.tag, b'D');
        assert_eq!(
            data_row(&msg.body).unwrap(),
            [Some(Bytes::from_static(b"a@b.io")), None]
        );
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        let mut huge = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            parse_message(&mut huge),
            Err(WireError::TooLarge(_))
        ));
        let mut negative = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xf0][..]);
        assert!(matches!(
            parse_message(&mut negative),
            Err(WireError::Malformed(_))
        ));
        let mut partial = BytesMut::from(&[b'Q', 0, 0, 0, 100, b'S'][..]);
        assert!(matches!(parse_message(&mut partial), Ok(Err(101))));
        let mut startup = BytesMut::from(&[0, 0, 0x7f, 0xff, 0, 3, 0, 0][..]);
        assert!(parse_startup(&mut startup).is_err());
        let mut bad_row = BytesMut::new();
        bad_row.put_i16(1);
        bad_row.put_i32(50);
        assert!(data_row(&bad_row.freeze()).is_err());
    }
}
