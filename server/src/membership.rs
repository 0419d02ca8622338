//! The rules of online membership change (BRIEF §3.1): one server at a time, and a
//! cluster of 1, 3, 4 or 5 voters after every step. Pure: the driver asks these
//! functions before it proposes a configuration change, so a refusal changes nothing.
//!
//! Adding a server takes two changes: it joins as a learner (it receives the log but
//! does not vote, so a slow catch-up cannot cost the cluster its quorum), and once it
//! has caught up it is promoted to voter. Removing one is a single change.

use std::fmt;

/// Voter counts a cluster may have (BRIEF §3.1): 2 cannot survive any failure and more
/// than 5 only slows every commit.
pub const ALLOWED_VOTERS: [usize; 4] = [1, 3, 4, 5];

/// One step of a membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new server joins as a learner, reachable at `addr`.
    AddLearner { id: u64, addr: String },
    /// A learner that has caught up becomes a voter.
    Promote { id: u64 },
    /// A voter or learner leaves.
    Remove { id: u64 },
}

impl Change {
    pub fn id(&self) -> u64 {
        match self {
            Change::AddLearner { id, .. } | Change::Promote { id } | Change::Remove { id } => *id,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddLearner { id, addr } => write!(f, "add server {id} ({addr}) as a learner"),
            Change::Promote { id } => write!(f, "promote server {id} to voter"),
            Change::Remove { id } => write!(f, "remove server {id}"),
        }
    }
}

/// The membership as the leader sees it when a change is asked for.
#[derive(Debug, Clone, Default)]
pub struct View<'a> {
    pub voters: &'a [u64],
    pub learners: &'a [u64],
    /// Voters this leader has heard from recently, itself included.
    pub running_voters: &'a [u64],
}

/// Why a change is refused; each names what the operator can do about it.
pub fn check(view: &View<'_>, change: &Change) -> Result<(), String> {
    let voters = view.voters.len();
    let is_voter = |id: u64| view.voters.contains(&id);
    let is_learner = |id: u64| view.learners.contains(&id);
    match change {
        Change::AddLearner { id, addr } => {
            if *id == 0 {
                return Err("server id 0 is reserved; use an id of 1 or more".into());
            }
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!(
                    "bad address {addr:?}: expected ip:port, e.g. 192.0.2.14:7100"
                ));
            }
            if is_voter(*id) {
                return Err(format!("server {id} is already a voter"));
            }
            if is_learner(*id) {
                return Err(format!(
                    "server {id} is already joining as a learner; it is promoted once it \
                     has caught up (or remove it with `lockctl server remove {id}`)"
                ));
            }
            if let Some(other) = view.learners.first() {
                return Err(format!(
                    "server {other} is still joining; add one server at a time (or remove \
                     it with `lockctl server remove {other}`)"
                ));
            }
            allowed_size(voters, voters + 1)
        }
        Change::Promote { id } => {
            if is_voter(*id) {
                return Err(format!("server {id} is already a voter"));
            }
            if !is_learner(*id) {
                return Err(format!("server {id} is not joining the cluster"));
            }
            allowed_size(voters, voters + 1)
        }
        Change::Remove { id } => {
            if is_learner(*id) {
                return Ok(());
            }
            if !is_voter(*id) {
                return Err(format!(
                    "server {id} is not a member of the cluster (voters: {})",
                    list(view.voters)
                ));
            }
            allowed_size(voters, voters - 1)?;
            // The remaining voters must still make a quorum among those running, or
            // the cluster stops the moment the change commits.
            let after = voters - 1;
            let running = view
                .running_voters
                .iter()
                .filter(|v| **v != *id && is_voter(**v))
                .count();
            let needed = after / 2 + 1;
            if running < needed {
                return Err(format!(
                    "removing server {id} would leave {running} running of {after} voters, \
                     and a quorum needs {needed}; start the stopped servers first"
                ));
            }
            Ok(())
        }
    }
}

/// What the leader does with a change the rules allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Propose it now.
    Propose,
    /// The leader itself is to be removed: it hands leadership over first, and the
    /// change is asked of the new leader (a leader never proposes its own removal).
    HandOverFirst,
}

/// What leader `leader` does with `change` once [`check`] allows it: the one place of
/// the self-removal rule.
pub fn plan(change: &Change, leader: u64) -> Plan {
    match change {
        Change::Remove { id } if *id == leader => Plan::HandOverFirst,
        _ => Plan::Propose,
    }
}

/// `after` must be an allowed size, with one exception: 1 → 2, the only way a single
/// server (a small cluster, or the survivor of `lockd recover --force-new-cluster`)
/// grows back to 3 one change at a time. Two voters survive no failure, like the one
/// they come from, so the step loses nothing; shrinking to 2 stays refused.
fn allowed_size(before: usize, after: usize) -> Result<(), String> {
    if ALLOWED_VOTERS.contains(&after) || (before, after) == (1, 2) {
        return Ok(());
    }
    let why = match after {
        0 => "the last server cannot be removed".to_string(),
        2 => "a cluster of 2 servers cannot survive any failure; a cluster has 1, 3, 4 or 5 \
              voters"
            .to_string(),
        _ => "a cluster has at most 5 lock servers".to_string(),
    };
    Err(format!("{before} → {after} voters: {why}"))
}

fn list(ids: &[u64]) -> String {
    let v: Vec<String> = ids.iter().map(u64::to_string).collect();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(voters: &'a [u64], learners: &'a [u64], running: &'a [u64]) -> View<'a> {
        View {
            voters,
            learners,
            running_voters: running,
        }
    }

    fn add(id: u64) -> Change {
        Change::AddLearner {
            id,
            addr: "127.0.0.1:7104".into(),
        }
    }

    #[test]
    fn grows_three_to_five_one_at_a_time() {
        assert_eq!(check(&view(&[1, 2, 3], &[], &[1, 2, 3]), &add(4)), Ok(()));
        assert_eq!(
            check(
                &view(&[1, 2, 3], &[4], &[1, 2, 3]),
                &Change::Promote { id: 4 }
            ),
            Ok(())
        );
        assert_eq!(
            check(&view(&[1, 2, 3, 4], &[], &[1, 2, 3, 4]), &add(5)),
            Ok(())
        );
    }

    #[test]
    fn a_single_server_grows_to_three_through_two() {
        assert_eq!(check(&view(&[1], &[], &[1]), &add(2)), Ok(()));
        let promote = |id| Change::Promote { id };
        assert_eq!(check(&view(&[1], &[2], &[1]), &promote(2)), Ok(()));
        assert_eq!(check(&view(&[1, 2], &[], &[1, 2]), &add(3)), Ok(()));
        assert_eq!(check(&view(&[1, 2], &[3], &[1, 2]), &promote(3)), Ok(()));
    }

    #[test]
    fn sizes_outside_one_three_four_five_are_refused() {
        let six = check(&view(&[1, 2, 3, 4, 5], &[], &[1, 2, 3, 4, 5]), &add(6)).unwrap_err();
        assert!(six.contains("at most 5"), "{six}");
        let down = check(
            &view(&[1, 2, 3], &[], &[1, 2, 3]),
            &Change::Remove { id: 3 },
        )
        .unwrap_err();
        assert!(down.contains("3 → 2"), "{down}");
        let last = check(&view(&[1], &[], &[1]), &Change::Remove { id: 1 }).unwrap_err();
        assert!(last.contains("last server"), "{last}");
    }

    #[test]
    fn one_change_at_a_time() {
        let e = check(&view(&[1, 2, 3], &[4], &[1, 2, 3]), &add(5)).unwrap_err();
        assert!(e.contains("server 4 is still joining"), "{e}");
        // A joining learner can always be taken back out.
        assert_eq!(
            check(
                &view(&[1, 2, 3], &[4], &[1, 2, 3]),
                &Change::Remove { id: 4 }
            ),
            Ok(())
        );
    }

    #[test]
    fn members_and_strangers_are_told_apart() {
        let v = view(&[1, 2, 3], &[], &[1, 2, 3]);
        assert!(check(&v, &add(2)).unwrap_err().contains("already a voter"));
        assert!(check(&v, &Change::Remove { id: 9 })
            .unwrap_err()
            .contains("not a member"));
        assert!(check(&v, &Change::Promote { id: 9 })
            .unwrap_err()
            .contains("not joining"));
        assert!(check(&v, &add(0)).unwrap_err().contains("reserved"));
        let bad = Change::AddLearner {
            id: 4,
            addr: "not-an-address".into(),
        };
        assert!(check(&v, &bad).unwrap_err().contains("bad address"));
    }

    #[test]
    fn a_removal_that_would_lose_the_quorum_is_refused() {
        // 5 voters, 2 of them down: removing a running one leaves 2 of 4 running.
        let v = view(&[1, 2, 3, 4, 5], &[], &[1, 2, 3]);
        let e = check(&v, &Change::Remove { id: 3 }).unwrap_err();
        assert!(e.contains("leave 2 running of 4 voters"), "{e}");
        // Removing one of the stopped ones is fine: 3 of 4 run.
        assert_eq!(check(&v, &Change::Remove { id: 5 }), Ok(()));
    }

    #[test]
    fn a_leader_hands_over_before_its_own_removal() {
        assert_eq!(plan(&Change::Remove { id: 1 }, 1), Plan::HandOverFirst);
        assert_eq!(plan(&Change::Remove { id: 2 }, 1), Plan::Propose);
        assert_eq!(plan(&Change::Promote { id: 1 }, 1), Plan::Propose);
    }
}
