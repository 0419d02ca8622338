//! The nemesis: real servers and client processes under a seeded fault schedule, a
//! history every process appends to, and a checker that proves lock safety from it
//! (BRIEF §4.2). `history` is the record format, `checker` the pure check, `run` the
//! harness that drives processes and faults.

pub mod checker;
pub mod history;
pub mod netns;
pub mod protected;
pub mod run;
