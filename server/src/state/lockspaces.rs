//! Lockspaces in the lock table: opening one (creating it, or checking a second
//! opener asks for the same LVB length and recovery mode), and closing those nobody
//! has open and nothing is left in (issue 12: lockspaces have a lifecycle).

use super::command::{Event, LockError, RecoveryMode, Reply, RequestId, SessionId};
use super::digest::Digest;
use super::limits::*;
use super::model::{Lockspace, LsId};
use super::requests::Admission;
use super::table::{check_name, limit, lvb_len_for, State};
use std::collections::BTreeSet;

impl State {
    pub(super) fn open_lockspace(
        &mut self,
        session: SessionId,
        (request_id, digest): (RequestId, Digest),
        name: String,
        lvb_len_bytes: u32,
        recovery: RecoveryMode,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if let Admission::Retry(reply) = self.admit(session, request_id, digest, 0)? {
            return Ok(reply);
        }
        check_name("lockspace name", name.as_bytes())?;
        let lvb_len_bytes = lvb_len_for(lvb_len_bytes)?;
        let existing = self.idx.lockspace_ids.get(&name).copied();
        match existing {
            Some(ls) => {
                let have = &self.core.lockspaces[ls as usize];
                if have.lvb_len_bytes != lvb_len_bytes || have.recovery != recovery {
                    return Err(LockError::LockspaceMismatch {
                        name,
                        lvb_len_bytes: have.lvb_len_bytes,
                        recovery: have.recovery,
                    });
                }
            }
            None if self.idx.lockspace_ids.len() >= MAX_LOCKSPACES => {
                return Err(limit(format!("{MAX_LOCKSPACES} lockspaces are open")));
            }
            None => {}
        }
        self.accept(session, 0);
        let ls = match existing {
            Some(ls) => ls,
            None => {
                let lockspace = Lockspace {
                    name: name.clone(),
                    lvb_len_bytes,
                    recovery,
                };
                // The lowest closed slot, else a new one (below MAX_LOCKSPACES: the
                // open ones are fewer, and every slot is open or closed).
                let free = self.core.lockspaces.iter().position(|l| l.name.is_empty());
                let slot = match free {
                    Some(slot) => {
                        self.core.lockspaces[slot] = lockspace;
                        slot
                    }
                    None => {
                        self.core.lockspaces.push(lockspace);
                        self.idx.resource_ids.push(BTreeSet::new());
                        self.core.lockspaces.len() - 1
                    }
                };
                let ls = slot as LsId;
                self.idx.lockspace_ids.insert(name, ls);
                ls
            }
        };
        self.session_mut(session).opened.insert(ls);
        self.owed_recoveries(session, ls, events);
        let reply = Reply::LockspaceOpened {
            lvb_len_bytes,
            recovery,
        };
        self.record_done(session, request_id, digest, reply.clone());
        Ok(reply)
    }

    /// Closes the lockspaces an opener left during this entry if nobody has them open
    /// and nothing is left in them (no lock, so no expired holder awaiting recovery):
    /// their names and slots are free again (issue 12: lockspaces have a lifecycle).
    pub(super) fn close_unused_lockspaces(&mut self) {
        for ls in std::mem::take(&mut self.idx.maybe_unused) {
            let open = self.core.sessions.values().any(|s| s.opened.contains(&ls));
            let used = self
                .idx
                .resource_ids
                .get(ls as usize)
                .is_none_or(|r| !r.is_empty());
            if open || used {
                continue;
            }
            if let Some(lockspace) = self.core.lockspaces.get_mut(ls as usize) {
                let name = std::mem::take(&mut lockspace.name);
                self.idx.lockspace_ids.remove(&name);
            }
        }
    }
}
