//! A protected resource, as a fencing token is meant to be used (Kleppmann's "storage
//! checks the token"): it remembers the largest token it has seen and rejects any
//! write carrying a smaller one. Served on a loopback port with a one-line protocol,
//! `WRITE <token>` answered by `OK` or `STALE <largest seen>`, so a client process can
//! write to it — including one that wakes from a SIGSTOP holding a stale token.

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The token rule alone.
#[derive(Debug, Default, Clone)]
pub struct Protected {
    pub largest_token: u64,
    /// Tokens of accepted writes, in order.
    pub accepted: Vec<u64>,
    /// Tokens of rejected writes, in order.
    pub rejected: Vec<u64>,
}

impl Protected {
    /// Accepts a write with `token` unless a larger token was seen before.
    pub fn write(&mut self, token: u64) -> Result<(), u64> {
        if token < self.largest_token {
            self.rejected.push(token);
            return Err(self.largest_token);
        }
        self.largest_token = token;
        self.accepted.push(token);
        Ok(())
    }
}

/// A [`Protected`] served on 127.0.0.1.
pub struct ProtectedServer {
    pub addr: String,
    pub state: Arc<Mutex<Protected>>,
    accept: tokio::task::JoinHandle<()>,
}

impl ProtectedServer {
    pub async fn start() -> ProtectedServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind protected resource");
        let addr = listener.local_addr().expect("addr").to_string();
        let state = Arc::new(Mutex::new(Protected::default()));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    if BufReader::new(read).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let answer = match line.trim().strip_prefix("WRITE ").map(str::parse::<u64>) {
                        Some(Ok(token)) => match shared.lock().expect("protected").write(token) {
                            Ok(()) => "OK".to_string(),
                            Err(largest) => format!("STALE {largest}"),
                        },
                        _ => "ERR bad request".to_string(),
                    };
                    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
                });
            }
        });
        ProtectedServer {
            addr,
            state,
            accept,
        }
    }

    /// A write from this process (the other holder).
    pub fn write(&self, token: u64) -> Result<(), u64> {
        self.state.lock().expect("protected").write(token)
    }

    pub fn snapshot(&self) -> Protected {
        self.state.lock().expect("protected").clone()
    }
}

impl Drop for ProtectedServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::Protected;

    #[test]
    fn an_older_token_is_rejected_and_an_equal_or_newer_one_accepted() {
        let mut p = Protected::default();
        assert_eq!(p.write(5), Ok(()));
        assert_eq!(p.write(5), Ok(()), "the same holder writes again");
        assert_eq!(p.write(9), Ok(()));
        assert_eq!(p.write(5), Err(9));
        assert_eq!(p.accepted, vec![5, 5, 9]);
        assert_eq!(p.rejected, vec![5]);
    }
}
