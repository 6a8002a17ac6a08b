//! The `replica` file: one replica a line, `ID CLIENT_ADDR PEER_ADDR
//! [REDIS_ADDR]`. The optional fourth column is where the replica serves
//! the Redis protocol (`kv-server --redis-addr` overrides it).
//!
//! `#` starts a comment; blank lines are ignored. Ids are positive integers
//! and unique; every address is unique; hostnames are allowed. A bad file is
//! refused with the file name, the line number and what is wrong.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::membership::check_addr;
use crate::ReplicaId;

/// One line of the replica file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaAddr {
    /// The replica's id.
    pub id: ReplicaId,
    /// Where clients reach it (`host:port`).
    pub client_addr: String,
    /// Where its peers reach it (`host:port`).
    pub peer_addr: String,
    /// Where it serves the Redis protocol, if the file says (a fourth
    /// column).
    pub redis_addr: Option<String>,
}

/// A parsed, validated replica file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replicas {
    /// The replicas in file order.
    pub replicas: Vec<ReplicaAddr>,
    /// Where they were read from (for messages).
    pub source: PathBuf,
}

/// Why a replica file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaFileError {
    /// The file could not be read.
    #[error("{path}: cannot read the replica file: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is malformed, or repeats an id or address.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// The file names no replica at all.
    #[error(
        "{path}: the replica file lists no replicas (expected lines of `ID CLIENT_ADDR PEER_ADDR`)"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

impl Replicas {
    /// Reads and validates a replica file.
    pub fn load(path: impl AsRef<Path>) -> Result<Replicas, ReplicaFileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ReplicaFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Replicas::parse(&text, path)
    }

    /// Parses the text of a replica file; `path` is only used in messages.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Replicas, ReplicaFileError> {
        let path = path.as_ref().to_path_buf();
        let mut replicas = Vec::new();
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |problem: String| ReplicaFileError::Line {
                path: path.clone(),
                line,
                problem,
            };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            if !(3..=4).contains(&fields.len()) {
                return Err(err(format!(
                    "expected `ID CLIENT_ADDR PEER_ADDR [REDIS_ADDR]`, found {} field(s): {content:?}",
                    fields.len()
                )));
            }
            let id: ReplicaId = match fields[0].parse() {
                Ok(id) if id > 0 => id,
                _ => {
                    return Err(err(format!(
                        "the id {:?} is not a positive integer",
                        fields[0]
                    )))
                }
            };
            if !ids.insert(id) {
                return Err(err(format!("the id {id} appears twice")));
            }
            for addr in &fields[1..] {
                check_addr(addr).map_err(&err)?;
                if !addrs.insert(addr.to_string()) {
                    return Err(err(format!("the address {addr} appears twice")));
                }
            }
            replicas.push(ReplicaAddr {
                id,
                client_addr: fields[1].to_string(),
                peer_addr: fields[2].to_string(),
                redis_addr: fields.get(3).map(|a| a.to_string()),
            });
        }
        if replicas.is_empty() {
            return Err(ReplicaFileError::Empty { path });
        }
        Ok(Replicas {
            replicas,
            source: path,
        })
    }

    /// The replica with this id.
    pub fn get(&self, id: ReplicaId) -> Option<&ReplicaAddr> {
        self.replicas.iter().find(|r| r.id == id)
    }

    /// How many replicas make a majority.
    pub fn quorum(&self) -> usize {
        self.replicas.len() / 2 + 1
    }
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.replicas {
            write!(f, "{} {} {}", r.id, r.client_addr, r.peer_addr)?;
            match &r.redis_addr {
                Some(redis) => writeln!(f, " {redis}")?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Replicas, ReplicaFileError> {
        Replicas::parse(text, "replica")
    }

    #[test]
    fn parses_comments_blank_lines_and_hostnames() {
        let r = parse(
            "# five\n\n1 127.0.0.1:7001 127.0.0.1:7101 # first\n2 localhost:7002 localhost:7102\n",
        )
        .unwrap();
        assert_eq!(r.replicas.len(), 2);
        assert_eq!(r.get(2).unwrap().client_addr, "localhost:7002");
        assert_eq!(r.quorum(), 2);
        assert_eq!(r.get(2).unwrap().redis_addr, None);
    }

    #[test]
    fn a_fourth_column_is_the_redis_address() {
        let r = parse(
            "1 a:1 a:2 a:3
2 b:1 b:2
",
        )
        .unwrap();
        assert_eq!(r.get(1).unwrap().redis_addr.as_deref(), Some("a:3"));
        assert_eq!(r.get(2).unwrap().redis_addr, None);
        assert_eq!(parse(&r.to_string()).unwrap().replicas, r.replicas);
        let e = parse("1 a:1 a:2 a:1\n").unwrap_err().to_string();
        assert!(e.contains("appears twice"), "{e}");
        let e = parse("1 a:1 a:2 a:3 a:4\n").unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
    }

    #[test]
    fn refuses_bad_lines_with_file_and_line_number() {
        let cases = [
            ("1 a:1\n", "replica:1: expected"),
            ("1 a:1 a:2\nx a:3 a:4\n", "replica:2: the id \"x\""),
            ("0 a:1 a:2\n", "not a positive integer"),
            (
                "1 a:1 a:2\n1 a:3 a:4\n",
                "replica:2: the id 1 appears twice",
            ),
            (
                "1 a:1 a:2\n2 a:1 a:4\n",
                "replica:2: the address a:1 appears twice",
            ),
            ("1 a:1 a:x\n", "no valid port"),
            ("1 :1 a:2\n", "has no host"),
            ("# nothing\n", "lists no replicas"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
