//! The one-line handshakes in front of a stream (the vsock device's `OK <port>`, the forward
//! service's port and answer): read byte by byte, so that whatever follows stays unread for
//! the protocol on top.

use std::io::{BufRead, BufReader, Read};

/// One line from `r` without its newline; `None` if `r` ended, or `max` bytes passed, before
/// a newline.
pub fn read_line(r: impl Read, max: u64) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    BufReader::with_capacity(1, r)
        .take(max)
        .read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn reads_one_line_and_leaves_the_rest() {
        let mut r: &[u8] = b"OK 1024\nrest";
        assert_eq!(read_line(&mut r, 64).unwrap().as_deref(), Some("OK 1024"));
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "rest");
    }

    #[test]
    fn an_unfinished_or_overlong_line_is_none() {
        assert_eq!(read_line(&b"OK"[..], 64).unwrap(), None);
        assert_eq!(read_line(&b""[..], 64).unwrap(), None);
        assert_eq!(read_line(&b"1234567\n"[..], 7).unwrap(), None);
        assert_eq!(
            read_line(&b"123456\n"[..], 7).unwrap().as_deref(),
            Some("123456")
        );
    }
}
