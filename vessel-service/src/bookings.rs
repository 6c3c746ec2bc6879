//! Where bookings are kept: [`BookingStore`], an SQLite file (durable, shareable by several
//! vessel-service processes on one host) or memory (tests).
//!
//! A booking puts a consignment's containers and weight on a vessel. It is keyed by the
//! consignment id (the `consignment.created` event's message id), so a redelivered or
//! duplicated event books nothing twice. Every read asks the database whether anything was
//! committed since the last one (SQLite's `data_version`, by this or another process) and
//! reads the loads again only then, so instances that share the file agree on what is booked
//! and `FindAvailable` stays cheap.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use vessel_service::bookings::{Booking, BookingStore};
//!
//! let store = BookingStore::in_memory().unwrap();
//! let booking = Booking { consignment_id: "c-1".into(), vessel_id: "vessel001".into(), containers: 3, weight: 55_000 };
//! assert!(store.book(booking.clone()).await.unwrap().fresh);
//! let again = store.book(booking).await.unwrap();
//! assert!(!again.fresh);
//! assert_eq!((again.vessel_load.containers, again.vessel_load.weight), (3, 55_000));
//! # }
//! ```

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The database file vessel-service uses when `--db` / `VESSEL_DB` is not given, relative
/// to the working directory.
pub const DEFAULT_DB: &str = "vessels.db";

/// The path that means "no file: keep bookings in memory, lose them on exit".
pub const IN_MEMORY: &str = ":memory:";

/// How long a write waits for another connection's (or process's) lock on the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one step per version. Step `i` takes the database from `user_version` `i` to
/// `i + 1`; a step is never edited once released, only new steps are appended.
const MIGRATIONS: &[&str] = &[
    // 1: one booking per consignment, with the instance that booked it and when.
    "CREATE TABLE bookings (
         consignment_id TEXT    PRIMARY KEY,
         vessel_id      TEXT    NOT NULL,
         containers     INTEGER NOT NULL,
         weight         INTEGER NOT NULL,
         booked_by      TEXT    NOT NULL,
         booked_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
     );
     CREATE INDEX bookings_by_vessel ON bookings(vessel_id);",
];

/// Why the bookings could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BookingError {
    /// The database file was written by a newer version of this service.
    #[error(
        "bookings database schema version {found} is newer than this binary knows ({known}); upgrade vessel-service"
    )]
    SchemaTooNew {
        /// The version found in the file.
        found: i64,
        /// The newest version this binary can migrate to.
        known: i64,
    },
    /// The database could not be opened, read or written (e.g. locked by another process
    /// beyond the busy timeout).
    #[error("bookings database {path}")]
    Database {
        /// The database's path, or `:memory:`.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The blocking storage task did not finish (it panicked or the runtime is shutting down).
    #[error("bookings storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl From<BookingError> for tonic::Status {
    fn from(err: BookingError) -> Self {
        match err {
            BookingError::Database { path, source } => tonic::Status::unavailable(format!(
                "vessel-service cannot read its bookings database {path}: {source}; check the file and \
                 whether another process holds its lock"
            )),
            BookingError::SchemaTooNew { .. } | BookingError::Task(_) => {
                tracing::error!(error = %micro_core::error::error_chain(&err), "bookings unreadable");
                tonic::Status::internal("vessel-service could not read its bookings")
            }
        }
    }
}

/// One consignment's load on one vessel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// The consignment's id, the booking's key.
    pub consignment_id: String,
    /// The vessel it travels on.
    pub vessel_id: String,
    /// How many containers it takes.
    pub containers: i64,
    /// How much it weighs.
    pub weight: i64,
}

/// What is booked on a vessel in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Containers booked.
    pub containers: i64,
    /// Weight booked.
    pub weight: i64,
}

/// The outcome of [`BookingStore::book`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booked {
    /// False when the consignment was booked already (nothing new was written).
    pub fresh: bool,
    /// The vessel the consignment is booked on: the new booking's, or the first one's.
    pub vessel_id: String,
    /// That vessel's total load after this booking.
    pub vessel_load: Load,
}

/// Loads as read at a `data_version` of the connection.
type LoadsRead = (i64, Arc<HashMap<String, Load>>);

/// Bookings in an SQLite database: a file in WAL mode with `synchronous=FULL` and a busy
/// timeout (so processes on one host can share it), or memory for tests.
#[derive(Debug, Clone)]
pub struct BookingStore {
    connection: Arc<Mutex<Connection>>,
    /// The loads last read and the connection's `data_version` then; cleared by this
    /// store's own bookings (which do not change its `data_version`). Only read or written
    /// while holding `connection`, so it never lags a commit.
    loads: Arc<Mutex<Option<LoadsRead>>>,
    path: String,
    instance: String,
}

/// This process as a booking records it: `host:pid`.
fn this_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

impl BookingStore {
    /// Opens (or creates) the database at `path` and runs the migrations it lacks; the path
    /// `:memory:` ([`IN_MEMORY`]) keeps everything in memory instead. Blocking: call it from
    /// `spawn_blocking` in async code.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BookingError> {
        let path = path.as_ref();
        if path == Path::new(IN_MEMORY) {
            return Self::in_memory();
        }
        let shown = path.display().to_string();
        let db = |source| BookingError::Database { path: shown.clone(), source };
        let connection = Connection::open(path).map_err(db)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // WAL: readers never block the writer, so instances sharing the file read while
        // another books. FULL: a booking acknowledged to the broker survives a crash.
        let mode: String =
            connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(db)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %shown, journal_mode = %mode, "the bookings database is not in WAL mode");
        }
        connection.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        Self::ready(connection, shown)
    }

    /// A database in this process's memory; everything is lost when it is dropped.
    pub fn in_memory() -> Result<Self, BookingError> {
        let connection = Connection::open_in_memory()
            .map_err(|source| BookingError::Database { path: IN_MEMORY.to_owned(), source })?;
        Self::ready(connection, IN_MEMORY.to_owned())
    }

    fn ready(mut connection: Connection, path: String) -> Result<Self, BookingError> {
        migrate(&mut connection, &path)?;
        Ok(BookingStore {
            connection: Arc::new(Mutex::new(connection)),
            loads: Arc::new(Mutex::new(None)),
            path,
            instance: this_instance(),
        })
    }

    /// Names the instance new bookings are recorded as made by. Default: `host:pid`.
    pub fn instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// The database's path, or `:memory:`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, BookingError> {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        user_version(&connection).map_err(|source| BookingError::Database { path: self.path.clone(), source })
    }

    /// Books `booking` unless its consignment is booked already, and returns the vessel's
    /// load after it. The check and the write are one transaction holding the write lock,
    /// so two instances racing on one event book it once. Overbooking is not refused here:
    /// the consignment is stored already, so the caller warns instead.
    pub async fn book(&self, booking: Booking) -> Result<Booked, BookingError> {
        let instance = self.instance.clone();
        let cached = self.loads.clone();
        self.with_connection(move |connection, db| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let inserted = transaction
                .execute(
                    "INSERT INTO bookings (consignment_id, vessel_id, containers, weight, booked_by)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (consignment_id) DO NOTHING",
                    params![
                        booking.consignment_id,
                        booking.vessel_id,
                        booking.containers,
                        booking.weight,
                        instance
                    ],
                )
                .map_err(db)?;
            let vessel_id = if inserted == 1 {
                booking.vessel_id
            } else {
                transaction
                    .query_row(
                        "SELECT vessel_id FROM bookings WHERE consignment_id = ?1",
                        [&booking.consignment_id],
                        |row| row.get(0),
                    )
                    .map_err(db)?
            };
            let vessel_load = load_of(&transaction, &vessel_id).map_err(db)?;
            transaction.commit().map_err(db)?;
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
            Ok(Booked { fresh: inserted == 1, vessel_id, vessel_load })
        })
        .await
    }

    /// The booking of `consignment_id`, if any.
    pub async fn booking(&self, consignment_id: &str) -> Result<Option<Booking>, BookingError> {
        let consignment_id = consignment_id.to_owned();
        self.with_connection(move |connection, db| {
            connection
                .query_row(
                    "SELECT consignment_id, vessel_id, containers, weight FROM bookings WHERE consignment_id = ?1",
                    [&consignment_id],
                    |row| {
                        Ok(Booking {
                            consignment_id: row.get(0)?,
                            vessel_id: row.get(1)?,
                            containers: row.get(2)?,
                            weight: row.get(3)?,
                        })
                    },
                )
                .optional()
                .map_err(db)
        })
        .await
    }

    /// The total load booked on each vessel that has bookings: the loads read last when
    /// nothing was committed since (a check of microseconds, made at once when the
    /// connection is free), else read again from the database.
    pub async fn loads(&self) -> Result<Arc<HashMap<String, Load>>, BookingError> {
        if let Ok(connection) = self.connection.try_lock()
            && let Ok(version) = data_version(&connection)
            && let Some((read_at, loads)) = &*self.loads.lock().unwrap_or_else(|e| e.into_inner())
            && *read_at == version
        {
            return Ok(loads.clone());
        }
        let cached = self.loads.clone();
        self.with_connection(move |connection, db| {
            let version = data_version(connection).map_err(db)?;
            // Another call may hold the connection for its own check: nothing new, no query.
            if let Some((read_at, loads)) = &*cached.lock().unwrap_or_else(|e| e.into_inner())
                && *read_at == version
            {
                return Ok(loads.clone());
            }
            let mut statement = connection
                .prepare_cached(
                    "SELECT vessel_id, sum(containers), sum(weight) FROM bookings GROUP BY vessel_id",
                )
                .map_err(db)?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, Load { containers: row.get(1)?, weight: row.get(2)? })))
                .map_err(db)?;
            let loads = Arc::new(rows.collect::<rusqlite::Result<HashMap<_, _>>>().map_err(db)?);
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, loads.clone()));
            Ok(loads)
        })
        .await
    }

    /// Runs `work` on the connection in a blocking task; `work` gets a function that wraps
    /// SQLite's errors with the database's path.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, &dyn Fn(rusqlite::Error) -> BookingError) -> Result<T, BookingError>
        + Send
        + 'static,
    ) -> Result<T, BookingError> {
        let connection = self.connection.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
            let db = |source| BookingError::Database { path: path.clone(), source };
            work(&mut connection, &db)
        })
        .await
        .map_err(BookingError::Task)?
    }
}

fn load_of(connection: &Connection, vessel_id: &str) -> rusqlite::Result<Load> {
    connection.query_row(
        "SELECT coalesce(sum(containers), 0), coalesce(sum(weight), 0) FROM bookings WHERE vessel_id = ?1",
        [vessel_id],
        |row| Ok(Load { containers: row.get(0)?, weight: row.get(1)? }),
    )
}

/// A number that changes whenever another connection commits to the database.
fn data_version(connection: &Connection) -> rusqlite::Result<i64> {
    // Cached: every FindAvailable asks it, and parsing it each time showed in profiles.
    connection.prepare_cached("PRAGMA data_version")?.query_row([], |row| row.get(0))
}

fn user_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Brings the schema to the newest version, each step in its own transaction together with
/// its new `user_version`, so a crash mid-migration leaves the previous version whole.
fn migrate(connection: &mut Connection, path: &str) -> Result<(), BookingError> {
    let db = |source| BookingError::Database { path: path.to_owned(), source };
    let known = MIGRATIONS.len() as i64;
    let found = user_version(connection).map_err(db)?;
    if found > known {
        return Err(BookingError::SchemaTooNew { found, known });
    }
    for (version, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let next = version as i64 + 1;
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        // Another process may have migrated between our read and our lock.
        if user_version(&transaction).map_err(db)? >= next {
            continue;
        }
        transaction.execute_batch(step).map_err(db)?;
        transaction.pragma_update(None, "user_version", next).map_err(db)?;
        transaction.commit().map_err(db)?;
        tracing::info!(%path, version = next, "bookings database migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
