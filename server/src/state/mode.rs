//! The six DLM lock modes and the rules that depend on the mode alone: which modes
//! may be held together, which mode `any` may substitute, and which transitions write
//! the lock value block. Knows nothing about queues, sessions or resources.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A lock mode, weakest first (the derive orders them NL < CR < CW < PR < PW < EX,
/// which is DLM's numeric order, not a lattice: CW and PR are incomparable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Null: holds a place (and the LVB's existence) without excluding anyone.
    Nl,
    /// Concurrent read.
    Cr,
    /// Concurrent write (GFS "deferred").
    Cw,
    /// Protected read (GFS "shared").
    Pr,
    /// Protected write.
    Pw,
    /// Exclusive (GFS "exclusive").
    Ex,
}

/// DLM's compatibility matrix, indexed by `Mode as usize` on both axes.
const COMPATIBLE: [[bool; 6]; 6] = [
    //        NL     CR     CW     PR     PW     EX
    /* NL */
    [true, true, true, true, true, true],
    /* CR */ [true, true, true, true, true, false],
    /* CW */ [true, true, true, false, false, false],
    /* PR */ [true, true, false, true, false, false],
    /* PW */ [true, true, false, false, false, false],
    /* EX */ [true, false, false, false, false, false],
];

impl Mode {
    pub const ALL: [Mode; 6] = [Mode::Nl, Mode::Cr, Mode::Cw, Mode::Pr, Mode::Pw, Mode::Ex];

    /// Whether a lock in `self` may be granted while another lock holds `other`.
    pub fn compatible(self, other: Mode) -> bool {
        COMPATIBLE[self as usize][other as usize]
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }

    /// This mode's bit in a 6-bit mode set (blocking-callback bookkeeping).
    pub(super) fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The mode the `any` flag may grant instead of this one: PR and CW stand in for
    /// each other (both let a reader proceed while writers are excluded from the other).
    pub(super) fn alternative(self) -> Option<Mode> {
        match self {
            Mode::Pr => Some(Mode::Cw),
            Mode::Cw => Some(Mode::Pr),
            _ => None,
        }
    }

    /// Whether a holder of `self` moving to `to` (`None`: unlocking) writes the LVB.
    /// As in DLM, only PW and EX holders own the LVB, and they write it when they give
    /// the mode up or keep it; PW going up to EX does not write.
    pub(super) fn writes_lvb(self, to: Option<Mode>) -> bool {
        match self {
            Mode::Ex => true,
            Mode::Pw => to != Some(Mode::Ex),
            _ => false,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nl => "NL",
            Mode::Cr => "CR",
            Mode::Cw => "CW",
            Mode::Pr => "PR",
            Mode::Pw => "PW",
            Mode::Ex => "EX",
        })
    }
}

/// How many waiting requests (or holders) there are of each mode: lets a grant
/// decision compare a mode against a whole queue in six steps instead of one per lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ModeCounts([u32; 6]);

impl ModeCounts {
    pub(super) fn add(&mut self, mode: Mode) {
        self.0[mode.index()] += 1;
    }

    pub(super) fn remove(&mut self, mode: Mode) {
        debug_assert!(self.0[mode.index()] > 0, "removing an uncounted {mode}");
        self.0[mode.index()] = self.0[mode.index()].saturating_sub(1);
    }

    pub(super) fn get(&self, mode: Mode) -> u32 {
        self.0[mode.index()]
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }

    /// Whether any counted mode is incompatible with `mode`.
    pub(super) fn conflicts_with(&self, mode: Mode) -> bool {
        Mode::ALL
            .iter()
            .any(|&m| self.get(m) > 0 && !mode.compatible(m))
    }

    pub(super) fn plus(mut self, other: &ModeCounts) -> ModeCounts {
        for m in Mode::ALL {
            self.0[m.index()] += other.get(m);
        }
        self
    }
}
