//! The connections to one instance: one at first, another (up to
//! `MICRO_CLIENT_CONNECTIONS`) whenever every open one already carries
//! [`GROW_AT_IN_FLIGHT`] attempts, and each attempt on the one with the fewest. Many
//! callers then share several HTTP/2 connections instead of queueing on one connection's
//! locks and its single I/O task; a lone caller never opens a second. Connections stay
//! open while the instance is known: an idle HTTP/2 connection costs a socket and is never
//! pinged (see `connect.rs`).

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use tonic::transport::Channel;

use super::connect::connect_lazily;
use crate::{BoxError, config::ClientConfig, registry::Node};

/// Attempts in flight on every open connection at which the next one opens.
pub(crate) const GROW_AT_IN_FLIGHT: usize = 8;

/// The connections of one instance; see the module docs.
pub(crate) struct Connections {
    slots: Box<[Slot]>,
    /// Slots `0..opened` have been handed a connection (or are being).
    opened: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    channel: OnceLock<Channel>,
    in_flight: AtomicUsize,
}

impl Connections {
    /// The first connection to `node`, lazily connected; room for `config.connections`.
    pub(crate) fn new(node: &Node, config: &ClientConfig) -> Result<Self, BoxError> {
        let slots: Box<[Slot]> = (0..config.connections.max(1)).map(|_| Slot::default()).collect();
        let _ = slots[0].channel.set(connect_lazily(node, config)?);
        Ok(Connections { slots, opened: AtomicUsize::new(1) })
    }

    /// How many connections have been opened so far.
    pub(crate) fn opened(&self) -> usize {
        self.opened.load(Ordering::Acquire)
    }

    /// The connection for the next attempt, held until the [`Busy`] is dropped: the one
    /// with the fewest attempts in flight, or a new one when that one has too many.
    pub(crate) fn pick(self: &Arc<Self>, node: &Node, config: &ClientConfig) -> (Channel, Busy) {
        let opened = self.opened().min(self.slots.len());
        let (mut index, least) = (0..opened)
            .map(|i| (i, self.slots[i].in_flight.load(Ordering::Relaxed)))
            .min_by_key(|&(_, in_flight)| in_flight)
            .unwrap_or((0, 0));
        if least >= GROW_AT_IN_FLIGHT {
            let grown = self.opened.fetch_update(Ordering::AcqRel, Ordering::Acquire, |opened| {
                (opened < self.slots.len()).then_some(opened + 1)
            });
            if let Ok(next) = grown {
                index = next;
            }
        }
        let channel = self.channel(index, node, config);
        self.slots[index].in_flight.fetch_add(1, Ordering::Relaxed);
        (channel, Busy { connections: self.clone(), index })
    }

    /// The connection in slot `index`, made now if it is the first call for it.
    fn channel(&self, index: usize, node: &Node, config: &ClientConfig) -> Channel {
        let made = self.slots[index].channel.get_or_init(|| match connect_lazily(node, config) {
            Ok(channel) => {
                tracing::debug!(service = %node.name, node = %node.id, connections = index + 1, "another connection to a busy instance");
                channel
            }
            Err(err) => {
                // The first connection was made with the same address and settings, so
                // this is rare (TLS material unreadable since): share the first one.
                tracing::warn!(service = %node.name, node = %node.id, error = %err, "could not open another connection; sharing the first");
                self.slots[0].channel.get().expect("the first connection").clone()
            }
        });
        made.clone()
    }
}

/// One attempt on one connection of a [`Connections`], counted until it is dropped.
pub(crate) struct Busy {
    connections: Arc<Connections>,
    index: usize,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.connections.slots[self.index].in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
