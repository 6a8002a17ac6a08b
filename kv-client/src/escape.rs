//! Showing byte strings as text.

/// Shows bytes as text: valid UTF-8 as is, every byte that is not part of
/// valid UTF-8 as `\xNN` (two lowercase hex digits).
///
/// ```
/// assert_eq!(kv_client::escape_bytes(b"caf\xc3\xa9 \x80!"), "café \\x80!");
/// ```
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_bytes;

    #[test]
    fn utf8_is_shown_as_is() {
        assert_eq!(escape_bytes(b""), "");
        assert_eq!(escape_bytes("héllo wörld ✓".as_bytes()), "héllo wörld ✓");
        assert_eq!(escape_bytes(b"tab\tnewline\n"), "tab\tnewline\n");
    }

    #[test]
    fn invalid_bytes_are_escaped_as_hex() {
        assert_eq!(escape_bytes(b"\x80"), "\\x80");
        assert_eq!(escape_bytes(b"a\xffb\xfe"), "a\\xffb\\xfe");
        // A truncated multi-byte sequence: each byte escaped.
        assert_eq!(escape_bytes(b"\xe2\x9c"), "\\xe2\\x9c");
        // Valid text resumes right after the bad bytes.
        assert_eq!(escape_bytes(b"\xc3\x28ok"), "\\xc3(ok");
    }
}
