//! `Lock`, `Convert` and `Unlock` as messages on one long-lived `Pipeline` stream per
//! channel, instead of one HTTP/2 stream per call: no request headers, no trailers,
//! no new stream per call, so each costs a fraction of a unary call on both ends.
//!
//! A call registers a tag, sends its request on the stream and waits for the reply
//! with that tag; replies come back in the order the server finishes them. The stream
//! is opened on first use. When it breaks (connection lost, server stopped), every call
//! waiting on it fails with a transport error, which the retry loop in `transport`
//! treats like a broken unary call: it retries with the same request id, on a stream
//! opened afresh. So a call's outcome and its retries are exactly those of the unary
//! call it replaces.
//!
//! Dropping a call (its attempt timed out) only forgets its tag; like a unary call that
//! is cut off, the server still runs it and its reply is ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lockd_proto::v1::lock_service_client::LockServiceClient;
use lockd_proto::v1::{
    pipeline_reply::Result as Answer, pipeline_request::Call, ConvertRequest, Grant, LockRequest,
    PipelineReply, PipelineRequest, UnlockReply, UnlockRequest,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Response, Status, Streaming};

/// Requests queued for the stream before a caller waits; the server itself works on at
/// most 1,024 calls of a stream at once.
const REQUEST_QUEUE: usize = 1_024;

/// One channel's pipeline; opens its stream when first needed and again after a break.
pub(crate) struct Pipeline {
    channel: Channel,
    stream: tokio::sync::Mutex<Option<Open>>,
}

/// An open stream: where requests go, and the calls waiting for replies.
#[derive(Clone)]
struct Open {
    requests: mpsc::Sender<PipelineRequest>,
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    /// Why the stream ended; no call may register once it is set.
    broken: Option<String>,
    next_tag: u64,
    calls: HashMap<u64, oneshot::Sender<Result<Answer, Status>>>,
}

impl Waiting {
    fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
        waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Pipeline {
    pub(crate) fn new(channel: Channel) -> Pipeline {
        Pipeline {
            channel,
            stream: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) async fn lock(&self, request: LockRequest) -> Result<Response<Grant>, Status> {
        match self.call(Call::Lock(request)).await? {
            Answer::Grant(grant) => Ok(Response::new(grant)),
            other => Err(unexpected("lock", &other)),
        }
    }

    pub(crate) async fn convert(&self, request: ConvertRequest) -> Result<Response<Grant>, Status> {
        match self.call(Call::Convert(request)).await? {
            Answer::Grant(grant) => Ok(Response::new(grant)),
            other => Err(unexpected("convert", &other)),
        }
    }

    pub(crate) async fn unlock(
        &self,
        request: UnlockRequest,
    ) -> Result<Response<UnlockReply>, Status> {
        match self.call(Call::Unlock(request)).await? {
            Answer::Unlocked(reply) => Ok(Response::new(reply)),
            other => Err(unexpected("unlock", &other)),
        }
    }

    async fn call(&self, call: Call) -> Result<Answer, Status> {
        let open = self.open().await?;
        let (tx, rx) = oneshot::channel();
        let tag = {
            let mut waiting = Waiting::lock(&open.waiting);
            if let Some(why) = &waiting.broken {
                return Err(broken(why));
            }
            let tag = waiting.next_tag;
            waiting.next_tag += 1;
            waiting.calls.insert(tag, tx);
            tag
        };
        let _forget = Forget {
            waiting: &open.waiting,
            tag,
        };
        let request = PipelineRequest {
            tag,
            call: Some(call),
        };
        if open.requests.send(request).await.is_err() {
            return Err(broken("the stream is closed"));
        }
        match rx.await {
            Ok(answer) => answer,
            Err(_) => Err(broken("the stream is closed")),
        }
    }

    /// The open stream, opening one if there is none or the last one broke.
    async fn open(&self) -> Result<Open, Status> {
        let mut stream = self.stream.lock().await;
        if let Some(open) = stream.as_ref() {
            if Waiting::lock(&open.waiting).broken.is_none() {
                return Ok(open.clone());
            }
        }
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        let replies = LockServiceClient::new(self.channel.clone())
            .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let open = Open {
            requests,
            waiting: Arc::default(),
        };
        // The reader holds the waiting calls but not the request sender: when this
        // pipeline is dropped, the request stream ends and the server closes its side.
        tokio::spawn(read_replies(replies, open.waiting.clone()));
        *stream = Some(open.clone());
        Ok(open)
    }
}

/// Hands each reply to the call with its tag; when the stream ends, fails every call
/// still waiting and marks the stream broken.
async fn read_replies(mut replies: Streaming<PipelineReply>, waiting: Arc<Mutex<Waiting>>) {
    let why = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let call = Waiting::lock(&waiting).calls.remove(&reply.tag);
                let answer = match reply.result {
                    Some(Answer::Error(e)) => Err(e.into_status()),
                    Some(answer) => Ok(answer),
                    None => Err(Status::internal("a pipeline reply without a result")),
                };
                if let Some(call) = call {
                    let _ = call.send(answer);
                }
            }
            Ok(None) => break "the server ended the stream".to_string(),
            Err(status) => break format!("the stream failed: {}", status.message()),
        }
    };
    let calls = {
        let mut waiting = Waiting::lock(&waiting);
        waiting.broken = Some(why.clone());
        std::mem::take(&mut waiting.calls)
    };
    for (_, call) in calls {
        let _ = call.send(Err(broken(&why)));
    }
}

/// Forgets a call's tag when the call ends, whether answered or dropped.
struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    tag: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        Waiting::lock(self.waiting).calls.remove(&self.tag);
    }
}

/// The status a broken stream gives its calls: a local transport error (it has a
/// source), so the retry loop retries the call rather than returning it.
fn broken(why: &str) -> Status {
    Status::from_error(Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("pipeline stream: {why}"),
    )))
}

fn unexpected(call: &str, answer: &Answer) -> Status {
    Status::internal(format!("the server answered {call} with {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockd_proto::v1::CallError;
    use lockd_proto::LEADER_METADATA_KEY;
    use tonic::Code;

    #[test]
    fn an_error_reply_becomes_the_unary_status_with_its_redirect() {
        let status = CallError::into_status(CallError {
            code: Code::Unavailable as i32,
            message: "not the leader".into(),
            leader: "127.0.0.1:7102".into(),
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "not the leader");
        assert_eq!(
            crate::transport::leader_hint(status.metadata()).as_deref(),
            Some("127.0.0.1:7102")
        );
        assert!(
            std::error::Error::source(&status).is_none(),
            "a server answer"
        );

        let status = CallError::into_status(CallError {
            code: Code::Aborted as i32,
            message: "would block".into(),
            leader: String::new(),
        });
        assert_eq!(status.code(), Code::Aborted);
        assert!(status.metadata().get(LEADER_METADATA_KEY).is_none());
    }

    #[test]
    fn a_broken_stream_is_a_local_transport_error() {
        let status = broken("the server ended the stream");
        assert!(std::error::Error::source(&status).is_some());
        assert!(status.message().contains("the server ended the stream"));
    }
}
