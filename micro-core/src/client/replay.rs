//! A request body that can be sent again. Before the first attempt, whatever the body has
//! ready is read ahead: a unary gRPC request is then held whole, and each attempt sends it
//! as one DATA frame that ends the stream. A body that is not ready at once (a client stream)
//! is recorded as attempts pass its frames to the transport, up to a cap, so a retry replays
//! them. Either way an attempt tells whether it was ever polled: a body never polled cannot
//! have reached a server.

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tonic::body::Body;

use crate::BoxError;

/// The most request bytes kept for replay; a larger request is sent once.
pub const MAX_REPLAY_BYTES: usize = 256 * 1024;

/// The original body and what has been read of it.
pub(crate) enum Replay {
    /// The whole body, read ahead.
    Whole(Bytes),
    /// A body still being read, shared by the attempts.
    Recorded(Arc<Mutex<Recording>>),
}

pub(crate) struct Recording {
    inner: Option<Body>,
    frames: Vec<Bytes>,
    bytes: usize,
    /// A frame read ahead that is not kept for replay (over the cap, trailers or an error):
    /// the first attempt that gets this far sends it, and no attempt can follow.
    held: Option<Result<Frame<Bytes>, BoxError>>,
    overflowed: bool,
}

impl Replay {
    /// Reads ahead whatever `body` has ready, without waiting for more.
    pub(crate) async fn new(mut body: Body) -> Self {
        let (mut frames, mut bytes) = (Vec::new(), 0);
        let held = loop {
            let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            match next {
                Poll::Ready(None) => return Replay::Whole(concatenate(frames, bytes)),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if bytes + data.len() <= MAX_REPLAY_BYTES => {
                        bytes += data.len();
                        frames.push(data);
                    }
                    Ok(data) => break Some(Ok(Frame::data(data))),
                    Err(trailers) => break Some(Ok(trailers)),
                },
                Poll::Ready(Some(Err(err))) => break Some(Err(err.into())),
                Poll::Pending => break None,
            }
        };
        let recording = Recording { inner: Some(body), frames, bytes, held, overflowed: false };
        Replay::Recorded(Arc::new(Mutex::new(recording)))
    }

    /// Whether the whole body was read ahead, so attempts may run side by side.
    pub(crate) fn is_whole(&self) -> bool {
        matches!(self, Replay::Whole(_))
    }

    /// Whether a new attempt would send the whole request.
    pub(crate) fn replayable(&self) -> bool {
        match self {
            Replay::Whole(_) => true,
            Replay::Recorded(recording) => !recording.lock().expect("replay lock").overflowed,
        }
    }

    /// The body of a new attempt and a flag that turns true once the transport polls it.
    pub(crate) fn attempt(&self) -> (Body, Arc<AtomicBool>) {
        let polled = Arc::new(AtomicBool::new(false));
        let body = match self {
            Replay::Whole(data) => {
                Body::new(WholeBody { data: Some(data.clone()), polled: polled.clone(), started: false })
            }
            Replay::Recorded(recording) => {
                let recording = recording.clone();
                Body::new(RecordedBody { recording, position: 0, past_record: false, polled: polled.clone() })
            }
        };
        (body, polled)
    }
}

fn concatenate(mut frames: Vec<Bytes>, bytes: usize) -> Bytes {
    if frames.len() == 1 {
        return frames.pop().expect("one frame");
    }
    let mut whole = BytesMut::with_capacity(bytes);
    frames.iter().for_each(|frame| whole.extend_from_slice(frame));
    whole.freeze()
}

/// One attempt's copy of a body read whole: one frame, which ends the stream.
struct WholeBody {
    data: Option<Bytes>,
    polled: Arc<AtomicBool>,
    started: bool,
}

impl http_body::Body for WholeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polled.store(true, Ordering::Release);
        self.started = true;
        Poll::Ready(self.data.take().filter(|data| !data.is_empty()).map(|data| Ok(Frame::data(data))))
    }

    /// True once the data is out, so the transport ends the stream with that frame rather
    /// than with an empty one after it. Before the first poll, false: the flag must see the
    /// body polled.
    fn is_end_stream(&self) -> bool {
        self.started && self.data.is_none()
    }
}

/// One attempt's reader of a body being recorded.
struct RecordedBody {
    recording: Arc<Mutex<Recording>>,
    position: usize,
    /// This attempt sent a frame that was not kept, so it reads on from the original body
    /// alone.
    past_record: bool,
    polled: Arc<AtomicBool>,
}

impl http_body::Body for RecordedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polled.store(true, Ordering::Release);
        let recording = self.recording.clone();
        let mut recording = recording.lock().expect("replay lock");
        if !self.past_record {
            if let Some(frame) = recording.frames.get(self.position).cloned() {
                self.position += 1;
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if let Some(held) = recording.held.take() {
                recording.overflowed = true;
                self.past_record = true;
                return Poll::Ready(Some(held));
            }
        }
        if recording.overflowed && !self.past_record {
            // Another attempt went past what was kept; this one cannot be completed.
            return Poll::Ready(Some(Err("request body already sent and too large to replay".into())));
        }
        let Some(inner) = recording.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !recording.overflowed
                    && recording.bytes + data.len() <= MAX_REPLAY_BYTES
                {
                    recording.bytes += data.len();
                    recording.frames.push(data.clone());
                    self.position += 1;
                } else {
                    // Over the cap, or trailers: sent once, never replayed.
                    recording.overflowed = true;
                    self.past_record = true;
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
    use futures::channel::mpsc;
    use http_body_util::BodyExt;

    use super::*;

    type Sender = mpsc::UnboundedSender<Result<Frame<Bytes>, std::convert::Infallible>>;

    fn ready_body(chunks: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c)))).collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    /// A body whose frames arrive when the test sends them, as a client stream's do.
    fn streamed_body() -> (Body, Sender) {
        let (sender, frames) = mpsc::unbounded();
        (Body::new(http_body_util::StreamBody::new(frames)), sender)
    }

    fn send(sender: &Sender, chunk: &'static [u8]) {
        sender.unbounded_send(Ok(Frame::data(Bytes::from_static(chunk)))).unwrap();
    }

    #[tokio::test]
    async fn a_ready_body_is_read_whole_and_each_attempt_sends_it_in_one_final_frame() {
        let replay = Replay::new(ready_body(&[b"ab", b"cd"])).await;
        assert!(matches!(replay, Replay::Whole(_)));
        let (mut first, first_polled) = replay.attempt();
        let (_unsent, unsent_polled) = replay.attempt();
        assert!(!first.is_end_stream(), "an unpolled attempt has not ended");
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abcd");
        assert!(first.is_end_stream(), "the data frame ends the stream");
        assert!(first_polled.load(Ordering::Acquire));
        assert!(!unsent_polled.load(Ordering::Acquire), "an attempt nobody polled reached no server");
        assert!(replay.replayable());
        let (second, _) = replay.attempt();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_streamed_attempt_cut_short_is_completed_by_the_next() {
        let (body, sender) = streamed_body();
        send(&sender, b"ab");
        let replay = Replay::new(body).await;
        assert!(matches!(replay, Replay::Recorded(_)));
        let (mut first, _) = replay.attempt();
        assert_eq!(first.frame().await.unwrap().unwrap().into_data().unwrap(), "ab");
        send(&sender, b"cd");
        assert_eq!(first.frame().await.unwrap().unwrap().into_data().unwrap(), "cd");
        drop(first);
        send(&sender, b"ef");
        drop(sender);
        let (second, _) = replay.attempt();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
        assert!(replay.replayable());
    }

    static BIG: [u8; MAX_REPLAY_BYTES + 1] = [7; MAX_REPLAY_BYTES + 1];

    #[tokio::test]
    async fn a_ready_body_over_the_cap_is_sent_once() {
        let replay = Replay::new(ready_body(&[b"ab", &BIG])).await;
        let (first, _) = replay.attempt();
        assert_eq!(first.collect().await.unwrap().to_bytes().len(), 2 + BIG.len());
        assert!(!replay.replayable());
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_cap_is_sent_once() {
        let (body, sender) = streamed_body();
        let replay = Replay::new(body).await;
        let (first, _) = replay.attempt();
        send(&sender, b"ab");
        send(&sender, &BIG);
        send(&sender, b"cd");
        drop(sender);
        assert_eq!(first.collect().await.unwrap().to_bytes().len(), 4 + BIG.len());
        assert!(!replay.replayable());
        let (second, _) = replay.attempt();
        assert!(second.collect().await.is_err(), "a later attempt cannot send what was not kept");
    }
}
