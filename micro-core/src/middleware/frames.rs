//! Counting a stream's gRPC messages as its bytes pass: each message is a 5-byte prefix
//! (a flag and a big-endian length) and that many bytes, in frames cut anywhere.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use prometheus_client::metrics::counter::Counter;
use tonic::{Status, body::Body};

/// Where a body's bytes stand in its gRPC messages.
#[derive(Debug, Default)]
pub(crate) struct MessageFrames {
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl MessageFrames {
    /// Takes `data`, the next bytes of the body; returns how many messages it completed.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut complete = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                data = &data[take..];
                complete += u64::from(self.remaining == 0);
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
                complete += u64::from(self.remaining == 0);
            }
        }
        complete
    }
}

/// A body that counts the messages passing through it in `counter`.
pub(crate) struct CountedBody {
    inner: Body,
    frames: MessageFrames,
    counter: Counter,
}

impl CountedBody {
    pub(crate) fn new(inner: Body, counter: Counter) -> Self {
        CountedBody { inner, frames: MessageFrames::default(), counter }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let complete = self.frames.feed(data);
            if complete > 0 {
                self.counter.inc_by(complete);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    #[test]
    fn messages_are_counted_however_the_bytes_are_cut() {
        let stream: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        for cut in [1, 2, 4, 5, 6, 7, 64, stream.len()] {
            let mut frames = MessageFrames::default();
            let counted: u64 = stream.chunks(cut).map(|chunk| frames.feed(chunk)).sum();
            assert_eq!(counted, 4, "cut every {cut} bytes");
        }
        let mut frames = MessageFrames::default();
        assert_eq!(frames.feed(&message(10)[..8]), 0, "a message is counted once whole");
    }
}
