//! The gRPC protocol shared by the lock server, the client library and `lockctl`.
//! Generated from `proto/lockd.proto`, plus what the protocol itself defines beyond the
//! messages: metadata keys, and how a `Pipeline` reply carries a call's status.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("lockd.v1");
    // The servers, generated apart with `RequestCodec` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/servers/lockd.v1.rs"));

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lockd_descriptor");
}

/// The most bytes of a caller's input an error message quotes; longer input is cut
/// there and marked with "…", so an echo never outgrows the caller's metadata limit.
pub const MAX_QUOTED_BYTES: usize = 64;

/// `input` for an error message: at most [`MAX_QUOTED_BYTES`] bytes of it (cut at a
/// character boundary), then "…" if anything was cut.
pub fn quote(input: &str) -> String {
    if input.len() <= MAX_QUOTED_BYTES {
        return input.to_string();
    }
    let mut end = MAX_QUOTED_BYTES;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &input[..end])
}

/// The codec of lockd's gRPC servers: prost's, except that a request that does not
/// decode (a string that is not UTF-8, a truncated field, a wrong wire type…) is the
/// caller's INVALID_ARGUMENT, naming the message and field as prost's error does,
/// instead of tonic's INTERNAL. Clients keep prost's codec: a reply that does not
/// decode is not the caller's mistake.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for RequestCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic::codec::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic::codec::ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(tonic::codec::ProstCodec::<T, U>::default().decoder())
    }
}

/// [`RequestCodec`]'s decoder.
#[derive(Debug)]
pub struct RequestDecoder<U>(<tonic::codec::ProstCodec<(), U> as tonic::codec::Codec>::Decoder)
where
    U: prost::Message + Default + Send + 'static;

impl<U> tonic::codec::Decoder for RequestDecoder<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        self.0.decode(buf).map_err(|status| {
            // prost's message names the message and the field, never the input bytes.
            let what = status
                .message()
                .trim_start_matches("failed to decode Protobuf message: ");
            tonic::Status::invalid_argument(format!("undecodable request: {what}"))
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// Response metadata key naming the leader's client address on a redirect.
pub const LEADER_METADATA_KEY: &str = "lockd-leader";
/// Request metadata key carrying the sender's cluster id on peer streams.
pub const CLUSTER_ID_METADATA_KEY: &str = "lockd-cluster-id";
/// Request metadata key carrying the sending server's id on peer streams.
pub const FROM_METADATA_KEY: &str = "lockd-from";
/// Peer streams: the sender's cluster identity (16 hex digits), fixed when the cluster
/// was bootstrapped; a receiver that has one refuses a stream that carries another.
pub const CLUSTER_UID_METADATA_KEY: &str = "lockd-cluster-uid";
/// Peer streams: the newest Raft log format the sending build reads and writes (a
/// decimal number; absent from builds before format 2). A leader writes entries of a
/// newer format only once every peer's stream has announced it.
pub const LOG_FORMAT_METADATA_KEY: &str = "lockd-log-format";
/// The log format that adds entries of several commands: a leader writes them only
/// while every peer has announced at least this (builds of format 1 cannot read them).
pub const LOG_FORMAT_BATCH: u32 = 2;
/// Response metadata key of a Login answered UNAVAILABLE because the leader is still
/// unfencing the node (its value: the session). The leader has a quorum and holds the
/// login: the client asks again with the same nonce, and does not count the wait as a
/// loss of quorum.
pub const UNFENCING_METADATA_KEY: &str = "lockd-unfencing";

impl v1::CallError {
    /// How a `Pipeline` reply carries the status the unary call would have returned.
    pub fn from_status(status: &tonic::Status) -> v1::CallError {
        v1::CallError {
            code: status.code() as i32,
            message: status.message().to_string(),
            leader: status
                .metadata()
                .get(LEADER_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// The status the unary call would have returned, leader redirect included.
    pub fn into_status(self) -> tonic::Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if !self.leader.is_empty() {
            if let Ok(leader) = self.leader.parse() {
                metadata.insert(LEADER_METADATA_KEY, leader);
            }
        }
        tonic::Status::with_metadata(tonic::Code::from_i32(self.code), self.message, metadata)
    }
}

/// Serves a `Pipeline` stream by answering each call with `service`'s unary handler of
/// the same name, each in a task of its own. For the scripted servers of tests; lockd's
/// server has its own, bounded one.
pub fn pipeline_via_unary<S>(
    service: S,
    mut requests: tonic::Streaming<v1::PipelineRequest>,
) -> tokio_stream::wrappers::ReceiverStream<Result<v1::PipelineReply, tonic::Status>>
where
    S: v1::lock_service_server::LockService + Clone,
{
    use v1::pipeline_reply::Result as Answer;
    use v1::pipeline_request::Call;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            let (service, tx) = (service.clone(), tx.clone());
            tokio::spawn(async move {
                let answer = match request.call {
                    Some(Call::Lock(r)) => service
                        .lock(tonic::Request::new(r))
                        .await
                        .map(|g| Answer::Grant(g.into_inner())),
                    Some(Call::Convert(r)) => service
                        .convert(tonic::Request::new(r))
                        .await
                        .map(|g| Answer::Grant(g.into_inner())),
                    Some(Call::Unlock(r)) => service
                        .unlock(tonic::Request::new(r))
                        .await
                        .map(|u| Answer::Unlocked(u.into_inner())),
                    None => Err(tonic::Status::invalid_argument("no call")),
                };
                let result = answer
                    .unwrap_or_else(|status| Answer::Error(v1::CallError::from_status(&status)));
                let reply = v1::PipelineReply {
                    tag: request.tag,
                    result: Some(result),
                };
                let _ = tx.send(Ok(reply)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
