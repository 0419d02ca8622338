//! The history checker: a pure function from a history to a report of what was checked
//! and every safety violation found, each with the few records that show it.
//!
//! A holder's interval on a resource runs from its grant reply (the `ok` record) to the
//! first of: its release invocation (unlock, or the start of a conversion), its
//! library's "lost" notice, its own exit, or the kill of its process (by the fence
//! agent or by the harness). The rules (BRIEF §4.2):
//!
//! 1. **Exclusion**: no two intervals of different clients on one resource overlap if
//!    their modes are incompatible. While a conversion is in flight the holder has the
//!    old or the new mode; only a conflict with both counts.
//! 2. **Tokens**: grants of a resource carry distinct tokens, and a grant invoked after
//!    another grant was acknowledged carries a larger token.
//! 3. **Durability**: at the end, every lock a still-running client believes it holds is
//!    in the leader's lock table with its token.
//! 4. **Fence first**: once a client stopped (lost, exit, killed), the locks it held are
//!    not granted in a conflicting mode to anyone else before the fence agent recorded
//!    its process dead.
//! 5. **Zombies change nothing**: from the moment the harness saw a client's node
//!    expired or being fenced (an `expired` record, taken while the client was stopped
//!    or cut off) until its fence record, the locks it held then are not granted in a
//!    conflicting mode to anyone else — whatever the client itself sends meanwhile —
//!    and no request it invokes after that moment succeeds.

use super::history::{FinalHold, Kind, Op, Record};
use lockd_client::Mode;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A rule broken, with the records that show it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub rule: &'static str,
    pub message: String,
    pub slice: Vec<Record>,
}

/// What a check found and how much it looked at.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub records: usize,
    /// Invocations per operation ("lock", "convert", "unlock").
    pub invoked: BTreeMap<String, u64>,
    pub ok: u64,
    pub failed: u64,
    pub ambiguous: u64,
    pub lost: u64,
    pub exits: u64,
    pub fences: u64,
    pub kills: u64,
    pub client_starts: u64,
    /// Injected faults per kind.
    pub faults: BTreeMap<String, u64>,
    /// Pairs of intervals compared (rule 1), grants ordered (rule 2), final holds
    /// compared (rule 3), grants examined against a stopped holder (rule 4).
    pub checks: [u64; 5],
    /// Zombie faults whose expiry the harness saw, and lost notices zombies ignored.
    pub zombies: u64,
    pub zombie_notices: u64,
    /// Clients that neither stopped cleanly nor ended before the final table was read.
    pub unchecked_clients: u64,
    pub final_table_read: bool,
    pub violations: Vec<Violation>,
}

#[derive(Debug)]
struct Interval {
    client: usize,
    res: String,
    modes: Vec<Mode>,
    token: u64,
    start: u64,
    end: u64,
    start_rec: usize,
    end_rec: Option<usize>,
}

#[derive(Debug)]
struct Grant {
    client: usize,
    mode: Mode,
    token: u64,
    invoke_t: u64,
    ok_t: u64,
    invoke_rec: Option<usize>,
    ok_rec: usize,
}

#[derive(Default)]
struct Client {
    name: String,
    start_rec: Option<usize>,
    pid: u32,
    session: u64,
    /// Resource -> its open interval.
    held: BTreeMap<String, usize>,
    invoke: Option<usize>,
    ended: Option<(u64, usize)>,
    held_at_end: Vec<usize>,
    stopped: bool,
}

fn parse_mode(s: &str) -> Option<Mode> {
    s.parse().ok()
}

/// Whether a holder with one of `a` and a holder with one of `b` conflict for sure.
fn surely_conflict(a: &[Mode], b: &[Mode]) -> bool {
    a.iter().all(|x| b.iter().all(|y| !x.is_compatible(*y)))
}

struct Checker<'h> {
    h: &'h [Record],
    clients: Vec<Client>,
    by_name: HashMap<String, usize>,
    by_pid: HashMap<u32, usize>,
    intervals: Vec<Interval>,
    grants: BTreeMap<String, Vec<Grant>>,
    /// (client, time, record) of every `expired` record.
    expired: Vec<(usize, u64, usize)>,
    report: Report,
}

impl<'h> Checker<'h> {
    fn client(&mut self, name: &str) -> usize {
        if let Some(i) = self.by_name.get(name) {
            return *i;
        }
        self.clients.push(Client {
            name: name.to_string(),
            ..Client::default()
        });
        self.by_name
            .insert(name.to_string(), self.clients.len() - 1);
        self.clients.len() - 1
    }

    fn open(&mut self, c: usize, res: &str, modes: Vec<Mode>, token: u64, t: u64, rec: usize) {
        self.intervals.push(Interval {
            client: c,
            res: res.to_string(),
            modes,
            token,
            start: t,
            end: u64::MAX,
            start_rec: rec,
            end_rec: None,
        });
        let i = self.intervals.len() - 1;
        self.clients[c].held.insert(res.to_string(), i);
    }

    fn close(&mut self, c: usize, res: &str, t: u64, rec: usize) -> Option<usize> {
        let i = self.clients[c].held.remove(res)?;
        self.intervals[i].end = t;
        self.intervals[i].end_rec = Some(rec);
        Some(i)
    }

    fn end_client(&mut self, c: usize, t: u64, rec: usize) {
        if self.clients[c].ended.is_some() {
            return;
        }
        self.clients[c].ended = Some((t, rec));
        let held: Vec<String> = self.clients[c].held.keys().cloned().collect();
        for res in held {
            if let Some(i) = self.close(c, &res, t, rec) {
                self.clients[c].held_at_end.push(i);
            }
        }
    }

    /// The faults injected between `from` and `to` (µs): the likely cause.
    fn faults_between(&self, from: u64, to: u64) -> Vec<usize> {
        let lo = self.h.partition_point(|r| r.t < from);
        (lo..self.h.len())
            .take_while(|i| self.h[*i].t <= to)
            .filter(|i| self.h[*i].k == Kind::Fault)
            .collect()
    }

    fn slice(&self, mut recs: Vec<usize>) -> Vec<Record> {
        recs.sort_unstable();
        recs.dedup();
        recs.into_iter().map(|i| self.h[i].clone()).collect()
    }

    fn violation(&mut self, rule: &'static str, message: String, recs: Vec<usize>) {
        let slice = self.slice(recs);
        self.report.violations.push(Violation {
            rule,
            message,
            slice,
        });
    }

    /// Replays the history into intervals and grants; returns the final table.
    fn replay(&mut self) -> Option<Vec<FinalHold>> {
        let h = self.h;
        for (i, r) in h.iter().enumerate() {
            if r.k == Kind::Start {
                let c = self.client(&r.c);
                self.clients[c].pid = r.pid;
                self.clients[c].start_rec = Some(i);
                self.by_pid.insert(r.pid, c);
            }
        }
        for (i, r) in h.iter().enumerate() {
            match r.k {
                Kind::Start => self.report.client_starts += 1,
                Kind::Fault => *self.report.faults.entry(r.what.clone()).or_default() += 1,
                Kind::Fence => {
                    self.report.fences += 1;
                    if let Some(c) = self.by_pid.get(&r.pid).copied() {
                        self.end_client(c, r.t, i);
                    }
                }
                Kind::Kill => {
                    self.report.kills += 1;
                    if let Some(c) = self.by_pid.get(&r.pid).copied() {
                        self.end_client(c, r.t, i);
                    }
                }
                Kind::Final => return Some(r.held.clone()),
                Kind::Expired => {
                    self.report.zombies += 1;
                    let c = self.client(&r.c);
                    self.expired.push((c, r.t, i));
                }
                _ => self.client_record(i, r),
            }
        }
        None
    }

    fn client_record(&mut self, i: usize, r: &Record) {
        let c = self.client(&r.c);
        match r.k {
            Kind::Lost => self.report.lost += 1,
            Kind::Zombie => self.report.zombie_notices += 1,
            Kind::Exit => self.report.exits += 1,
            Kind::Invoke => {
                *self
                    .report
                    .invoked
                    .entry(format!("{:?}", r.op.unwrap_or(Op::Lock)).to_lowercase())
                    .or_default() += 1
            }
            Kind::Ok => self.report.ok += 1,
            Kind::Fail => {
                self.report.failed += 1;
                self.report.ambiguous += u64::from(r.ambiguous);
            }
            _ => {}
        }
        if self.clients[c].ended.is_some() {
            return; // a dead or lost client's late words change nothing
        }
        let (t, res) = (r.t, r.res.as_str());
        match (r.k, r.op) {
            (Kind::Login, _) => self.clients[c].session = r.session,
            (Kind::Stopped, _) => self.clients[c].stopped = true,
            (Kind::Lost | Kind::Exit, _) => self.end_client(c, t, i),
            (Kind::Invoke, Some(op)) => {
                self.clients[c].invoke = Some(i);
                match op {
                    Op::Lock => {}
                    Op::Unlock => {
                        self.close(c, res, t, i);
                    }
                    Op::Convert => {
                        if let Some(old) = self.close(c, res, t, i) {
                            let mut modes = self.intervals[old].modes.clone();
                            modes.extend(parse_mode(&r.mode));
                            let token = self.intervals[old].token;
                            self.open(c, res, modes, token, t, i);
                        }
                    }
                }
            }
            (Kind::Ok, Some(op @ (Op::Lock | Op::Convert))) => {
                let Some(mode) = parse_mode(&r.mode) else {
                    return;
                };
                if op == Op::Convert {
                    self.close(c, res, t, i);
                }
                self.open(c, res, vec![mode], r.token, t, i);
                let invoke_rec = self.clients[c].invoke.take();
                let invoke_t = invoke_rec.map_or(t, |j| self.h[j].t);
                self.grants.entry(res.to_string()).or_default().push(Grant {
                    client: c,
                    mode,
                    token: r.token,
                    invoke_t,
                    ok_t: t,
                    invoke_rec,
                    ok_rec: i,
                });
            }
            (Kind::Fail, Some(Op::Convert)) if !r.ambiguous => {
                // Refused: the lock keeps its old mode and token.
                if let Some(old) = self.close(c, res, t, i) {
                    let token = self.intervals[old].token;
                    let modes = parse_mode(&r.from)
                        .map_or_else(|| self.intervals[old].modes.clone(), |m| vec![m]);
                    self.open(c, res, modes, token, t, i);
                }
            }
            _ => {}
        }
    }

    fn start_recs(&self, c: usize) -> Vec<usize> {
        self.clients[c].start_rec.into_iter().collect()
    }

    /// Rule 1.
    fn check_exclusion(&mut self) {
        let mut by_res: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, iv) in self.intervals.iter().enumerate() {
            if iv.end > iv.start {
                by_res.entry(iv.res.as_str()).or_default().push(i);
            }
        }
        let mut found = Vec::new();
        let mut checks = 0;
        for ivs in by_res.values_mut() {
            ivs.sort_by_key(|i| self.intervals[*i].start);
            let mut active: Vec<usize> = Vec::new();
            for &b in ivs.iter() {
                let bs = self.intervals[b].start;
                active.retain(|a| self.intervals[*a].end > bs);
                for &a in &active {
                    let (ia, ib) = (&self.intervals[a], &self.intervals[b]);
                    if ia.client == ib.client {
                        continue;
                    }
                    checks += 1;
                    // One report per holder interval and other client: the other's
                    // following intervals (a conversion) tell the same story.
                    if surely_conflict(&ia.modes, &ib.modes)
                        && !found.iter().any(|&(fa, fb): &(usize, usize)| {
                            fa == a && self.intervals[fb].client == ib.client
                        })
                    {
                        found.push((a, b));
                    }
                }
                active.push(b);
            }
        }
        self.report.checks[0] = checks;
        for (a, b) in found {
            let (ia, ib) = (&self.intervals[a], &self.intervals[b]);
            let msg = format!(
                "{} held {:?} (token {}) on {} from {} to {}, while {} was granted {:?} (token {}) at {}",
                self.clients[ia.client].name,
                ia.modes,
                ia.token,
                ia.res,
                ia.start,
                end_str(ia.end),
                self.clients[ib.client].name,
                ib.modes,
                ib.token,
                ib.start
            );
            let mut recs = vec![ia.start_rec, ib.start_rec];
            recs.extend(ia.end_rec);
            recs.extend(ib.end_rec);
            recs.extend(self.start_recs(ia.client));
            recs.extend(self.start_recs(ib.client));
            recs.extend(self.faults_between(ia.start, ib.start));
            self.violation("1 exclusion", msg, recs);
        }
    }

    /// Rule 2.
    fn check_tokens(&mut self) {
        let mut found = Vec::new();
        let mut checks = 0;
        for (res, grants) in &self.grants {
            let mut seen: HashMap<u64, usize> = HashMap::new();
            for (i, g) in grants.iter().enumerate() {
                if let Some(j) = seen.insert(g.token, i) {
                    found.push((
                        format!("two grants of {res} carry token {}", g.token),
                        vec![grants[j].ok_rec, g.ok_rec],
                    ));
                }
            }
            // Sweep: grants acknowledged before each invocation, largest token so far.
            let mut by_ok: Vec<usize> = (0..grants.len()).collect();
            by_ok.sort_by_key(|i| grants[*i].ok_t);
            let mut by_invoke: Vec<usize> = (0..grants.len()).collect();
            by_invoke.sort_by_key(|i| grants[*i].invoke_t);
            let mut best: Option<usize> = None;
            let mut k = 0;
            for &b in &by_invoke {
                while k < by_ok.len() && grants[by_ok[k]].ok_t < grants[b].invoke_t {
                    let a = by_ok[k];
                    if best.is_none_or(|x| grants[a].token > grants[x].token) {
                        best = Some(a);
                    }
                    k += 1;
                }
                if let Some(a) = best {
                    checks += 1;
                    if grants[a].token >= grants[b].token {
                        let mut recs = vec![grants[a].ok_rec, grants[b].ok_rec];
                        recs.extend(grants[b].invoke_rec);
                        found.push((
                            format!(
                                "{res}: {} was granted token {} after {} had been granted token {}",
                                self.clients[grants[b].client].name,
                                grants[b].token,
                                self.clients[grants[a].client].name,
                                grants[a].token
                            ),
                            recs,
                        ));
                    }
                }
            }
        }
        self.report.checks[1] = checks;
        for (msg, recs) in found {
            self.violation("2 tokens", msg, recs);
        }
    }

    /// Rule 3.
    fn check_final(&mut self, table: &[FinalHold], final_rec: usize) {
        let mut found = Vec::new();
        let mut checks = 0;
        for (c, client) in self.clients.iter().enumerate() {
            if client.ended.is_some() {
                continue;
            }
            if !client.stopped {
                self.report.unchecked_clients += u64::from(client.start_rec.is_some());
                continue;
            }
            for (res, &iv) in &client.held {
                checks += 1;
                let iv = &self.intervals[iv];
                let present = table.iter().any(|f| {
                    f.session == client.session
                        && f.res == *res
                        && parse_mode(&f.mode).is_some_and(|m| iv.modes.contains(&m))
                        && (f.token == iv.token || (iv.modes.len() > 1 && f.token > iv.token))
                });
                if !present {
                    let mut recs = vec![iv.start_rec, final_rec];
                    recs.extend(self.start_recs(c));
                    found.push((
                        format!(
                            "{} (session {}) was granted {:?} on {res} with token {} and never released it, but the final table lacks it",
                            client.name, client.session, iv.modes, iv.token
                        ),
                        recs,
                    ));
                }
            }
        }
        self.report.checks[2] = checks;
        for (msg, recs) in found {
            self.violation("3 durability", msg, recs);
        }
    }

    /// Rule 4.
    fn check_fence_first(&mut self) {
        let mut fence_of: HashMap<u32, usize> = HashMap::new();
        for (i, r) in self.h.iter().enumerate() {
            if r.k == Kind::Fence {
                fence_of.entry(r.pid).or_insert(i);
            }
            if r.k == Kind::Final {
                break;
            }
        }
        let mut found = Vec::new();
        let mut checks = 0;
        for (c, client) in self.clients.iter().enumerate() {
            let Some((ended_t, ended_rec)) = client.ended else {
                continue;
            };
            let fence = fence_of.get(&client.pid).copied();
            let fenced_t = fence.map_or(u64::MAX, |f| self.h[f].t);
            for &iv in &client.held_at_end {
                let iv = &self.intervals[iv];
                let Some(grants) = self.grants.get(&iv.res) else {
                    continue;
                };
                for g in grants {
                    if g.client == c || g.ok_t <= ended_t {
                        continue;
                    }
                    checks += 1;
                    if g.ok_t < fenced_t && surely_conflict(&iv.modes, &[g.mode]) {
                        let mut recs = vec![iv.start_rec, ended_rec, g.ok_rec];
                        recs.extend(fence);
                        recs.extend(self.start_recs(c));
                        recs.extend(self.faults_between(iv.start, g.ok_t));
                        found.push((
                            format!(
                                "{} stopped at {ended_t} holding {:?} on {} (token {}); {} was granted {:?} (token {}) at {} but {} was fenced {}",
                                client.name,
                                iv.modes,
                                iv.res,
                                iv.token,
                                self.clients[g.client].name,
                                g.mode,
                                g.token,
                                g.ok_t,
                                client.name,
                                if fenced_t == u64::MAX { "never".to_string() } else { format!("at {fenced_t}") }
                            ),
                            recs,
                        ));
                    }
                }
            }
        }
        self.report.checks[3] = checks;
        for (msg, recs) in found {
            self.violation("4 fence first", msg, recs);
        }
    }
}

impl Checker<'_> {
    /// Rule 5.
    fn check_zombies(&mut self) {
        let mut found = Vec::new();
        let mut checks = 0;
        for &(c, expired_t, expired_rec) in &self.expired {
            let pid = self.clients[c].pid;
            let fence = self
                .h
                .iter()
                .position(|r| r.k == Kind::Fence && r.pid == pid && r.t >= expired_t);
            let fenced_t = fence.map_or(u64::MAX, |f| self.h[f].t);
            let name = &self.clients[c].name;
            // (a) What it held then stays its own until the fence.
            for iv in &self.intervals {
                if iv.client != c || iv.start >= expired_t || iv.end <= expired_t {
                    continue;
                }
                for g in self.grants.get(&iv.res).into_iter().flatten() {
                    if g.client == c || g.ok_t <= expired_t || g.ok_t >= fenced_t {
                        continue;
                    }
                    checks += 1;
                    if surely_conflict(&iv.modes, &[g.mode]) {
                        let mut recs = vec![iv.start_rec, expired_rec, g.ok_rec];
                        recs.extend(iv.end_rec);
                        recs.extend(fence);
                        found.push((
                            format!(
                                "{name} held {:?} on {} (token {}) when its node was seen expired at {expired_t}; {} was granted {:?} (token {}) at {} before the fence ({})",
                                iv.modes,
                                iv.res,
                                iv.token,
                                self.clients[g.client].name,
                                g.mode,
                                g.token,
                                g.ok_t,
                                end_str(fenced_t)
                            ),
                            recs,
                        ));
                    }
                }
            }
            // (b) Nothing it sends after that succeeds.
            let mut invoked: Option<usize> = None;
            for (i, r) in self.h.iter().enumerate() {
                if r.c != *name {
                    continue;
                }
                match r.k {
                    Kind::Invoke => invoked = Some(i),
                    Kind::Ok => {
                        let Some(inv) = invoked.take() else { continue };
                        if self.h[inv].t <= expired_t {
                            continue;
                        }
                        checks += 1;
                        found.push((
                            format!(
                                "{name}'s node was seen expired at {expired_t}, yet its {} of {} invoked at {} succeeded at {}",
                                r.op.map_or("request".into(), |o| format!("{o:?}").to_lowercase()),
                                r.res,
                                self.h[inv].t,
                                r.t
                            ),
                            vec![expired_rec, inv, i],
                        ));
                    }
                    Kind::Fail => {
                        checks +=
                            u64::from(invoked.take().is_some_and(|inv| self.h[inv].t > expired_t))
                    }
                    _ => {}
                }
            }
        }
        self.report.checks[4] = checks;
        for (msg, recs) in found {
            self.violation("5 zombies", msg, recs);
        }
    }
}

/// Violations printed per rule (all are counted).
const SHOWN_PER_RULE: usize = 3;

fn end_str(t: u64) -> String {
    if t == u64::MAX {
        "the end".into()
    } else {
        t.to_string()
    }
}

/// Checks a history (records sorted by time). Records after the first `final` record
/// are ignored.
pub fn check(history: &[Record]) -> Report {
    let mut ch = Checker {
        h: history,
        clients: Vec::new(),
        by_name: HashMap::new(),
        by_pid: HashMap::new(),
        intervals: Vec::new(),
        grants: BTreeMap::new(),
        expired: Vec::new(),
        report: Report {
            records: history.len(),
            ..Report::default()
        },
    };
    let table = ch.replay();
    ch.check_exclusion();
    ch.check_tokens();
    if let Some(table) = table {
        let final_rec = history
            .iter()
            .position(|r| r.k == Kind::Final)
            .unwrap_or_default();
        ch.report.final_table_read = true;
        ch.check_final(&table, final_rec);
    }
    ch.check_fence_first();
    ch.check_zombies();
    ch.report
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: u64 = self.invoked.values().sum();
        writeln!(f, "history: {} records", self.records)?;
        writeln!(
            f,
            "operations: {ops} invoked {:?}; {} ok, {} failed ({} ambiguous)",
            self.invoked, self.ok, self.failed, self.ambiguous
        )?;
        writeln!(
            f,
            "clients: {} processes started, {} lost notices, {} voluntary exits, {} fenced (agent), {} killed (harness)",
            self.client_starts, self.lost, self.exits, self.fences, self.kills
        )?;
        writeln!(f, "faults: {:?}", self.faults)?;
        writeln!(
            f,
            "checks: rule 1 exclusion {} interval pairs; rule 2 tokens {} ordered grants; rule 3 durability {} final holds{}; rule 4 fence-first {} later grants; rule 5 zombies {} grants and requests ({} zombies seen expired, {} lost notices ignored)",
            self.checks[0],
            self.checks[1],
            self.checks[2],
            if self.final_table_read { "" } else { " (NO final table read)" },
            self.checks[3],
            self.checks[4],
            self.zombies,
            self.zombie_notices
        )?;
        if self.unchecked_clients > 0 {
            writeln!(
                f,
                "note: {} clients neither stopped nor ended by the end; rule 3 skipped them",
                self.unchecked_clients
            )?;
        }
        let mut by_rule: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &self.violations {
            *by_rule.entry(v.rule).or_default() += 1;
        }
        writeln!(f, "violations: {} {by_rule:?}", self.violations.len())?;
        // The first few of each rule; the rest repeat the story.
        let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &self.violations {
            let n = shown.entry(v.rule).or_default();
            *n += 1;
            if *n > SHOWN_PER_RULE {
                continue;
            }
            writeln!(f, "VIOLATION of rule {}: {}", v.rule, v.message)?;
            for r in &v.slice {
                writeln!(f, "    {}", serde_json::to_string(r).unwrap_or_default())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(t: u64, c: &str, pid: u32) -> Record {
        Record::new(t, Kind::Start).client(c).pid(pid)
    }
    fn login(t: u64, c: &str, session: u64) -> Record {
        let mut r = Record::new(t, Kind::Login).client(c);
        r.session = session;
        r
    }
    fn invoke(t: u64, c: &str, op: Op, res: &str, mode: &str) -> Record {
        Record::new(t, Kind::Invoke).client(c).op(op, res, mode)
    }
    fn ok(t: u64, c: &str, op: Op, res: &str, mode: &str, token: u64) -> Record {
        Record::new(t, Kind::Ok)
            .client(c)
            .op(op, res, mode)
            .token(token)
    }
    fn lock(t: u64, c: &str, res: &str, mode: &str, token: u64) -> [Record; 2] {
        [
            invoke(t - 1, c, Op::Lock, res, mode),
            ok(t, c, Op::Lock, res, mode, token),
        ]
    }
    fn two_clients() -> Vec<Record> {
        vec![
            start(1, "a", 100),
            start(1, "b", 200),
            login(2, "a", 1),
            login(2, "b", 2),
        ]
    }
    fn rules(h: &mut [Record]) -> Vec<&'static str> {
        h.sort_by_key(|r| r.t);
        let report = check(h);
        report.violations.iter().map(|v| v.rule).collect()
    }

    fn expired(t: u64, c: &str) -> Record {
        Record::new(t, Kind::Expired).client(c).node(c)
    }
    fn fence(t: u64, pid: u32) -> Record {
        Record::new(t, Kind::Fence).pid(pid)
    }

    #[test]
    fn a_zombie_whose_requests_are_refused_is_clean() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(expired(20, "a"));
        h.push(invoke(25, "a", Op::Unlock, "r1", ""));
        let mut refused = Record::new(26, Kind::Fail)
            .client("a")
            .op(Op::Unlock, "r1", "");
        refused.ambiguous = true;
        h.push(refused);
        h.push(invoke(27, "b", Op::Lock, "r1", "EX"));
        h.push(fence(40, 100));
        h.push(ok(41, "b", Op::Lock, "r1", "EX", 7));
        assert_eq!(rules(&mut h), Vec::<&str>::new());
        let report = check(&h);
        assert_eq!(report.checks[4], 1, "the refused unlock: {report}");
    }

    #[test]
    fn a_zombie_unlock_that_lets_another_in_before_the_fence_is_caught() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(expired(20, "a"));
        h.push(invoke(25, "a", Op::Unlock, "r1", ""));
        h.push(ok(26, "a", Op::Unlock, "r1", "", 0));
        h.extend(lock(30, "b", "r1", "EX", 7));
        h.push(fence(40, 100));
        // Rules 1 and 4 see nothing wrong: a released before b's grant, and never stopped.
        assert_eq!(rules(&mut h), vec!["5 zombies", "5 zombies"]);
    }

    #[test]
    fn a_zombie_lock_granted_before_the_fence_is_caught() {
        let mut h = two_clients();
        h.push(expired(20, "a"));
        h.extend(lock(30, "a", "r2", "EX", 7));
        h.push(fence(40, 100));
        assert_eq!(rules(&mut h), vec!["5 zombies"]);
    }

    #[test]
    fn release_before_conflicting_grant_is_clean() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(invoke(20, "a", Op::Unlock, "r1", ""));
        h.extend(lock(30, "b", "r1", "EX", 7));
        assert_eq!(rules(&mut h), Vec::<&str>::new());
        let report = check(&h);
        assert!(report.checks[0] == 0 && report.checks[1] == 1, "{report}");
    }

    #[test]
    fn overlapping_ex_grants_break_exclusion() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(Record::new(12, Kind::Fault).what("stop-client").client("a"));
        h.extend(lock(15, "b", "r1", "EX", 7));
        h.push(invoke(20, "a", Op::Unlock, "r1", ""));
        assert_eq!(rules(&mut h), vec!["1 exclusion"]);
        let report = check(&h);
        let v = &report.violations[0];
        let kinds: Vec<Kind> = v.slice.iter().map(|r| r.k).collect();
        assert_eq!(
            kinds,
            [
                Kind::Start,
                Kind::Start,
                Kind::Ok,
                Kind::Fault,
                Kind::Ok,
                Kind::Invoke
            ],
            "both starts, both grants, the fault between them, a's release"
        );
    }

    #[test]
    fn compatible_modes_may_overlap() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "PR", 5));
        h.extend(lock(15, "b", "r1", "CR", 7));
        assert_eq!(rules(&mut h), Vec::<&str>::new());
        assert_eq!(check(&h).checks[0], 1);
    }

    #[test]
    fn a_down_conversion_frees_the_weaker_conflicts_from_its_invocation() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(invoke(20, "a", Op::Convert, "r1", "PR").from_mode("EX"));
        h.extend(lock(23, "b", "r1", "PR", 7));
        h.push(ok(25, "a", Op::Convert, "r1", "PR", 8));
        assert_eq!(rules(&mut h), Vec::<&str>::new());

        let mut bad = two_clients();
        bad.extend(lock(10, "a", "r1", "EX", 5));
        bad.push(invoke(20, "a", Op::Convert, "r1", "PR").from_mode("EX"));
        bad.extend(lock(23, "b", "r1", "PW", 7));
        bad.push(ok(25, "a", Op::Convert, "r1", "PR", 8));
        // PW conflicts with both EX and PR: during the conversion and after it.
        assert_eq!(rules(&mut bad), vec!["1 exclusion", "1 exclusion"]);
    }

    #[test]
    fn a_refused_conversion_keeps_the_old_mode() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "PR", 5));
        h.push(invoke(20, "a", Op::Convert, "r1", "EX").from_mode("PR"));
        let mut fail = Record::new(25, Kind::Fail)
            .client("a")
            .op(Op::Convert, "r1", "EX")
            .from_mode("PR");
        fail.err = "timed out".into();
        h.push(fail);
        h.extend(lock(30, "b", "r1", "PW", 7));
        assert_eq!(rules(&mut h), vec!["1 exclusion"]);
    }

    #[test]
    fn a_smaller_token_after_an_acknowledged_grant_is_a_violation() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "PR", 9));
        h.extend(lock(30, "b", "r1", "PR", 7));
        assert_eq!(rules(&mut h), vec!["2 tokens"]);
        // Concurrent invocations may be granted in either order.
        let mut h = two_clients();
        h.push(invoke(5, "b", Op::Lock, "r1", "PR"));
        h.extend(lock(10, "a", "r1", "PR", 9));
        h.push(ok(30, "b", Op::Lock, "r1", "PR", 7));
        assert_eq!(rules(&mut h), Vec::<&str>::new());
    }

    #[test]
    fn a_repeated_token_is_a_violation() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "PR", 9));
        h.push(invoke(8, "b", Op::Lock, "r1", "PR"));
        h.push(ok(12, "b", Op::Lock, "r1", "PR", 9));
        assert_eq!(rules(&mut h), vec!["2 tokens"]);
    }

    fn final_table(t: u64, held: Vec<FinalHold>) -> Record {
        let mut r = Record::new(t, Kind::Final);
        r.held = held;
        r
    }

    #[test]
    fn a_held_lock_missing_from_the_final_table_is_lost() {
        let hold = FinalHold {
            session: 1,
            node: "node1".into(),
            res: "r1".into(),
            mode: "EX".into(),
            token: 5,
        };
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(Record::new(50, Kind::Stopped).client("a"));
        h.push(final_table(60, vec![hold.clone()]));
        assert_eq!(rules(&mut h), Vec::<&str>::new());
        assert_eq!(check(&h).checks[2], 1);

        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(Record::new(50, Kind::Stopped).client("a"));
        h.push(final_table(60, vec![FinalHold { token: 4, ..hold }]));
        assert_eq!(rules(&mut h), vec!["3 durability"]);
    }

    #[test]
    fn a_lost_holders_lock_granted_before_its_fence_is_a_violation() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(Record::new(20, Kind::Lost).client("a").what("Lost"));
        h.push(Record::new(50, Kind::Fence).node("node1").pid(100));
        h.extend(lock(40, "b", "r1", "EX", 7));
        assert_eq!(rules(&mut h), vec!["4 fence first"]);

        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(Record::new(20, Kind::Lost).client("a").what("Lost"));
        h.push(Record::new(50, Kind::Fence).node("node1").pid(100));
        h.extend(lock(60, "b", "r1", "EX", 7));
        assert_eq!(rules(&mut h), Vec::<&str>::new());
        assert_eq!(check(&h).checks[3], 1);
    }

    #[test]
    fn a_killed_holder_still_needs_its_fence() {
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.push(Record::new(20, Kind::Kill).pid(100));
        h.extend(lock(30, "b", "r1", "EX", 7));
        assert_eq!(rules(&mut h), vec!["4 fence first"]);
    }

    #[test]
    fn a_stopped_process_holds_until_its_fence() {
        // SIGSTOPped: no lost notice; the fence agent's kill ends the interval.
        let mut h = two_clients();
        h.extend(lock(10, "a", "r1", "EX", 5));
        h.extend(lock(40, "b", "r1", "EX", 7));
        h.push(Record::new(50, Kind::Fence).node("node1").pid(100));
        assert_eq!(rules(&mut h), vec!["1 exclusion"]);
    }
}
