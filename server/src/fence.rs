//! Runs fence agents: the thin shell between a fence decision of the replicated state
//! machine and the external program that power-cycles or cuts off a failed node.
//!
//! The agents follow the ClusterLabs fence-agents calling convention, so Debian's
//! packaged `fence_ipmilan`, `fence_virsh`, `fence_dummy`... work unchanged: the agent
//! gets **no command-line arguments**; its parameters arrive as `key=value` lines on
//! stdin (`action=`, `nodename=`, `port=` and the device's own keys from the config),
//! stdin is then closed, and **exit status 0 means the node is fenced**. Any other exit,
//! death by a signal, failure to start, or running past the device's `timeout_ms` is a
//! failure (BRIEF §3.4).
//!
//! Every agent runs in a process group of its own. Agents routinely start helpers
//! (`ipmitool`, `ssh`, `virsh`), and a hung helper is as dangerous as a hung agent: at
//! the timeout the **whole group** is killed with SIGKILL while the agent itself is still
//! unreaped (so its group id cannot have been reused), and the agent is then reaped. If
//! the future of a run is dropped (the runtime shuts down), the group is killed too.
//!
//! A level's devices run one after another, in config order, and the level fails at the
//! first device that fails. lockd does not do Pacemaker's "off all, then on all" for
//! redundant power supplies: a level of two PDU outlets with `action = "reboot"` would
//! cycle them one at a time and never cut the node's power, so such levels should use
//! `action = "off"`.
//!
//! This module only runs agents and reports what happened. Deciding whom to fence,
//! which level comes next, retries and back-off belong to the state machine and the Raft
//! driver. Parameter values never reach a log or an outcome; the values of keys
//! containing "passw" are also scrubbed from what an agent prints.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tracing::{debug, info, warn};

use crate::config::FenceDeviceConfig;

/// What one agent run came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOutcome {
    /// The agent exited with status 0 within its timeout.
    pub ok: bool,
    /// Short and human ("exit 0", "exit 1: <last stderr line>", "timed out after ...");
    /// never contains a parameter value.
    pub detail: String,
    pub elapsed_ms: u64,
}

/// How much of the agent's stderr is kept: its last line explains a failure.
const STDERR_TAIL_BYTES: usize = 4096;
/// How much of the agent's stdout is kept (for a debug log); the rest is read and dropped.
const STDOUT_HEAD_BYTES: usize = 4096;
/// The longest stderr line quoted in an outcome's detail.
const DETAIL_LINE_MAX_CHARS: usize = 200;
/// Size of one read from an agent's pipe.
const PIPE_READ_BYTES: usize = 8192;
/// After the agent exited, how long a leftover process of its group may keep its output
/// pipes open before lockd stops reading them.
const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long `kill` itself may take.
const KILL_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SIGKILLed agent may take to die (a process stuck in the kernel does not
/// die at once). Past it the agent is left to tokio's orphan reaper.
const REAP_GRACE: Duration = Duration::from_secs(5);
/// A line break inside a value would let it smuggle in a line of its own (`action=on`).
const LINE_BREAKS: [char; 2] = ['\n', '\r'];

/// Runs `device`'s agent against node `victim`: no arguments; stdin gets
/// [`agent_input`], then is closed. Exit 0 = ok. Anything else, failure to start, or the
/// timeout = not ok; at the timeout the agent's whole process group is killed with
/// SIGKILL and the agent is reaped.
///
/// Returns at most about `timeout_ms` + 11 s after it was called (kill, reap and pipe
/// drain are bounded too).
pub async fn run_agent(device: &FenceDeviceConfig, victim: &str) -> AgentOutcome {
    let started = Instant::now();
    info!(
        victim,
        device = %describe(device),
        timeout_ms = device.timeout_ms,
        "running fence agent"
    );
    let (ok, detail) = match refusal(device, victim) {
        Some(detail) => (false, detail),
        None => run(device, victim, agent_input(device, victim)).await,
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let agent = device.agent.display();
    if ok {
        info!(victim, %agent, elapsed_ms, %detail, "fence agent succeeded");
    } else {
        warn!(victim, %agent, elapsed_ms, %detail, "fence agent failed");
    }
    AgentOutcome {
        ok,
        detail,
        elapsed_ms,
    }
}

/// Asks `device`'s agent whether its device answers: the same run as a fence, with
/// `action=monitor` (every ClusterLabs agent has it: it logs in to the BMC or PDU and
/// reports, without touching the node) and the same timeout. Exit 0 = the device works.
pub async fn monitor(device: &FenceDeviceConfig, node: &str) -> AgentOutcome {
    let started = Instant::now();
    let (ok, detail) = match refusal(device, node) {
        Some(detail) => (false, detail),
        None => {
            let mut input = String::new();
            push_line(&mut input, "action", "monitor");
            // The device's action line is replaced; the rest is a fence's input.
            let fence = agent_input(device, node);
            for line in fence.lines().skip(1) {
                input.push_str(line);
                input.push('\n');
            }
            run(device, node, input).await
        }
    };
    AgentOutcome {
        ok,
        detail,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// The stdin text of an agent run: `action=`, `nodename=`, `port=<victim>` unless the
/// params name a `port` or a `plug` (the usual default of fence agents), then every
/// configured param, one `key=value` per line.
pub fn agent_input(device: &FenceDeviceConfig, victim: &str) -> String {
    let mut input = String::new();
    push_line(&mut input, "action", device.action.as_str());
    push_line(&mut input, "nodename", victim);
    if !device.params.contains_key("port") && !device.params.contains_key("plug") {
        push_line(&mut input, "port", victim);
    }
    for (key, value) in &device.params {
        push_line(&mut input, key, value);
    }
    input
}

/// A loggable description of a device: agent path, action and params, with the value
/// of every key containing "passw" (`passwd`, `passwd_script`, ...) shown as `***`.
pub fn describe(device: &FenceDeviceConfig) -> String {
    let mut text = format!(
        "{} action={}",
        device.agent.display(),
        device.action.as_str()
    );
    for (key, value) in &device.params {
        text.push(' ');
        text.push_str(key);
        text.push('=');
        text.push_str(if is_secret_key(key) { "***" } else { value });
    }
    text
}

/// A node's devices grouped into levels, in ascending level order; within a level the
/// devices keep their config order.
pub fn levels(devices: &[FenceDeviceConfig]) -> Vec<(u32, Vec<&FenceDeviceConfig>)> {
    let mut by_level: BTreeMap<u32, Vec<&FenceDeviceConfig>> = BTreeMap::new();
    for device in devices {
        by_level.entry(device.level).or_default().push(device);
    }
    by_level.into_iter().collect()
}

/// What one run of a level's devices came to, for the driver and the fence history.
pub struct LevelRun {
    /// Every device of the level was run and succeeded.
    pub ok: bool,
    /// "<agent file name>: <outcome>" per device run, `; `-separated (never a parameter
    /// value: those may hold secrets).
    pub detail: String,
    pub took: std::time::Duration,
}

/// [`run_level`] over owned devices, summed up as a [`LevelRun`] (fencing and
/// unfencing run their devices on a task of their own).
pub async fn run_level_summary(devices: &[FenceDeviceConfig], victim: &str) -> LevelRun {
    let refs: Vec<&FenceDeviceConfig> = devices.iter().collect();
    let started = std::time::Instant::now();
    let outcomes = run_level(&refs, victim).await;
    let took = started.elapsed();
    let ok = outcomes.len() == refs.len() && outcomes.iter().all(|(_, o)| o.ok);
    let detail = outcomes
        .iter()
        .map(|(i, o)| {
            let agent = refs[*i]
                .agent
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{agent}: {}", o.detail)
        })
        .collect::<Vec<_>>()
        .join("; ");
    LevelRun { ok, detail, took }
}

/// Runs the devices of one level sequentially, in config order, stopping at the first
/// failure: a level succeeds only if every one of its devices does. Returns one
/// (index within the level, outcome) per device actually run.
pub async fn run_level(devices: &[&FenceDeviceConfig], victim: &str) -> Vec<(usize, AgentOutcome)> {
    let mut outcomes = Vec::with_capacity(devices.len());
    for (index, device) in devices.iter().enumerate() {
        let outcome = run_agent(device, victim).await;
        let ok = outcome.ok;
        outcomes.push((index, outcome));
        if !ok {
            break;
        }
    }
    outcomes
}

fn push_line(input: &mut String, key: &str, value: &str) {
    input.push_str(key);
    input.push('=');
    input.push_str(value);
    input.push('\n');
}

fn is_secret_key(key: &str) -> bool {
    key.to_ascii_lowercase().contains("passw")
}

/// Why the agent must not be run with this input, if it must not. The config loader
/// rejects bad keys; values are checked here, at the last moment, because one line
/// break is all it takes to override `action=`.
fn refusal(device: &FenceDeviceConfig, victim: &str) -> Option<String> {
    if victim.contains(LINE_BREAKS) {
        return Some("node name contains a line break; agent not run".to_owned());
    }
    device
        .params
        .iter()
        .find(|(key, value)| key.contains(LINE_BREAKS) || value.contains(LINE_BREAKS))
        .map(|(key, _)| format!("parameter {key:?} contains a line break; agent not run"))
}

/// How the wait for the agent ended.
enum Ending {
    Exited(ExitStatus),
    WaitFailed(io::Error),
    /// The agent ran past its timeout; its group was killed (or killing it failed).
    TimedOut(Result<(), String>),
}

/// Kills the agent's process group if a run is abandoned halfway (its future dropped),
/// so that no agent outlives the server that started it. Disarmed once the agent was
/// reaped or its group already killed: after that the group id may name someone else.
struct GroupGuard {
    pgid: Option<u32>,
}

impl GroupGuard {
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            warn!(
                pgid,
                "fence agent abandoned while running; killing its process group"
            );
            // Blocking, but only on this rare path, and `kill` returns at once.
            let _ = kill_command(pgid).status();
        }
    }
}

fn kill_command(pgid: u32) -> std::process::Command {
    let mut kill = std::process::Command::new("kill");
    kill.args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    kill
}

/// Spawns the agent, feeds its stdin, reads both output pipes while waiting for it (so
/// a chatty agent cannot block on a full pipe), and kills its group at the timeout.
async fn run(device: &FenceDeviceConfig, victim: &str, input: String) -> (bool, String) {
    let mut child = match spawn(device) {
        Ok(child) => child,
        Err(detail) => return (false, detail),
    };
    // Declared after `child`, so dropped before it: the group dies while the agent is
    // still unreaped.
    let mut guard = GroupGuard { pgid: child.id() };

    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let mut stdout_head = Vec::new();
    let mut stderr_tail = Vec::new();
    let io = async {
        tokio::join!(
            feed(stdin, input.as_bytes()),
            read_head(stdout, &mut stdout_head, STDOUT_HEAD_BYTES),
            read_tail(stderr, &mut stderr_tail, STDERR_TAIL_BYTES),
        )
    };
    let ending = wait(&mut child, &mut guard, io, device, victim).await;

    let secrets = secret_values(device);
    if let Some(line) = last_line(&stdout_head, &secrets) {
        debug!(victim, stdout = %line, "fence agent output");
    }
    verdict(ending, &stderr_tail, &secrets, device.timeout_ms)
}

/// The agent's process, in a process group of its own, with all three pipes; or why it
/// could not be started.
fn spawn(device: &FenceDeviceConfig) -> Result<Child, String> {
    let mut command = std::process::Command::new(&device.agent);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    command.spawn().map_err(|e| {
        format!(
            "cannot start {}: {}",
            device.agent.display(),
            os_error_text(&e)
        )
    })
}

/// Waits for the agent to exit, driving `io` (its pipes) meanwhile, until the device's
/// timeout, when its group is killed; then gives the pipes [`PIPE_DRAIN_GRACE`] to
/// reach their end.
async fn wait(
    child: &mut Child,
    guard: &mut GroupGuard,
    io: impl Future,
    device: &FenceDeviceConfig,
    victim: &str,
) -> Ending {
    tokio::pin!(io);
    let deadline = tokio::time::sleep(Duration::from_millis(device.timeout_ms));
    tokio::pin!(deadline);
    let mut io_done = false;
    let waited = loop {
        tokio::select! {
            _ = &mut io, if !io_done => io_done = true,
            status = child.wait() => break Some(status),
            () = &mut deadline => break None,
        }
    };
    let ending = match waited {
        Some(Ok(status)) => {
            guard.disarm();
            Ending::Exited(status)
        }
        Some(Err(e)) => Ending::WaitFailed(e),
        None => past_deadline(child, guard, device, victim).await,
    };
    if !io_done
        && tokio::time::timeout(PIPE_DRAIN_GRACE, &mut io)
            .await
            .is_err()
    {
        debug!(
            victim,
            "a leftover process of the fence agent holds its output open; stopped reading"
        );
    }
    ending
}

/// The deadline fired: unless the agent exited just then, its group is killed and the
/// agent reaped (for at most [`REAP_GRACE`]).
async fn past_deadline(
    child: &mut Child,
    guard: &mut GroupGuard,
    device: &FenceDeviceConfig,
    victim: &str,
) -> Ending {
    // It finished just as the deadline fired: its verdict stands.
    if let Ok(Some(status)) = child.try_wait() {
        guard.disarm();
        return Ending::Exited(status);
    }
    let killed = match guard.pgid {
        Some(pgid) => kill_process_group(pgid).await,
        None => Err("no process group id".to_owned()),
    };
    guard.disarm();
    // The leader directly too, in case the group kill failed.
    let _ = child.start_kill();
    if tokio::time::timeout(REAP_GRACE, child.wait())
        .await
        .is_err()
    {
        warn!(victim, agent = %device.agent.display(), "fence agent not dead after SIGKILL; leaving it to the reaper");
    }
    Ending::TimedOut(killed)
}

/// The values of the device's secret parameters, scrubbed from what the agent printed.
fn secret_values(device: &FenceDeviceConfig) -> Vec<&str> {
    device
        .params
        .iter()
        .filter(|(key, value)| is_secret_key(key) && !value.is_empty())
        .map(|(_, value)| value.as_str())
        .collect()
}

/// Whether the run fenced, and its detail, from how the wait ended.
fn verdict(
    ending: Ending,
    stderr_tail: &[u8],
    secrets: &[&str],
    timeout_ms: u64,
) -> (bool, String) {
    match ending {
        Ending::Exited(status) => (status.success(), exit_detail(status, stderr_tail, secrets)),
        Ending::WaitFailed(e) => (
            false,
            format!("cannot wait for the agent: {}", os_error_text(&e)),
        ),
        Ending::TimedOut(Ok(())) => (
            false,
            format!("timed out after {timeout_ms} ms; process group killed"),
        ),
        Ending::TimedOut(Err(e)) => (
            false,
            format!("timed out after {timeout_ms} ms; killing its process group failed: {e}"),
        ),
    }
}

/// Writes the whole input, then closes stdin (by dropping it): agents read to EOF.
async fn feed(stdin: Option<ChildStdin>, input: &[u8]) {
    let Some(mut stdin) = stdin else { return };
    if let Err(e) = stdin.write_all(input).await {
        // An agent may exit without reading; its exit status is what counts.
        debug!("fence agent did not take all of its input: {e}");
    }
}

/// Reads `pipe` to its end, keeping its first `limit` bytes.
async fn read_head(pipe: Option<impl AsyncRead + Unpin>, head: &mut Vec<u8>, limit: usize) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; PIPE_READ_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = limit.saturating_sub(head.len());
                head.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Reads `pipe` to its end, keeping its last `limit` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, tail: &mut Vec<u8>, limit: usize) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; PIPE_READ_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > limit {
                    tail.drain(..tail.len() - limit);
                }
            }
        }
    }
}

/// `kill -KILL -- -<pgid>`: libc is not a dependency of this crate, and `kill(1)` is.
async fn kill_process_group(pgid: u32) -> Result<(), String> {
    let mut kill = tokio::process::Command::from(kill_command(pgid));
    kill.stderr(Stdio::piped()).kill_on_drop(true);
    match tokio::time::timeout(KILL_COMMAND_TIMEOUT, kill.output()).await {
        Err(_) => Err("kill did not return".to_owned()),
        Ok(Err(e)) => Err(format!("cannot run kill: {}", os_error_text(&e))),
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => {
            Err(last_line(&output.stderr, &[])
                .unwrap_or_else(|| format!("kill: {}", output.status)))
        }
    }
}

/// "exit 3: <last stderr line>", "killed by signal 9", or just "exit 0" on success.
fn exit_detail(status: ExitStatus, stderr_tail: &[u8], secrets: &[&str]) -> String {
    let head = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    };
    if status.success() {
        return head;
    }
    match last_line(stderr_tail, secrets) {
        Some(line) => format!("{head}: {line}"),
        None => head,
    }
}

/// The last non-blank line of `output`, trimmed, with control characters blanked,
/// every secret replaced by `***`, and cut to [`DETAIL_LINE_MAX_CHARS`].
fn last_line(output: &[u8], secrets: &[&str]) -> Option<String> {
    let text = String::from_utf8_lossy(output);
    let line = text.lines().map(str::trim).rfind(|line| !line.is_empty())?;
    let mut line: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for secret in secrets {
        line = line.replace(secret, "***");
    }
    Some(line.chars().take(DETAIL_LINE_MAX_CHARS).collect())
}

/// An I/O error's text without the " (os error N)" suffix.
fn os_error_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests;
