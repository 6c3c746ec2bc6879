//! Where reservations are kept: the [`ReservationStore`] trait, and its backends
//! [`SqliteStore`] (a file shared by the instances on one host, or memory) and
//! [`PostgresStore`] (one database shared by instances on any hosts).
//!
//! A reservation puts a consignment's containers and weight on a vessel. It starts *held*:
//! room is taken, and it expires unless it is confirmed (see [`crate::reaper`] for what
//! happens then); *confirmed*, it is a booking that never expires. What is reserved on each
//! vessel is kept as a running total beside the reservations, and a reservation is made by
//! one conditional update of that total (`... WHERE containers + n <= capacity AND weight +
//! w <= max_weight`) in the same transaction as its row, so the check and the booking are
//! one step in the database, whichever instance and host asks: a vessel is never booked
//! past its capacity or its max weight.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use vessel_service::{Fleet, store::{Hold, ReservationStore, Reserved, SqliteStore}};
//!
//! let store = SqliteStore::in_memory().unwrap();
//! let fleet = Fleet::default(); // vessel001: 500 containers, 200,000 kg
//! let hold = |n: usize| Hold {
//!     holder: "consignment-service".into(), request_key: None, consignment_id: format!("c-{n}"),
//!     containers: 3, weight: 55_000, ttl: Duration::from_secs(10),
//! };
//! for n in 0..3 {
//!     assert!(matches!(store.reserve(hold(n), fleet.vessels().to_vec()).await.unwrap(), Reserved::Held { .. }));
//! }
//! // A fourth of 55,000 kg would overbook 200,000 kg.
//! assert!(matches!(store.reserve(hold(3), fleet.vessels().to_vec()).await.unwrap(), Reserved::Full { .. }));
//! # }
//! ```

pub mod postgres;
pub mod sqlite;

use std::{collections::HashMap, sync::Arc, time::Duration};

use proto::vessel::Vessel;

pub use self::{postgres::PostgresStore, sqlite::SqliteStore};
pub use shippy_postgres::redacted;

/// The database vessel-service uses when `--db` / `VESSEL_DB` is not given: an SQLite file,
/// relative to the working directory.
pub const DEFAULT_DB: &str = "vessels.db";

/// The `--db` that means "no file: keep reservations in memory, lose them on exit".
pub const IN_MEMORY: &str = ":memory:";

/// The state of a reservation that holds room until confirmed or released.
pub const HELD: &str = "held";
/// The state of a reservation that is a booking for good.
pub const CONFIRMED: &str = "confirmed";

/// The id a consignment booked without a reservation (an event from a consignment-service
/// that does not reserve) is recorded under.
pub fn unreserved_booking_id(consignment_id: &str) -> String {
    format!("booking:{consignment_id}")
}

/// Why reservations could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database was written by a newer version of this service.
    #[error(
        "reservations database schema version {found} is newer than this binary knows ({known}); upgrade vessel-service"
    )]
    SchemaTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this binary can migrate to.
        known: i64,
    },
    /// The database could not be opened, read or written (e.g. locked by another process
    /// beyond the busy timeout, or the server unreachable).
    #[error("reservations database {database}")]
    Database {
        /// The database's path or address (without a password).
        database: String,
        /// What the database said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `--db` that is neither a path nor a usable `postgres://` URL.
    #[error("reservations database {database:?}: {why}")]
    BadAddress {
        /// What was given.
        database: String,
        /// What is wrong with it.
        why: String,
    },
    /// The blocking storage task did not finish (it panicked or the runtime is shutting down).
    #[error("reservations storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Database { database, source } => tonic::Status::unavailable(format!(
                "vessel-service cannot use its reservations database {database}: {}; check that it is \
                 reachable and not locked by another process",
                micro_core::error::error_chain(&*source)
            )),
            StoreError::SchemaTooNew { .. } | StoreError::BadAddress { .. } | StoreError::Task(_) => {
                tracing::error!(error = %micro_core::error::error_chain(&err), "reservations unusable");
                tonic::Status::internal("vessel-service could not use its reservations")
            }
        }
    }
}

/// What is booked or held on a vessel in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Containers booked or held.
    pub containers: i64,
    /// Weight booked or held.
    pub weight: i64,
}

/// A request for room, as [`ReservationStore::reserve`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The service that will store what the room is for (asked to settle an expired hold).
    pub holder: String,
    /// The holder's key for the request: while a hold under it lives, the same key gets it
    /// back. `None`: every request holds anew.
    pub request_key: Option<String>,
    /// The consignment the room is for.
    pub consignment_id: String,
    /// Containers it needs.
    pub containers: i64,
    /// Weight it needs.
    pub weight: i64,
    /// How long the hold lasts unless confirmed.
    pub ttl: Duration,
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its id (`r-` and 16 hex digits; [`unreserved_booking_id`] for a booking made without one).
    pub id: String,
    /// The vessel the room is on.
    pub vessel_id: String,
    /// The consignment it is for.
    pub consignment_id: String,
    /// Containers it takes.
    pub containers: i64,
    /// Weight it takes.
    pub weight: i64,
    /// The service that holds it.
    pub holder: String,
    /// [`HELD`] or [`CONFIRMED`].
    pub state: String,
    /// When a hold expires, in milliseconds since the Unix epoch; `None` once confirmed.
    pub expires_at_ms: Option<i64>,
}

impl Reservation {
    /// Whether it is confirmed (a booking for good).
    pub fn is_confirmed(&self) -> bool {
        self.state == CONFIRMED
    }
}

/// The outcome of [`ReservationStore::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Room is held (or was already, under the same holder and request key: `fresh` false).
    Held {
        /// The reservation.
        reservation: Reservation,
        /// False when an earlier request with the same key made it.
        fresh: bool,
        /// The vessel's total load with it.
        vessel_load: Load,
    },
    /// No candidate vessel has the room: what each of them has booked or held.
    Full {
        /// Each candidate's id and load, in the order given.
        loads: Vec<(String, Load)>,
    },
}

/// The outcome of [`ReservationStore::confirm`] and [`ReservationStore::book`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booked {
    /// The booking.
    pub reservation: Reservation,
    /// False when it was confirmed (or booked) already and nothing changed.
    pub fresh: bool,
    /// The vessel's total load.
    pub vessel_load: Load,
}

/// The outcome of [`ReservationStore::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// The hold is gone and its room is free again.
    Released(Reservation),
    /// It is confirmed: kept.
    Confirmed(Reservation),
    /// No such reservation (released before, or never made).
    Unknown,
}

/// A hold past its expiry, for the reaper to settle with its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The reservation's id.
    pub id: String,
    /// The service that holds it.
    pub holder: String,
    /// The consignment it was for.
    pub consignment_id: String,
}

/// Where reservations are kept. Every method is one transaction.
#[tonic::async_trait]
pub trait ReservationStore: Send + Sync + std::fmt::Debug + 'static {
    /// The database, for logs and errors: a path, `:memory:`, or a URL without its password.
    fn database(&self) -> &str;

    /// The schema version the database is at.
    async fn schema_version(&self) -> Result<i64, StoreError>;

    /// Holds room for `hold` on the first of `candidates` (in order) whose capacity and max
    /// weight still fit it; or, when a hold with the same holder and request key lives,
    /// returns that one. Atomic: two requests never both take the last room.
    async fn reserve(&self, hold: Hold, candidates: Vec<Vessel>) -> Result<Reserved, StoreError>;

    /// Makes the reservation `id` a booking for good. `None` when there is no such
    /// reservation.
    async fn confirm(&self, id: &str) -> Result<Option<Booked>, StoreError>;

    /// Gives the room of the hold `id` back; a confirmed reservation is kept.
    async fn release(&self, id: &str) -> Result<Released, StoreError>;

    /// Books `consignment_id` on `vessel_id` without a reservation and without a capacity
    /// check (the consignment is stored already), once: under [`unreserved_booking_id`],
    /// so a second call books nothing (`fresh` false).
    async fn book(
        &self,
        consignment_id: &str,
        vessel_id: &str,
        containers: i64,
        weight: i64,
    ) -> Result<Booked, StoreError>;

    /// Up to `limit` holds past their expiry, oldest first.
    async fn expired(&self, limit: usize) -> Result<Vec<Expired>, StoreError>;

    /// What is booked or held on each vessel that has anything.
    async fn loads(&self) -> Result<Arc<HashMap<String, Load>>, StoreError>;

    /// The reservation `id`, if any.
    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError>;

    /// Every reservation for `consignment_id`.
    async fn reservations_for(&self, consignment_id: &str) -> Result<Vec<Reservation>, StoreError>;
}

/// Opens the store `database` names: a `postgres://` (or `postgresql://`) URL, `:memory:`,
/// or the path of an SQLite file (created if missing); the schema is created or migrated.
pub async fn open(database: &str) -> Result<Arc<dyn ReservationStore>, StoreError> {
    if shippy_postgres::is_postgres(database) {
        return Ok(Arc::new(PostgresStore::connect(database).await?));
    }
    let path = database.to_owned();
    let store =
        tokio::task::spawn_blocking(move || SqliteStore::open(&path)).await.map_err(StoreError::Task)??;
    Ok(Arc::new(store))
}

/// This process as a reservation records it: `host:pid`.
pub(crate) fn this_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A new reservation id: `r-` and 16 random hex digits.
pub(crate) fn new_reservation_id() -> String {
    format!("r-{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests;
