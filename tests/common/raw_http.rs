//! Raw HTTP/1.1 on the wire: whole responses parsed strictly off the
//! bytes a test read from a socket, for tests that must see exactly what
//! the server wrote (framing, closes) rather than a client library's view.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::DEADLINE;

/// One response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The header lines of a head (after its first line), name lowercased.
pub fn header_lines(head: &str) -> impl Iterator<Item = (String, &str)> {
    head.split("\r\n").skip(1).filter_map(|line| {
        let (name, value) = line.split_once(':')?;
        Some((name.to_ascii_lowercase(), value.trim()))
    })
}

/// The whole responses at the front of `bytes`; `eof`: the connection has
/// ended, so a body delimited by the close is complete.
pub fn parse_responses(bytes: &[u8], eof: bool) -> Vec<RawResponse> {
    let mut responses = Vec::new();
    let mut rest = bytes;
    while let Some(head_end) = find(rest, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let after = &rest[head_end + 4..];
        let mut length = None;
        let mut chunked = false;
        for (name, value) in header_lines(&head) {
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().ends_with("chunked"),
                _ => {}
            }
        }
        let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
            (Vec::new(), 0)
        } else if chunked {
            match decode_chunked(after) {
                Ok(Some(decoded)) => decoded,
                _ => break,
            }
        } else if let Some(length) = length {
            if after.len() < length {
                break;
            }
            (after[..length].to_vec(), length)
        } else if eof {
            (after.to_vec(), after.len())
        } else {
            break;
        };
        responses.push(RawResponse { status, head, body });
        rest = &after[used..];
    }
    responses
}

/// A chunked body at the front of `bytes`, decoded strictly: the body and
/// the bytes it took; `None` while incomplete.
pub fn decode_chunked(bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&bytes[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&bytes[at..at + line_end]).into_owned();
        let digits = line.split(';').next().unwrap_or("").trim();
        if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!("bad chunk size line {line:?}"));
        }
        let size = usize::from_str_radix(digits, 16).map_err(|e| e.to_string())?;
        at += line_end + 2;
        if size == 0 {
            // Trailer lines up to an empty one.
            loop {
                let Some(end) = find(&bytes[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if bytes.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[at..at + size]);
        if &bytes[at + size..at + size + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".to_string());
        }
        at += size + 2;
    }
}

/// Reads from `stream` into `received` until it holds `count` whole
/// responses; panics if the server closes first or sends nothing more
/// within [`DEADLINE`].
pub async fn read_responses(stream: &mut TcpStream, received: &mut Vec<u8>, count: usize) {
    let mut buffer = [0u8; 4096];
    while parse_responses(received, false).len() < count {
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(read > 0, "closed before the answer");
        received.extend_from_slice(&buffer[..read]);
    }
}
