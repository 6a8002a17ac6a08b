//! Human-readable rendering of keys, values, operations and times.

use std::fmt::{self, Write as _};

use crate::{Event, Op, Outcome, Ret};

/// Values longer than this are shown truncated.
const MAX_SHOWN: usize = 48;

/// Renders a byte string: quoted text if it is printable UTF-8, otherwise a
/// `b"..."` literal with escapes. Long strings are truncated.
pub(crate) fn bytes(b: &[u8]) -> String {
    let shown = &b[..b.len().min(MAX_SHOWN)];
    let mut s = String::new();
    match std::str::from_utf8(shown) {
        Ok(text) if !text.chars().any(|c| c.is_control()) => {
            let _ = write!(s, "{text:?}");
        }
        _ => {
            s.push_str("b\"");
            for &c in shown {
                s.extend(std::ascii::escape_default(c).map(char::from));
            }
            s.push('"');
        }
    }
    if b.len() > MAX_SHOWN {
        let _ = write!(s, "…({} bytes)", b.len());
    }
    s
}

/// Renders an optional value: the value, or `absent`.
pub(crate) fn value(v: Option<&[u8]>) -> String {
    match v {
        Some(v) => bytes(v),
        None => "absent".to_string(),
    }
}

/// Renders a time in nanoseconds: plain for small (hand-written) times,
/// as seconds with nanosecond precision otherwise.
pub(crate) fn time(t: u64) -> String {
    if t < 1_000_000 {
        t.to_string()
    } else {
        format!("{}.{:09}s", t / 1_000_000_000, t % 1_000_000_000)
    }
}

/// Renders an operation with its arguments, e.g. `cas("k", "a" -> "b")`.
pub(crate) fn op(op: &Op) -> String {
    match op {
        Op::Put { key, value } => format!("put({}, {})", bytes(key), bytes(value)),
        Op::Get { key } => format!("get({})", bytes(key)),
        Op::Delete { key } => format!("delete({})", bytes(key)),
        Op::Cas { key, expected, new } => format!(
            "cas({}, {} -> {})",
            bytes(key),
            value(expected.as_deref()),
            bytes(new)
        ),
    }
}

/// Renders a result, e.g. `found "a"` or `swapped, now "b"`.
pub(crate) fn ret(r: &Ret) -> String {
    match r {
        Ret::Put => "ok".to_string(),
        Ret::Get(v) => match v {
            Some(v) => format!("found {}", bytes(v)),
            None => "absent".to_string(),
        },
        Ret::Delete(true) => "existed".to_string(),
        Ret::Delete(false) => "did not exist".to_string(),
        Ret::Cas { swapped, current } => format!(
            "{}, now {}",
            if *swapped { "swapped" } else { "not swapped" },
            value(current.as_deref())
        ),
    }
}

/// Renders an event on one line:
/// `client 2: get("k") -> found "a"   [10, 20]`.
pub(crate) fn event(f: &mut fmt::Formatter<'_>, e: &Event) -> fmt::Result {
    let (result, end) = match &e.outcome {
        Outcome::Ok(r) => (ret(r), time(e.complete)),
        Outcome::Failed => ("failed".to_string(), time(e.complete)),
        Outcome::Unknown => ("unknown outcome".to_string(), "∞".to_string()),
    };
    write!(
        f,
        "client {}: {} -> {}   [{}, {}]",
        e.client,
        op(&e.op),
        result,
        time(e.invoke),
        end
    )
}
