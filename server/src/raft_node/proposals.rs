use super::*;

pub(super) type CommandReply = oneshot::Sender<Result<Reply, ProposeError>>;

pub(super) fn driver_stopped() -> ProposeError {
    ProposeError::Internal("the Raft driver stopped".into())
}

pub(super) fn fail(waiting: Waiting, e: ProposeError) {
    match waiting {
        Waiting::Command(tx) => {
            let _ = tx.send(Err(e));
        }
        Waiting::Read(_, tx) => {
            let _ = tx.send(Err(e));
        }
        Waiting::Membership(tx) => {
            let _ = tx.send(Err(e));
        }
    }
}

impl<O: Outbox> RaftNode<O> {
    pub(super) fn propose_with(
        &mut self,
        envelope: &Envelope,
        waiting: Waiting,
        park_as: Option<(SessionId, RequestId)>,
    ) {
        if !self.is_leader() {
            fail(waiting, self.not_leader());
            return;
        }
        match self.append(envelope) {
            Ok(seq) => self.track(seq, waiting, park_as),
            Err(e) => fail(waiting, e),
        }
    }

    /// Remembers who waits for the entry with sequence number `seq`.
    pub(super) fn track(
        &mut self,
        seq: u64,
        waiting: Waiting,
        park_as: Option<(SessionId, RequestId)>,
    ) {
        let proposed = Instant::now();
        self.in_flight.insert(
            seq,
            InFlight {
                waiting,
                park_as,
                proposed,
            },
        );
    }

    /// Appends one entry to the leader's log and returns the sequence number its
    /// context carries, by which the caller is found when it applies.
    pub(super) fn append(&mut self, envelope: &Envelope) -> Result<u64, ProposeError> {
        let data = postcard::to_allocvec(envelope)
            .map_err(|e| ProposeError::Internal(format!("cannot encode entry: {e}")))?;
        let (seq, context) = self.next_context();
        self.raw
            .propose(context, data)
            .map_err(|_| self.not_leader())?;
        Ok(seq)
    }

    /// The next proposal's sequence number and the entry context that carries it.
    pub(super) fn next_context(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut context = Vec::with_capacity(16);
        context.extend_from_slice(&self.nonce.to_le_bytes());
        context.extend_from_slice(&seq.to_le_bytes());
        (seq, context)
    }

    /// An entry the leader proposes on its own behalf; nobody waits for its reply.
    pub(super) fn propose_quietly(&mut self, command: Command) {
        let envelope = Envelope {
            now_ms: Self::now_ms(),
            op: Op::Apply(command),
        };
        if let Err(e) = self.append(&envelope) {
            debug!("proposal dropped: {e}");
        }
    }

    pub(super) fn take_in_flight(&mut self, context: &[u8]) -> Option<InFlight> {
        let nonce = u64::from_le_bytes(context.get(0..8)?.try_into().ok()?);
        let seq = u64::from_le_bytes(context.get(8..16)?.try_into().ok()?);
        if nonce != self.nonce {
            return None;
        }
        let p = self.in_flight.remove(&seq)?;
        telemetry::committed(p.proposed.elapsed());
        Some(p)
    }

    pub(super) fn answer(&mut self, p: InFlight, reply: Reply) {
        let Waiting::Command(tx) = p.waiting else {
            return;
        };
        match (reply, p.park_as) {
            (Reply::Queued { .. }, Some(key)) => {
                let parked = self.parked.entry(key).or_default();
                parked.retain(|tx| !tx.is_closed());
                parked.push(tx);
            }
            (reply, _) => {
                let _ = tx.send(Ok(reply));
            }
        }
    }

    pub(super) fn answer_query(&self, query: &Query) -> QueryAnswer {
        match query {
            Query::CheckToken {
                lockspace,
                resource,
                token,
            } => {
                let (current, latest) = self.state.check_token(lockspace, resource, *token);
                QueryAnswer::Token { current, latest }
            }
            Query::SessionNode { session } => QueryAnswer::SessionNode(
                self.state
                    .sessions()
                    .find(|s| s.session == *session)
                    .map(|s| s.node.to_string()),
            ),
        }
    }
}
