//! A request body that can be sent again: each attempt's body records the frames it passes
//! to the transport, up to a cap, so a retry replays them. It also tells whether an attempt
//! was ever polled: a body never polled cannot have reached a server.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;

use crate::BoxError;

/// The most request bytes kept for replay; a larger request is sent once.
pub const MAX_REPLAY_BYTES: usize = 256 * 1024;

struct Recording {
    inner: Option<Body>,
    frames: Vec<Bytes>,
    bytes: usize,
    overflowed: bool,
}

/// The original body and what attempts have read of it.
pub(crate) struct Replay {
    recording: Arc<Mutex<Recording>>,
}

impl Replay {
    pub(crate) fn new(body: Body) -> Self {
        let recording = Recording { inner: Some(body), frames: Vec::new(), bytes: 0, overflowed: false };
        Replay { recording: Arc::new(Mutex::new(recording)) }
    }

    /// Whether a new attempt would send the whole request.
    pub(crate) fn replayable(&self) -> bool {
        !self.recording.lock().expect("replay lock").overflowed
    }

    /// The body of a new attempt and a flag that turns true once the transport polls it.
    pub(crate) fn attempt(&self) -> (Body, Arc<AtomicBool>) {
        let polled = Arc::new(AtomicBool::new(false));
        let body = AttemptBody { recording: self.recording.clone(), position: 0, polled: polled.clone() };
        (Body::new(body), polled)
    }
}

struct AttemptBody {
    recording: Arc<Mutex<Recording>>,
    position: usize,
    polled: Arc<AtomicBool>,
}

impl http_body::Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polled.store(true, Ordering::Release);
        let recording = self.recording.clone();
        let mut recording = recording.lock().expect("replay lock");
        if let Some(frame) = recording.frames.get(self.position).cloned() {
            self.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        let Some(inner) = recording.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !recording.overflowed && recording.bytes + data.len() <= MAX_REPLAY_BYTES {
                        recording.bytes += data.len();
                        recording.frames.push(data.clone());
                        self.position += 1;
                    } else {
                        recording.overflowed = true;
                        recording.frames.clear();
                    }
                } else {
                    // Trailers in a request are not replayed.
                    recording.overflowed = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                recording.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn body_of(chunks: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c)))).collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_later_attempt_sends_the_same_bytes() {
        let replay = Replay::new(body_of(&[b"ab", b"cd"]));
        let (first, first_polled) = replay.attempt();
        let (_unsent, unsent_polled) = replay.attempt();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcd");
        assert!(first_polled.load(Ordering::Acquire));
        assert!(!unsent_polled.load(Ordering::Acquire), "an attempt nobody polled reached no server");
        assert!(replay.replayable());
        let (second, _) = replay.attempt();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn an_attempt_cut_short_is_completed_by_the_next() {
        let replay = Replay::new(body_of(&[b"ab", b"cd"]));
        let (mut first, _) = replay.attempt();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        let (second, _) = replay.attempt();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_not_replayable() {
        static BIG: [u8; MAX_REPLAY_BYTES + 1] = [7; MAX_REPLAY_BYTES + 1];
        let replay = Replay::new(body_of(&[&BIG]));
        let (first, _) = replay.attempt();
        assert_eq!(first.collect().await.unwrap().to_bytes().len(), BIG.len());
        assert!(!replay.replayable());
    }
}
