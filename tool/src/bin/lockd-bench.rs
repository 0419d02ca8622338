//! `lockd-bench`: lockd's performance benchmark (BRIEF §4.1 workloads W1–W5) against a
//! running cluster. `deploy/bench.sh` starts a throw-away local cluster and runs it.
//! The code lives in `tool/src/bench/`.

#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}
