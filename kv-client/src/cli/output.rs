//! How command results and errors are shown: `--output text` (values on
//! stdout, messages on stderr) or `--output json` (one JSON object a line
//! on stdout, errors included). A command builds a [`Reply`] holding both
//! forms; [`Reply::emit`] writes the chosen one, so one-shot commands and
//! the shell print exactly the same.

use std::io::Write;

use serde::Serialize;

use super::{Failure, Format, EXIT_NO, EXIT_OK};
use crate::escape_bytes;

/// What a command has to show, in both formats, and its exit status.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The exit status.
    pub(crate) code: u8,
    /// Text format: lines for stdout.
    text: Vec<String>,
    /// Text format: lines for stderr (without the `kv-client: ` prefix).
    notes: Vec<String>,
    /// JSON format: lines for stdout.
    json: Vec<String>,
    /// The error, shown last (text: on stderr; JSON: on stdout).
    failure: Option<Failure>,
}

/// A byte string as JSON shows it: as text (UTF-8 as is, other bytes as
/// `\xNN`), and when that text is not exact, also as base64.
pub(crate) struct Shown {
    text: String,
    base64: Option<String>,
}

impl Shown {
    pub(crate) fn of(v: &[u8]) -> Shown {
        Shown {
            text: escape_bytes(v),
            base64: std::str::from_utf8(v).is_err().then(|| base64(v)),
        }
    }

    /// The text form.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The exact bytes in base64, if the text is not exact.
    pub(crate) fn base64(&self) -> Option<&str> {
        self.base64.as_deref()
    }
}

#[derive(Serialize)]
struct GetJson {
    key: String,
    value: Option<String>,
    found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    create_revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mod_revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
}

#[derive(Serialize)]
struct PutJson {
    ok: bool,
    slot: u64,
}

#[derive(Serialize)]
struct DeleteJson {
    existed: bool,
    slot: u64,
}

#[derive(Serialize)]
struct CasJson {
    swapped: bool,
    current: Option<String>,
    slot: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_base64: Option<String>,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
    kind: &'a str,
}

/// The JSON line of an error: `{"error":"...","kind":"..."}`.
pub(crate) fn error_json(f: &Failure) -> String {
    to_json(&ErrorJson {
        error: &f.msg,
        kind: f.kind,
    })
}

#[derive(Serialize)]
struct MemberJson<'a> {
    id: u64,
    role: &'static str,
    client_addr: &'a str,
    peer_addr: &'a str,
    epoch: u64,
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

impl Reply {
    /// A failed command.
    pub(crate) fn failed(f: Failure) -> Reply {
        let mut r = Reply::default();
        r.fail(f);
        r
    }

    /// Marks the command failed (its lines so far are still shown).
    pub(crate) fn fail(&mut self, f: Failure) {
        self.code = f.code;
        self.failure = Some(f);
    }

    /// A line with a text form and a JSON form (`range`, `txn`).
    pub(crate) fn line<T: Serialize>(&mut self, text: String, json: &T) {
        self.text.push(text);
        self.json.push(to_json(json));
    }

    /// A line that is JSON in both formats (`status`, `fault`, `bench`).
    pub(crate) fn json_line<T: Serialize>(&mut self, v: &T) {
        let line = to_json(v);
        self.text.push(line.clone());
        self.json.push(line);
    }

    /// A configuration: one line a member, `ID ROLE CLIENT_ADDR
    /// PEER_ADDR` (JSON: an object with those fields and `epoch`).
    pub(crate) fn members(m: &kv_api::membership::Membership) -> Reply {
        let mut r = Reply::default();
        for member in &m.members {
            r.text.push(format!(
                "{} {} {} {}",
                member.id,
                member.role(),
                member.client_addr,
                member.peer_addr
            ));
            r.json.push(to_json(&MemberJson {
                id: member.id,
                role: member.role(),
                client_addr: &member.client_addr,
                peer_addr: &member.peer_addr,
                epoch: m.epoch,
            }));
        }
        r
    }

    /// `put` succeeded.
    pub(crate) fn put(slot: u64) -> Reply {
        Reply {
            json: vec![to_json(&PutJson { ok: true, slot })],
            ..Reply::default()
        }
    }

    /// `get` answered, without revisions.
    #[cfg(test)]
    pub(crate) fn get(key: &[u8], value: Option<&[u8]>) -> Reply {
        Reply::get_with(key, value, None)
    }

    /// `get` answered, with the key's revisions.
    pub(crate) fn get_kv(key: &[u8], kv: Option<&kv_api::KeyValue>) -> Reply {
        Reply::get_with(key, kv.map(|kv| kv.value.as_slice()), kv)
    }

    fn get_with(key: &[u8], value: Option<&[u8]>, kv: Option<&kv_api::KeyValue>) -> Reply {
        let k = Shown::of(key);
        let v = value.map(Shown::of);
        let json = to_json(&GetJson {
            key: k.text.clone(),
            found: v.is_some(),
            value_base64: v.as_ref().and_then(|v| v.base64.clone()),
            value: v.as_ref().map(|v| v.text.clone()),
            key_base64: k.base64,
            create_revision: kv.map(|kv| kv.create_revision),
            mod_revision: kv.map(|kv| kv.mod_revision),
            version: kv.map(|kv| kv.version),
        });
        match v {
            Some(v) => Reply {
                code: EXIT_OK,
                text: vec![v.text],
                json: vec![json],
                ..Reply::default()
            },
            None => Reply {
                code: EXIT_NO,
                notes: vec![format!("no such key: {}", k.text)],
                json: vec![json],
                ..Reply::default()
            },
        }
    }

    /// `delete` succeeded.
    pub(crate) fn deleted(existed: bool, slot: u64) -> Reply {
        Reply {
            json: vec![to_json(&DeleteJson { existed, slot })],
            ..Reply::default()
        }
    }

    /// `cas` was evaluated.
    pub(crate) fn cas(swapped: bool, current: Option<&[u8]>, slot: u64) -> Reply {
        let c = current.map(Shown::of);
        let json = to_json(&CasJson {
            swapped,
            current_base64: c.as_ref().and_then(|c| c.base64.clone()),
            current: c.as_ref().map(|c| c.text.clone()),
            slot,
        });
        let mut r = Reply {
            json: vec![json],
            ..Reply::default()
        };
        if !swapped {
            r.code = EXIT_NO;
            r.notes.push(match c {
                Some(c) => format!("not swapped; the current value is {}", c.text),
                None => "not swapped; the key is absent".to_string(),
            });
        }
        r
    }

    /// The lines for stdout and for stderr in `format`.
    pub(crate) fn render(&self, format: Format) -> (Vec<String>, Vec<String>) {
        let fail = self.failure.as_ref();
        match format {
            Format::Text => {
                let mut err: Vec<String> = self
                    .notes
                    .iter()
                    .map(|n| format!("kv-client: {n}"))
                    .collect();
                err.extend(fail.map(|f| format!("kv-client: {}", f.msg)));
                (self.text.clone(), err)
            }
            Format::Json => {
                let mut out = self.json.clone();
                out.extend(fail.map(error_json));
                (out, Vec::new())
            }
        }
    }

    /// Writes the reply to stdout and stderr in `format`, flushes, and
    /// returns the exit status.
    pub(crate) fn emit(&self, format: Format) -> u8 {
        let (out, err) = self.render(format);
        let mut stdout = std::io::stdout().lock();
        for l in out {
            let _ = writeln!(stdout, "{l}");
        }
        let _ = stdout.flush();
        let mut stderr = std::io::stderr().lock();
        for l in err {
            let _ = writeln!(stderr, "{l}");
        }
        self.code
    }
}

/// Standard base64 (RFC 4648, with padding).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xff, 0x80]), "/4A=");
    }

    #[test]
    fn get_json_has_the_documented_shape() {
        let r = Reply::get(b"color", Some(b"blue"));
        assert_eq!(r.code, 0);
        assert_eq!(
            r.render(Format::Json).0,
            [r#"{"key":"color","value":"blue","found":true}"#]
        );
        assert_eq!(r.render(Format::Text).0, ["blue"]);
        let r = Reply::get(b"color", None);
        assert_eq!(r.code, 1);
        assert_eq!(
            r.render(Format::Json).0,
            [r#"{"key":"color","value":null,"found":false}"#]
        );
        assert_eq!(r.render(Format::Text).1, ["kv-client: no such key: color"]);
        let kv = kv_api::KeyValue {
            key: b"color".to_vec(),
            value: b"blue".to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: 0,
        };
        assert_eq!(
            Reply::get_kv(b"color", Some(&kv)).render(Format::Json).0,
            [
                r#"{"key":"color","value":"blue","found":true,"create_revision":3,"mod_revision":7,"version":2}"#
            ]
        );
        let r = Reply::get(b"k", Some(b"a\xffb"));
        assert_eq!(
            r.render(Format::Json).0,
            [r#"{"key":"k","value":"a\\xffb","found":true,"value_base64":"Yf9i"}"#]
        );
    }

    #[test]
    fn writes_and_errors_have_the_documented_json() {
        assert_eq!(
            Reply::put(7).render(Format::Json).0,
            [r#"{"ok":true,"slot":7}"#]
        );
        assert!(Reply::put(7).render(Format::Text).0.is_empty());
        assert_eq!(
            Reply::deleted(false, 8).render(Format::Json).0,
            [r#"{"existed":false,"slot":8}"#]
        );
        let r = Reply::cas(false, Some(b"old"), 9);
        assert_eq!(r.code, 1);
        assert_eq!(
            r.render(Format::Json).0,
            [r#"{"swapped":false,"current":"old","slot":9}"#]
        );
        let f = Failure {
            code: 3,
            kind: "timeout",
            msg: "timed out: x".into(),
        };
        let r = Reply::failed(f);
        assert_eq!(r.code, 3);
        assert_eq!(
            r.render(Format::Json),
            (
                vec![r#"{"error":"timed out: x","kind":"timeout"}"#.to_string()],
                vec![]
            )
        );
        assert_eq!(
            r.render(Format::Text),
            (vec![], vec!["kv-client: timed out: x".to_string()])
        );
    }
}
