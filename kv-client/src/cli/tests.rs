//! Unit tests of the command line: parsing and output shapes.

use super::*;
use clap::CommandFactory;

#[test]
fn the_command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn timeout_accepts_fractions_and_refuses_nonsense() {
    assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
    for bad in ["0", "-1", "abc", "NaN", "inf", "", "1e30", "86401"] {
        assert!(parse_timeout(bad).is_err(), "{bad}");
    }
}

#[test]
fn options_may_come_before_or_after_the_command() {
    let c = Cli::try_parse_from(["kv-client", "--timeout", "0.5", "get", "--local", "k"]).unwrap();
    assert_eq!(c.timeout, Duration::from_millis(500));
    assert!(matches!(c.command, Command::Get { local: true, .. }));
    let c = Cli::try_parse_from(["kv-client", "put", "k", "-v", "--server", "h:1"]).unwrap();
    assert_eq!(c.server.as_deref(), Some("h:1"));
    assert!(matches!(c.command, Command::Put { ref value, .. } if value == "-v"));
}

#[test]
fn cas_needs_exactly_one_expectation_and_server_excludes_replicas() {
    assert!(Cli::try_parse_from(["kv-client", "cas", "k", "n"]).is_err());
    assert!(Cli::try_parse_from([
        "kv-client",
        "cas",
        "k",
        "n",
        "--expect",
        "o",
        "--expect-absent"
    ])
    .is_err());
    assert!(Cli::try_parse_from(["kv-client", "cas", "k", "n", "--expect-absent"]).is_ok());
    assert!(
        Cli::try_parse_from(["kv-client", "--server", "a:1", "--replicas", "f", "status"]).is_err()
    );
}

#[test]
fn status_lines_have_the_documented_shape() {
    let s = ReplicaStatus {
        id: 1,
        leader: false,
        leader_id: Some(3),
        ballot_round: 2,
        applied: 42,
        chosen: 42,
        snapshot: 0,
        keys: 10,
        sessions: 3,
        standing: "voter".into(),
        snapshots_installed: 1,
        duplicate_writes: 0,
        membership: kv_api::membership::Membership {
            epoch: 2,
            members: vec![kv_api::membership::Member {
                id: 1,
                client_addr: "127.0.0.1:7001".into(),
                peer_addr: "127.0.0.1:7101".into(),
                voter: true,
            }],
        },
        removed: false,
    };
    let up = serde_json::to_string(&StatusLine::new(Some(1), "127.0.0.1:7001", &Ok(s))).unwrap();
    assert_eq!(
        up,
        r#"{"id":1,"addr":"127.0.0.1:7001","up":true,"leader":false,"leader_id":3,"applied":42,"chosen":42,"snapshot":0,"keys":10,"sessions":3,"ballot_round":2,"standing":"voter","snapshots_installed":1,"role":"voter","epoch":2}"#
    );
    let down = StatusLine::new(None, "h:2", &Err(Error::Unavailable("refused".into())));
    let v: serde_json::Value = serde_json::to_value(&down).unwrap();
    assert_eq!(v["id"], serde_json::Value::Null);
    assert_eq!(v["up"], false);
    assert_eq!(v["leader"], false);
    assert_eq!(v["applied"], serde_json::Value::Null);
    assert_eq!(v["error"], "unavailable: refused");
}
