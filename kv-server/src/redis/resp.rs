//! RESP2 framing: requests in (arrays of bulk strings, or inline lines),
//! replies out.
//!
//! # Why by hand
//!
//! A server reads only one shape of RESP: an array of bulk strings (or an
//! inline line). The crates we looked at (`redis-protocol`, `resp`) decode
//! every RESP type into a general frame tree, and none takes a limit on a
//! bulk string's or an array's declared length before it allocates or
//! waits for that many bytes: the limits would have to be a pre-scan of the
//! same headers anyway. This parser is that pre-scan: it looks only at
//! headers until a whole request is in the buffer, refuses any declared
//! length over [`FrameLimits`] before reading or reserving anything for
//! it, and copies the arguments out once, when the request is complete.
//! Nothing a client sends reaches a panic (the unit tests below feed it
//! every prefix of valid requests and random bytes).

/// Bounds on what one request may declare.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// Longest bulk string (an argument): the larger of the key and value
    /// limits.
    pub max_bulk: usize,
    /// Most arguments in one request.
    pub max_args: usize,
    /// Most bytes of arguments in one request, together.
    pub max_request: usize,
    /// Longest inline request line.
    pub max_inline: usize,
}

/// Why a request cannot be framed: answered with `-ERR Protocol error: …`
/// (Redis's texts), then the connection is closed, as Redis does, since
/// where the next request starts is unknown.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// One complete request and the bytes it took from the buffer.
pub type Parsed = (Vec<Vec<u8>>, usize);

/// Reads a `\r\n`-terminated line at `at`: the line without it and the
/// position after it, or `None` if incomplete. A line longer than `max`
/// (terminated or not) is an error.
fn line(buf: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, ()> {
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(nl) if nl > max + 1 => Err(()),
        Some(nl) => {
            let l = &rest[..nl];
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            Ok(Some((l, at + nl + 1)))
        }
        None if rest.len() > max + 1 => Err(()),
        None => Ok(None),
    }
}

/// A decimal integer as Redis reads it in headers: optional `-`, digits,
/// no more than 18 of them.
fn int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if neg { -v } else { v })
}

/// The first complete request in `buf`, if there is one.
pub fn parse(buf: &[u8], limits: &FrameLimits) -> Result<Option<Parsed>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return parse_inline(buf, limits);
    }
    let err = |m: &str| ProtocolError(format!("Protocol error: {m}"));
    let Some((head, mut at)) = line(buf, 1, 32).map_err(|_| err("invalid multibulk length"))?
    else {
        return Ok(None);
    };
    let n = int(head).ok_or_else(|| err("invalid multibulk length"))?;
    if n <= 0 {
        // `*0` and `*-1` are empty requests Redis skips.
        return Ok(Some((Vec::new(), at)));
    }
    if n as u64 > limits.max_args as u64 {
        return Err(err("invalid multibulk length"));
    }
    // First pass: headers only, nothing copied or reserved until the whole
    // request is here.
    let mut spans = Vec::with_capacity((n as usize).min(64));
    let mut total = 0usize;
    for _ in 0..n {
        if at >= buf.len() {
            return Ok(None);
        }
        if buf[at] != b'$' {
            return Err(err(&format!(
                "expected '$', got '{}'",
                char::from(buf[at]).escape_default()
            )));
        }
        let Some((head, start)) = line(buf, at + 1, 32).map_err(|_| err("invalid bulk length"))?
        else {
            return Ok(None);
        };
        let len = int(head).ok_or_else(|| err("invalid bulk length"))?;
        if len < 0 || len as u64 > limits.max_bulk as u64 {
            return Err(err("invalid bulk length"));
        }
        let len = len as usize;
        total = total.saturating_add(len);
        if total > limits.max_request {
            return Err(err(
                "request too large (the arguments together are over the limit)",
            ));
        }
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(err("bulk string not terminated by CRLF"));
        }
        spans.push((start, end));
        at = end + 2;
    }
    let args = spans.into_iter().map(|(s, e)| buf[s..e].to_vec()).collect();
    Ok(Some((args, at)))
}

/// An inline request: one line, arguments split on spaces; double and
/// single quotes group as in Redis (`"a b"`, with `\n`, `\xHH` escapes in
/// double quotes).
fn parse_inline(buf: &[u8], limits: &FrameLimits) -> Result<Option<Parsed>, ProtocolError> {
    let Some((l, next)) = line(buf, 0, limits.max_inline)
        .map_err(|_| ProtocolError("Protocol error: too big inline request".into()))?
    else {
        return Ok(None);
    };
    let args = split_inline(l)
        .ok_or_else(|| ProtocolError("Protocol error: unbalanced quotes in request".into()))?;
    if args.len() > limits.max_args {
        return Err(ProtocolError(
            "Protocol error: invalid multibulk length".into(),
        ));
    }
    Ok(Some((args, next)))
}

/// Splits an inline line as Redis's `sdssplitargs` does (the common part).
fn split_inline(l: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < l.len() {
        while i < l.len() && l[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == l.len() {
            break;
        }
        let mut arg = Vec::new();
        match l[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let c = *l.get(i)?;
                    i += 1;
                    if c == q {
                        // A closing quote must end the argument.
                        if i < l.len() && !l[i].is_ascii_whitespace() {
                            return None;
                        }
                        break;
                    }
                    if c == b'\\' && q == b'"' {
                        let e = *l.get(i)?;
                        i += 1;
                        arg.push(match e {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            b'x' => {
                                let hex = l.get(i..i + 2)?;
                                let v =
                                    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                                i += 2;
                                v
                            }
                            other => other,
                        });
                    } else if c == b'\\' && q == b'\'' && l.get(i) == Some(&b'\'') {
                        arg.push(b'\'');
                        i += 1;
                    } else {
                        arg.push(c);
                    }
                }
            }
            _ => {
                while i < l.len() && !l[i].is_ascii_whitespace() {
                    arg.push(l[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
    Some(args)
}

/// A reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `+text`
    Simple(String),
    /// `-text` (the text starts with its code: `ERR`, `WRONGTYPE`, …).
    Error(String),
    /// `:n`
    Int(i64),
    /// `$len bytes`, or `$-1` for `None`.
    Bulk(Option<Vec<u8>>),
    /// `*n …`, or `*-1` for `None`.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// `+OK`.
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// `-ERR text`.
    pub fn err(text: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {text}"))
    }

    /// A bulk string.
    pub fn bulk(b: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(Some(b.into()))
    }

    /// The null bulk string.
    pub fn nil() -> Reply {
        Reply::Bulk(None)
    }

    /// An array.
    pub fn array(items: Vec<Reply>) -> Reply {
        Reply::Array(Some(items))
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => line_of(out, b'+', s.as_bytes()),
            Reply::Error(s) => line_of(out, b'-', s.as_bytes()),
            Reply::Int(n) => line_of(out, b':', n.to_string().as_bytes()),
            Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(Some(b)) => {
                line_of(out, b'$', b.len().to_string().as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(Some(items)) => {
                line_of(out, b'*', items.len().to_string().as_bytes());
                for i in items {
                    i.encode(out);
                }
            }
        }
    }
}

/// A one-line reply; CR and LF inside it (an error text quoting a client's
/// bytes) become spaces, which would otherwise end the line early.
fn line_of(out: &mut Vec<u8>, tag: u8, text: &[u8]) {
    out.push(tag);
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: FrameLimits = FrameLimits {
        max_bulk: 16,
        max_args: 8,
        max_request: 40,
        max_inline: 32,
    };

    fn args(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn arrays_of_bulk_strings_and_inline_lines_parse() {
        let req = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n";
        let (a, n) = parse(req, &L).unwrap().unwrap();
        assert_eq!(a, args(&["GET", "k"]));
        let (b, m) = parse(&req[n..], &L).unwrap().unwrap();
        assert_eq!(b, args(&["PING"]));
        assert_eq!(n + m, req.len());
        let (c, _) = parse(b"set \"a b\" 'c\\'d' \"\\x41\\n\"\r\n", &L)
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            vec![
                b"set".to_vec(),
                b"a b".to_vec(),
                b"c'd".to_vec(),
                b"A\n".to_vec()
            ]
        );
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete_not_an_error() {
        let req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        for i in 0..req.len() {
            assert_eq!(parse(&req[..i], &L), Ok(None), "prefix {i}");
        }
        assert!(parse(req, &L).unwrap().is_some());
    }

    #[test]
    fn declared_lengths_over_the_limits_are_refused_before_the_bytes_come() {
        for bad in [
            &b"*9\r\n"[..],
            b"*1\r\n$17\r\n",
            b"*1\r\n$99999999999999999999\r\n",
            b"*1\r\n$-5\r\n",
            b"*x\r\n",
            b"*1\r\n:1\r\n",
            b"*3\r\n$16\r\n0123456789abcdef\r\n$16\r\n0123456789abcdef\r\n$16\r\n",
            b"*1\r\n$1\r\nab\r\n",
        ] {
            assert!(
                parse(bad, &L).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A header line that never ends is refused once it is too long.
        assert!(parse(&[b'*'; 100], &L).is_err());
        assert!(parse(&[b'a'; 100], &L).is_err());
        assert!(parse(b"\"unbalanced\r\n", &L).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(b"*$\r\n0123-x \"'\\"[(x % 14) as usize]);
            }
            let _ = parse(&b, &L);
        }
    }

    #[test]
    fn replies_encode_as_redis_does() {
        let mut out = Vec::new();
        Reply::array(vec![
            Reply::Int(-3),
            Reply::nil(),
            Reply::bulk("ab"),
            Reply::ok(),
        ])
        .encode(&mut out);
        Reply::err("bad\r\nline").encode(&mut out);
        assert_eq!(
            out,
            b"*4\r\n:-3\r\n$-1\r\n$2\r\nab\r\n+OK\r\n-ERR bad  line\r\n"
        );
    }
}
