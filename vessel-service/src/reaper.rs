//! The reaper: settles each hold that outlived its time with the service that made it.
//!
//! A hold is made before its consignment is stored, and confirmed after (by the
//! `consignment.created` event, or by the holder). When it expires unconfirmed, the holder
//! may have crashed before storing, or stored it and the confirmation is late. Releasing it
//! blindly could free room a stored consignment uses, so the reaper asks the holder
//! ([`Settler`]): the holder answers whether it stored a consignment under the hold, and if
//! not, records it as abandoned so nothing is ever stored under it later. Stored: the hold
//! is confirmed. Abandoned: it is released. No answer (the holder unreachable): it stays
//! held and is asked about again at the next round, so room is never given away while a
//! consignment might use it.
//!
//! Every instance runs a reaper; two settling one hold agree, since the holder's answer is
//! final and confirming or releasing twice changes nothing.
//!
//! # Examples
//! ```no_run
//! # fn demo(store: std::sync::Arc<dyn vessel_service::store::ReservationStore>, client: micro_core::Client) {
//! use std::{sync::Arc, time::Duration};
//! use vessel_service::reaper::{Reaper, ShippingSettler};
//! let reaper = Reaper::start(store, Arc::new(ShippingSettler::new(client)), Duration::from_secs(2));
//! drop(reaper); // stops it
//! # }
//! ```

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use micro_core::{Client, NamedChannel};
use proto::consignment::{SettleRequest, shipping_service_client::ShippingServiceClient};
use tonic::Status;

use crate::store::{Released, ReservationStore};

/// Holds settled per round at most.
const BATCH: usize = 100;
/// Holders whose channels are kept between rounds at most; more, and they are dropped.
const MAX_HOLDERS: usize = 32;
/// How long one settle call may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How the holder of a hold answers for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// A consignment (this id) is stored under the hold: confirm it.
    Stored(String),
    /// Nothing is or ever will be stored under it: release it.
    Abandoned,
}

/// Asks the service that made a hold whether it stored what the hold was for.
#[tonic::async_trait]
pub trait Settler: Send + Sync + 'static {
    /// The holder `holder`'s final answer for reservation `reservation_id`.
    async fn settle(&self, holder: &str, reservation_id: &str) -> Result<Settlement, Status>;
}

/// A [`Settler`] that calls `consignment.ShippingService/SettleReservation` on the holder,
/// found by its registered name.
pub struct ShippingSettler {
    client: Client,
    channels: Mutex<HashMap<String, ShippingServiceClient<NamedChannel>>>,
}

impl ShippingSettler {
    /// Settles through `client`.
    pub fn new(client: Client) -> Self {
        ShippingSettler { client, channels: Mutex::new(HashMap::new()) }
    }

    fn channel(&self, holder: &str) -> ShippingServiceClient<NamedChannel> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(holder) {
            return channel.clone();
        }
        if channels.len() >= MAX_HOLDERS {
            channels.clear();
        }
        let channel = ShippingServiceClient::new(self.client.channel(holder));
        channels.insert(holder.to_owned(), channel.clone());
        channel
    }
}

#[tonic::async_trait]
impl Settler for ShippingSettler {
    async fn settle(&self, holder: &str, reservation_id: &str) -> Result<Settlement, Status> {
        let mut request = tonic::Request::new(SettleRequest { reservation_id: reservation_id.to_owned() });
        request.set_timeout(SETTLE_TIMEOUT);
        let settled = self.channel(holder).settle_reservation(request).await?.into_inner();
        Ok(match settled.stored {
            true => Settlement::Stored(settled.consignment_id),
            false => Settlement::Abandoned,
        })
    }
}

/// The running reaper; dropping it stops it.
pub struct Reaper {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reaper {
    /// Settles `store`'s expired holds through `settler` every `interval`.
    pub fn start(store: Arc<dyn ReservationStore>, settler: Arc<dyn Settler>, interval: Duration) -> Reaper {
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                // A full batch: more may wait, so the next round starts at once.
                while reap(&*store, &*settler).await == BATCH {}
            }
        });
        Reaper { task }
    }
}

/// One round: settles up to [`BATCH`] expired holds, and returns how many it settled. A
/// holder that fails to answer is warned about once per round and not asked again in it.
pub async fn reap(store: &dyn ReservationStore, settler: &dyn Settler) -> usize {
    let expired = match store.expired(BATCH).await {
        Ok(expired) => expired,
        Err(err) => {
            tracing::warn!(database = %store.database(), error = %micro_core::error::error_chain(&err), "cannot read expired holds");
            return 0;
        }
    };
    let mut unreachable = HashSet::new();
    let mut settled_holds = 0;
    for hold in expired {
        if unreachable.contains(&hold.holder) {
            continue;
        }
        let settled = match settler.settle(&hold.holder, &hold.id).await {
            Ok(settled) => settled,
            Err(status) => {
                tracing::warn!(
                    holder = %hold.holder,
                    reservation = %hold.id,
                    consignment = %hold.consignment_id,
                    code = ?status.code(),
                    error = %status.message(),
                    "expired hold kept: its holder did not settle it (is it running and registered?); asking again later"
                );
                unreachable.insert(hold.holder);
                continue;
            }
        };
        let outcome = match &settled {
            Settlement::Stored(_) => store.confirm(&hold.id).await.map(|_| "confirmed"),
            Settlement::Abandoned => store.release(&hold.id).await.map(|released| match released {
                Released::Released(_) => "released",
                Released::Confirmed(_) => "confirmed already",
                Released::Unknown => "gone already",
            }),
        };
        settled_holds += usize::from(outcome.is_ok());
        match outcome {
            Ok(outcome) => tracing::info!(
                reservation = %hold.id,
                consignment = %hold.consignment_id,
                holder = %hold.holder,
                settlement = ?settled,
                outcome,
                "expired hold settled"
            ),
            Err(err) => tracing::warn!(
                reservation = %hold.id,
                error = %micro_core::error::error_chain(&err),
                "expired hold settled by its holder but not recorded; trying again next round"
            ),
        }
    }
    settled_holds
}
