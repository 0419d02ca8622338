//! systemd's watchdog (`WatchdogSec=` in the unit): the Raft driver's loop calls
//! [`Watchdog::alive`] every turn, and this sends `WATCHDOG=1` at half the interval
//! systemd asked for. A driver stuck in a turn (a hung fsync, a deadlock) stops the
//! pings, and systemd kills and restarts the server. Without the watchdog (outside
//! systemd, or no `WatchdogSec=`) it does nothing.

use std::time::{Duration, Instant};

pub struct Watchdog {
    /// Half of systemd's WATCHDOG_USEC; `None` when the watchdog is off.
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    /// Reads WATCHDOG_USEC / WATCHDOG_PID as systemd sets them for this process.
    pub fn from_env() -> Watchdog {
        let mut usec = 0;
        let every = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec) / 2)
            .filter(|d| !d.is_zero());
        if let Some(every) = every {
            tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
        }
        Watchdog { every, last: None }
    }

    /// The driver finished a turn: ping systemd if half its interval has passed.
    pub fn alive(&mut self) {
        let Some(every) = self.every else { return };
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < every)
        {
            return;
        }
        self.last = Some(now);
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]) {
            tracing::warn!("cannot ping the systemd watchdog: {e}");
        }
    }
}
