//! The cluster's configuration: who the replicas are, where they listen,
//! and which of them vote.
//!
//! A new cluster's first configuration comes from the `replica` file
//! ([`Membership::from_replicas`], epoch 0, everyone a voter). After that
//! it changes only through the log: an [`Op::Reconfigure`](crate::Op) is
//! a write like any other, and the configuration after it is
//! [`Membership::change`] of the one before, computed the same way by every
//! replica from the log alone. Each change makes a new *epoch*; a change
//! names the epoch it applies to, and one naming any other epoch does
//! nothing (so a retry, or a second change racing the first, cannot apply
//! twice or on top of a configuration its sender never saw).
//!
//! Members are *voters* (they promise and accept; a majority of them
//! chooses) or *learners* (they receive the log and do not vote: a new
//! replica catching up before it is promoted).

use serde::{Deserialize, Serialize};

use crate::replicas::Replicas;
use crate::{Op, ReplicaId};

/// Most members a configuration may hold: bounds what every message and
/// snapshot carries, far above any sensible cluster.
pub const MAX_MEMBERS: usize = 64;

/// Longest address accepted in a change, in bytes.
pub const MAX_ADDR_LEN: usize = 256;

/// One replica of the configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    /// Its id (unique, positive).
    pub id: ReplicaId,
    /// Where clients reach it (`host:port`).
    pub client_addr: String,
    /// Where its peers reach it (`host:port`).
    pub peer_addr: String,
    /// Whether it votes (else it is a learner).
    pub voter: bool,
}

impl Member {
    /// `voter` or `learner`.
    pub fn role(&self) -> &'static str {
        if self.voter {
            "voter"
        } else {
            "learner"
        }
    }
}

/// A configuration: its epoch and its members, in id order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Membership {
    /// 0 for a new cluster's first configuration; one more with every
    /// change.
    pub epoch: u64,
    /// The members, in id order.
    pub members: Vec<Member>,
}

/// A change of the configuration, as an administrator asks for it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Adds a learner: it receives the log, and votes once promoted.
    Add {
        /// Its id (not in use).
        id: ReplicaId,
        /// Its client address.
        client_addr: String,
        /// Its peer address.
        peer_addr: String,
    },
    /// Removes a member, voter or learner.
    Remove(ReplicaId),
    /// Makes a learner a voter.
    Promote(ReplicaId),
}

impl std::fmt::Display for MemberChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberChange::Add {
                id,
                client_addr,
                peer_addr,
            } => write!(
                f,
                "add replica {id} ({client_addr}, {peer_addr}) as a learner"
            ),
            MemberChange::Remove(id) => write!(f, "remove replica {id}"),
            MemberChange::Promote(id) => write!(f, "promote replica {id} to voter"),
        }
    }
}

impl Membership {
    /// A new cluster's first configuration: every replica of the file, a
    /// voter.
    pub fn from_replicas(replicas: &Replicas) -> Membership {
        let mut members: Vec<Member> = replicas
            .replicas
            .iter()
            .map(|r| Member {
                id: r.id,
                client_addr: r.client_addr.clone(),
                peer_addr: r.peer_addr.clone(),
                voter: true,
            })
            .collect();
        members.sort_by_key(|m| m.id);
        Membership { epoch: 0, members }
    }

    /// The member with this id.
    pub fn get(&self, id: ReplicaId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Whether `id` is a member (voter or learner).
    pub fn contains(&self, id: ReplicaId) -> bool {
        self.get(id).is_some()
    }

    /// Whether `id` votes.
    pub fn is_voter(&self, id: ReplicaId) -> bool {
        self.get(id).is_some_and(|m| m.voter)
    }

    /// The voters' ids, in id order.
    pub fn voters(&self) -> Vec<ReplicaId> {
        self.members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    }

    /// The learners' ids, in id order.
    pub fn learners(&self) -> Vec<ReplicaId> {
        self.members
            .iter()
            .filter(|m| !m.voter)
            .map(|m| m.id)
            .collect()
    }

    /// Whether the two configurations list the same replicas at the same
    /// addresses with the same roles (epochs aside).
    pub fn same_members(&self, other: &Membership) -> bool {
        self.members == other.members
    }

    /// What a write does to the configuration: `None` if it is not an
    /// [`Op::Reconfigure`]; else the configuration after it, or why it
    /// changes nothing (it names another epoch than this configuration's,
    /// or the change cannot be made). The replicas' state machines and
    /// their consensus cores both follow this, so they agree on the
    /// configuration at every log position.
    pub fn apply_op(&self, op: &Op) -> Option<Result<Membership, String>> {
        let Op::Reconfigure { epoch, change } = op else {
            return None;
        };
        Some(match epoch {
            Some(e) if *e == self.epoch => self.change(change),
            Some(e) => Err(format!(
                "the change was made for configuration epoch {e}, but the configuration \
                 is at epoch {} (another change came first); nothing was changed",
                self.epoch
            )),
            None => Err("the change names no configuration epoch".into()),
        })
    }

    /// The configuration after `change`, one epoch later; or why the
    /// change cannot be made to this one. Deterministic: every replica
    /// computes the same from the same configuration.
    pub fn change(&self, change: &MemberChange) -> Result<Membership, String> {
        let mut members = self.members.clone();
        match change {
            MemberChange::Add {
                id,
                client_addr,
                peer_addr,
            } => {
                if *id == 0 {
                    return Err("replica ids are positive integers; 0 is not one".into());
                }
                if self.contains(*id) {
                    return Err(format!("replica {id} is already a member"));
                }
                if members.len() >= MAX_MEMBERS {
                    return Err(format!(
                        "the cluster already has {MAX_MEMBERS} members, the most it may have"
                    ));
                }
                for addr in [client_addr, peer_addr] {
                    check_addr(addr)?;
                    if let Some(m) = self
                        .members
                        .iter()
                        .find(|m| &m.client_addr == addr || &m.peer_addr == addr)
                    {
                        return Err(format!("the address {addr} is already replica {}'s", m.id));
                    }
                }
                if client_addr == peer_addr {
                    return Err(format!(
                        "the client and peer addresses are the same ({client_addr})"
                    ));
                }
                members.push(Member {
                    id: *id,
                    client_addr: client_addr.clone(),
                    peer_addr: peer_addr.clone(),
                    voter: false,
                });
                members.sort_by_key(|m| m.id);
            }
            MemberChange::Remove(id) => {
                let Some(m) = self.get(*id) else {
                    return Err(format!("replica {id} is not a member"));
                };
                if m.voter && self.voters().len() == 1 {
                    return Err(format!(
                        "replica {id} is the last voter; a cluster needs at least one"
                    ));
                }
                members.retain(|m| m.id != *id);
            }
            MemberChange::Promote(id) => {
                match self.get(*id) {
                    None => return Err(format!("replica {id} is not a member")),
                    Some(m) if m.voter => return Err(format!("replica {id} is already a voter")),
                    Some(_) => {}
                }
                for m in &mut members {
                    if m.id == *id {
                        m.voter = true;
                    }
                }
            }
        }
        Ok(Membership {
            epoch: self.epoch + 1,
            members,
        })
    }
}

/// `host:port` with a non-empty host, a port in 1..=65535, and no more than
/// [`MAX_ADDR_LEN`] bytes: what the replica file and a membership change
/// both accept.
pub fn check_addr(addr: &str) -> Result<(), String> {
    if addr.len() > MAX_ADDR_LEN {
        return Err(format!(
            "an address of {} bytes is longer than {MAX_ADDR_LEN}",
            addr.len()
        ));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("the address {addr:?} is not HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("the address {addr:?} has no host"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the address {addr:?} has spaces or control characters in its host"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("the address {addr:?} has no valid port (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Membership {
        let r = Replicas::parse(
            "1 h:1 h:11\n2 h:2 h:12\n3 h:3 h:13\n",
            std::path::Path::new("replica"),
        )
        .unwrap();
        Membership::from_replicas(&r)
    }

    #[test]
    fn changes_make_new_epochs_and_refuse_what_cannot_be() {
        let m = three();
        assert_eq!(m.voters(), vec![1, 2, 3]);
        let add = MemberChange::Add {
            id: 4,
            client_addr: "h:4".into(),
            peer_addr: "h:14".into(),
        };
        let m1 = m.change(&add).unwrap();
        assert_eq!(m1.epoch, 1);
        assert_eq!(m1.learners(), vec![4]);
        assert!(m1.change(&add).unwrap_err().contains("already a member"));
        let clash = MemberChange::Add {
            id: 5,
            client_addr: "h:3".into(),
            peer_addr: "h:15".into(),
        };
        assert!(m1.change(&clash).unwrap_err().contains("replica 3's"));
        let m2 = m1.change(&MemberChange::Promote(4)).unwrap();
        assert_eq!((m2.epoch, m2.voters()), (2, vec![1, 2, 3, 4]));
        assert!(m2
            .change(&MemberChange::Promote(4))
            .unwrap_err()
            .contains("already a voter"));
        let m3 = m2.change(&MemberChange::Remove(1)).unwrap();
        assert_eq!(m3.voters(), vec![2, 3, 4]);
        assert!(m3.change(&MemberChange::Remove(1)).is_err());
        let one = Membership {
            epoch: 9,
            members: vec![m.members[0].clone()],
        };
        assert!(one
            .change(&MemberChange::Remove(1))
            .unwrap_err()
            .contains("last voter"));
        let bad = MemberChange::Add {
            id: 6,
            client_addr: "nope".into(),
            peer_addr: "h:16".into(),
        };
        assert!(m.change(&bad).is_err());
    }
}
