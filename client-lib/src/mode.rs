//! The six DLM lock modes, their compatibility matrix, their names and their wire form.

use std::fmt;
use std::str::FromStr;

use lockd_proto::v1;

/// A DLM lock mode.
///
/// Compatibility (who may hold a resource at the same time): NL with all; CR with all
/// but EX; CW with NL, CR, CW; PR with NL, CR, PR; PW with NL, CR; EX with NL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Null: no access, only keeps the lock (and its LVB) alive.
    Nl,
    /// Concurrent read.
    Cr,
    /// Concurrent write.
    Cw,
    /// Protected read (shared).
    Pr,
    /// Protected write.
    Pw,
    /// Exclusive.
    Ex,
}

impl Mode {
    /// All modes, weakest first.
    pub const ALL: [Mode; 6] = [Mode::Nl, Mode::Cr, Mode::Cw, Mode::Pr, Mode::Pw, Mode::Ex];
    /// GFS's SHARED state.
    pub const SHARED: Mode = Mode::Pr;
    /// GFS's DEFERRED state.
    pub const DEFERRED: Mode = Mode::Cw;
    /// GFS's EXCLUSIVE state.
    pub const EXCLUSIVE: Mode = Mode::Ex;

    /// DLM's compatibility matrix: may a lock in `self` be held while another node holds
    /// `other` on the same resource? Symmetric.
    pub fn is_compatible(self, other: Mode) -> bool {
        use Mode::*;
        match (self, other) {
            (Nl, _) | (_, Nl) => true,
            (Cr, m) | (m, Cr) => m != Ex,
            (Cw, Cw) | (Pr, Pr) => true,
            _ => false,
        }
    }

    /// The upper-case DLM name: "NL", "CR", "CW", "PR", "PW", "EX".
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nl => "NL",
            Mode::Cr => "CR",
            Mode::Cw => "CW",
            Mode::Pr => "PR",
            Mode::Pw => "PW",
            Mode::Ex => "EX",
        }
    }

    /// The wire value (`lockd.v1.Mode`).
    pub fn to_proto(self) -> v1::Mode {
        match self {
            Mode::Nl => v1::Mode::Nl,
            Mode::Cr => v1::Mode::Cr,
            Mode::Cw => v1::Mode::Cw,
            Mode::Pr => v1::Mode::Pr,
            Mode::Pw => v1::Mode::Pw,
            Mode::Ex => v1::Mode::Ex,
        }
    }

    /// Reads a wire value; `None` for MODE_UNSPECIFIED and unknown numbers.
    pub fn from_proto(value: i32) -> Option<Mode> {
        match v1::Mode::try_from(value).ok()? {
            v1::Mode::Unspecified => None,
            v1::Mode::Nl => Some(Mode::Nl),
            v1::Mode::Cr => Some(Mode::Cr),
            v1::Mode::Cw => Some(Mode::Cw),
            v1::Mode::Pr => Some(Mode::Pr),
            v1::Mode::Pw => Some(Mode::Pw),
            v1::Mode::Ex => Some(Mode::Ex),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`Mode`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lock mode {0:?} (expected NL, CR, CW, PR, PW, EX, SHARED, DEFERRED or EXCLUSIVE)")]
pub struct ParseModeError(String);

impl FromStr for Mode {
    type Err = ParseModeError;

    /// Accepts the DLM names and GFS's state names, in any case.
    fn from_str(s: &str) -> Result<Mode, ParseModeError> {
        let mode = match s.to_ascii_uppercase().as_str() {
            "NL" => Mode::Nl,
            "CR" => Mode::Cr,
            "CW" => Mode::Cw,
            "PR" => Mode::Pr,
            "PW" => Mode::Pw,
            "EX" => Mode::Ex,
            "SHARED" => Mode::SHARED,
            "DEFERRED" => Mode::DEFERRED,
            "EXCLUSIVE" => Mode::EXCLUSIVE,
            _ => return Err(ParseModeError(s.to_string())),
        };
        Ok(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dlm_names_in_any_case() {
        assert_eq!("EX".parse::<Mode>(), Ok(Mode::Ex));
        assert_eq!("ex".parse::<Mode>(), Ok(Mode::Ex));
        assert_eq!("Pr".parse::<Mode>(), Ok(Mode::Pr));
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string().to_lowercase().parse::<Mode>(), Ok(m));
        }
    }

    #[test]
    fn parses_gfs_state_names() {
        assert_eq!("shared".parse::<Mode>(), Ok(Mode::Pr));
        assert_eq!("DEFERRED".parse::<Mode>(), Ok(Mode::Cw));
        assert_eq!("Exclusive".parse::<Mode>(), Ok(Mode::Ex));
    }

    #[test]
    fn rejects_unknown_names() {
        let err = "XX".parse::<Mode>().unwrap_err();
        assert!(err.to_string().contains("\"XX\""), "{err}");
        assert!("".parse::<Mode>().is_err());
        assert!("unlocked".parse::<Mode>().is_err());
    }

    #[test]
    fn displays_upper_case_dlm_names() {
        let names: Vec<String> = Mode::ALL.iter().map(|m| m.to_string()).collect();
        assert_eq!(names, ["NL", "CR", "CW", "PR", "PW", "EX"]);
    }

    #[test]
    fn wire_values_round_trip() {
        for m in Mode::ALL {
            assert_eq!(Mode::from_proto(m.to_proto() as i32), Some(m));
        }
        assert_eq!(Mode::from_proto(0), None);
        assert_eq!(Mode::from_proto(99), None);
        assert_eq!(Mode::Ex.to_proto() as i32, 6);
    }

    #[test]
    fn compatibility_matches_the_dlm_matrix() {
        use Mode::*;
        // Row = held, columns in ALL order (NL CR CW PR PW EX).
        let table = [
            (Nl, [true, true, true, true, true, true]),
            (Cr, [true, true, true, true, true, false]),
            (Cw, [true, true, true, false, false, false]),
            (Pr, [true, true, false, true, false, false]),
            (Pw, [true, true, false, false, false, false]),
            (Ex, [true, false, false, false, false, false]),
        ];
        for (held, row) in table {
            for (want, ok) in Mode::ALL.into_iter().zip(row) {
                assert_eq!(held.is_compatible(want), ok, "{held} vs {want}");
            }
        }
    }
}
