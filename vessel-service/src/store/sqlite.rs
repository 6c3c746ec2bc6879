//! [`SqliteStore`]: reservations in an SQLite file (WAL, `synchronous=FULL`, a busy timeout,
//! so the instances on one host may share it) or in memory.
//!
//! Every write is an `IMMEDIATE` transaction: it takes the file's write lock first, so the
//! capacity check and the booking are one step for every process on the file. Every read
//! asks whether anything was committed since the last one (`data_version`) and reads the
//! loads again only then, so `FindAvailable` stays cheap.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use vessel_service::store::{ReservationStore, SqliteStore};
//!
//! let store = SqliteStore::in_memory().unwrap();
//! let booked = store.book("c-1", "vessel001", 3, 55_000).await.unwrap();
//! assert!(booked.fresh);
//! assert!(!store.book("c-1", "vessel001", 3, 55_000).await.unwrap().fresh);
//! assert_eq!(store.loads().await.unwrap()["vessel001"].weight, 55_000);
//! # }
//! ```

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proto::vessel::Vessel;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    Booked, CONFIRMED, Expired, HELD, Hold, IN_MEMORY, Load, Released, Reservation, ReservationStore,
    Reserved, StoreError, new_reservation_id, this_instance, unreserved_booking_id,
};

/// How long a write waits for another connection's (or process's) lock on the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one step per version. Step `i` takes the database from `user_version` `i` to
/// `i + 1`; a step is never edited once released, only new steps are appended.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // 2: reservations (held until confirmed, or booked for good) and each vessel's running
    // total; the bookings so far become confirmed reservations.
    "CREATE TABLE reservations (
         id             TEXT    PRIMARY KEY,
         vessel_id      TEXT    NOT NULL,
         consignment_id TEXT    NOT NULL,
         containers     INTEGER NOT NULL,
         weight         INTEGER NOT NULL,
         holder         TEXT    NOT NULL,
         request_key    TEXT,
         state          TEXT    NOT NULL CHECK (state IN ('held', 'confirmed')),
         expires_at_ms  INTEGER,
         made_by        TEXT    NOT NULL,
         made_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
     );
     CREATE UNIQUE INDEX reservations_by_request ON reservations(holder, request_key);
     CREATE INDEX reservations_by_consignment ON reservations(consignment_id);
     CREATE INDEX reservations_expiring ON reservations(expires_at_ms) WHERE state = 'held';
     CREATE TABLE vessel_loads (
         vessel_id  TEXT    PRIMARY KEY,
         containers INTEGER NOT NULL,
         weight     INTEGER NOT NULL
     );
     INSERT INTO reservations (id, vessel_id, consignment_id, containers, weight, holder, state, made_by, made_at)
         SELECT 'booking:' || consignment_id, vessel_id, consignment_id, containers, weight, '', 'confirmed',
                booked_by, booked_at FROM bookings;
     INSERT INTO vessel_loads SELECT vessel_id, sum(containers), sum(weight) FROM bookings GROUP BY vessel_id;
     DROP TABLE bookings;",
];

const SELECT_RESERVATION: &str = "SELECT id, vessel_id, consignment_id, containers, weight, holder, state, expires_at_ms FROM reservations";

/// Loads as read at a `data_version` of the connection.
type LoadsRead = (i64, Arc<HashMap<String, Load>>);

/// Reservations in an SQLite database; see the module docs.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    /// The loads last read and the connection's `data_version` then; cleared by this
    /// store's own writes (which do not change its `data_version`). Only read or written
    /// while holding `connection`, so it never lags a commit.
    loads: Arc<Mutex<Option<LoadsRead>>>,
    path: String,
    instance: String,
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` and runs the migrations it lacks; the path
    /// `:memory:` ([`IN_MEMORY`]) keeps everything in memory instead. Blocking: call it from
    /// `spawn_blocking` in async code.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if path == Path::new(IN_MEMORY) {
            return Self::in_memory();
        }
        let shown = path.display().to_string();
        let db = database_error(&shown);
        // WAL and full sync: a reservation answered survives a crash.
        let (connection, mode) = shippy_sqlite::open_wal(path, BUSY_TIMEOUT).map_err(&db)?;
        if mode != "wal" {
            tracing::warn!(path = %shown, journal_mode = %mode, "the reservations database is not in WAL mode");
        }
        drop(db);
        Self::ready(connection, shown)
    }

    /// A database in this process's memory; everything is lost when it is dropped.
    pub fn in_memory() -> Result<Self, StoreError> {
        let connection = Connection::open_in_memory().map_err(database_error(IN_MEMORY))?;
        Self::ready(connection, IN_MEMORY.to_owned())
    }

    fn ready(mut connection: Connection, path: String) -> Result<Self, StoreError> {
        migrate(&mut connection, &path)?;
        Ok(SqliteStore {
            connection: Arc::new(Mutex::new(connection)),
            loads: Arc::new(Mutex::new(None)),
            path,
            instance: this_instance(),
        })
    }

    /// Names the instance new reservations are recorded as made by. Default: `host:pid`.
    pub fn instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// Runs `work` in an `IMMEDIATE` transaction on the connection in a blocking task, and
    /// forgets the cached loads once it committed.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Transaction<'_>, &str) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (cached, instance) = (self.loads.clone(), self.instance.clone());
        self.with_connection(move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = work(&transaction, &instance)?;
            transaction.commit()?;
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
            Ok(value)
        })
        .await
    }

    /// Runs `work` on the connection in a blocking task.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let connection = self.connection.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut connection).map_err(database_error(&path))
        })
        .await
        .map_err(StoreError::Task)?
    }
}

fn database_error(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Database { database: path.to_owned(), source: Box::new(source) }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

fn reservation_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Reservation> {
    Ok(Reservation {
        id: row.get(0)?,
        vessel_id: row.get(1)?,
        consignment_id: row.get(2)?,
        containers: row.get(3)?,
        weight: row.get(4)?,
        holder: row.get(5)?,
        state: row.get(6)?,
        expires_at_ms: row.get(7)?,
    })
}

fn reservation_by_id(connection: &Connection, id: &str) -> rusqlite::Result<Option<Reservation>> {
    connection
        .prepare_cached(&format!("{SELECT_RESERVATION} WHERE id = ?1"))?
        .query_row([id], reservation_row)
        .optional()
}

fn load_of(connection: &Connection, vessel_id: &str) -> rusqlite::Result<Load> {
    connection
        .prepare_cached("SELECT containers, weight FROM vessel_loads WHERE vessel_id = ?1")?
        .query_row([vessel_id], |row| Ok(Load { containers: row.get(0)?, weight: row.get(1)? }))
        .optional()
        .map(Option::unwrap_or_default)
}

/// Adds `containers` and `weight` (negative to take away) to `vessel_id`'s total.
fn add_load(
    connection: &Connection,
    vessel_id: &str,
    containers: i64,
    weight: i64,
) -> rusqlite::Result<Load> {
    connection
        .prepare_cached(
            "INSERT INTO vessel_loads (vessel_id, containers, weight) VALUES (?1, ?2, ?3)
             ON CONFLICT (vessel_id) DO UPDATE SET containers = containers + excluded.containers,
                                                   weight = weight + excluded.weight
             RETURNING containers, weight",
        )?
        .query_row(params![vessel_id, containers, weight], |row| {
            Ok(Load { containers: row.get(0)?, weight: row.get(1)? })
        })
}

/// A data_version that changes whenever another connection commits to the database.
fn data_version(connection: &Connection) -> rusqlite::Result<i64> {
    // Cached: every FindAvailable asks it, and parsing it each time showed in profiles.
    connection.prepare_cached("PRAGMA data_version")?.query_row([], |row| row.get(0))
}

fn user_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Brings the schema to the newest version, each step in its own transaction together with
/// its new `user_version`, so a crash mid-migration leaves the previous version whole.
fn migrate(connection: &mut Connection, path: &str) -> Result<(), StoreError> {
    let db = database_error(path);
    let known = MIGRATIONS.len() as i64;
    let found = user_version(connection).map_err(&db)?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (version, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let next = version as i64 + 1;
        let transaction =
            connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&db)?;
        // Another process may have migrated between our read and our lock.
        if user_version(&transaction).map_err(&db)? >= next {
            continue;
        }
        transaction.execute_batch(step).map_err(&db)?;
        transaction.pragma_update(None, "user_version", next).map_err(&db)?;
        transaction.commit().map_err(&db)?;
        tracing::info!(%path, version = next, "reservations database migrated");
    }
    Ok(())
}

#[tonic::async_trait]
impl ReservationStore for SqliteStore {
    fn database(&self) -> &str {
        &self.path
    }

    async fn schema_version(&self) -> Result<i64, StoreError> {
        self.with_connection(|connection| user_version(connection)).await
    }

    async fn reserve(&self, hold: Hold, candidates: Vec<Vessel>) -> Result<Reserved, StoreError> {
        self.write(move |transaction, instance| {
            if let Some(key) = &hold.request_key {
                let existing = transaction
                    .prepare_cached(&format!("{SELECT_RESERVATION} WHERE holder = ?1 AND request_key = ?2"))?
                    .query_row([&hold.holder, key], reservation_row)
                    .optional()?;
                if let Some(reservation) = existing {
                    let vessel_load = load_of(transaction, &reservation.vessel_id)?;
                    return Ok(Reserved::Held { reservation, fresh: false, vessel_load });
                }
            }
            let mut loads = Vec::with_capacity(candidates.len());
            for vessel in &candidates {
                transaction
                    .prepare_cached(
                        "INSERT INTO vessel_loads (vessel_id, containers, weight) VALUES (?1, 0, 0)
                         ON CONFLICT (vessel_id) DO NOTHING",
                    )?
                    .execute([&vessel.id])?;
                let taken = transaction
                    .prepare_cached(
                        "UPDATE vessel_loads SET containers = containers + ?2, weight = weight + ?3
                         WHERE vessel_id = ?1 AND containers + ?2 <= ?4 AND weight + ?3 <= ?5
                         RETURNING containers, weight",
                    )?
                    .query_row(
                        params![vessel.id, hold.containers, hold.weight, vessel.capacity, vessel.max_weight],
                        |row| Ok(Load { containers: row.get(0)?, weight: row.get(1)? }),
                    )
                    .optional()?;
                let Some(vessel_load) = taken else {
                    loads.push((vessel.id.clone(), load_of(transaction, &vessel.id)?));
                    continue;
                };
                let reservation = Reservation {
                    id: new_reservation_id(),
                    vessel_id: vessel.id.clone(),
                    consignment_id: hold.consignment_id.clone(),
                    containers: hold.containers,
                    weight: hold.weight,
                    holder: hold.holder.clone(),
                    state: HELD.to_owned(),
                    expires_at_ms: Some(now_ms() + hold.ttl.as_millis() as i64),
                };
                transaction
                    .prepare_cached(
                        "INSERT INTO reservations (id, vessel_id, consignment_id, containers, weight, holder,
                                                   request_key, state, expires_at_ms, made_by)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )?
                    .execute(params![
                        reservation.id,
                        reservation.vessel_id,
                        reservation.consignment_id,
                        reservation.containers,
                        reservation.weight,
                        reservation.holder,
                        hold.request_key,
                        reservation.state,
                        reservation.expires_at_ms,
                        instance
                    ])?;
                return Ok(Reserved::Held { reservation, fresh: true, vessel_load });
            }
            Ok(Reserved::Full { loads })
        })
        .await
    }

    async fn confirm(&self, id: &str) -> Result<Option<Booked>, StoreError> {
        let id = id.to_owned();
        self.write(move |transaction, _| {
            let Some(mut reservation) = reservation_by_id(transaction, &id)? else { return Ok(None) };
            let fresh = !reservation.is_confirmed();
            if fresh {
                transaction
                    .prepare_cached(
                        "UPDATE reservations SET state = 'confirmed', expires_at_ms = NULL
                         WHERE id = ?1",
                    )?
                    .execute([&id])?;
                reservation.state = CONFIRMED.to_owned();
                reservation.expires_at_ms = None;
            }
            let vessel_load = load_of(transaction, &reservation.vessel_id)?;
            Ok(Some(Booked { reservation, fresh, vessel_load }))
        })
        .await
    }

    async fn release(&self, id: &str) -> Result<Released, StoreError> {
        let id = id.to_owned();
        self.write(move |transaction, _| {
            let Some(reservation) = reservation_by_id(transaction, &id)? else {
                return Ok(Released::Unknown);
            };
            if reservation.is_confirmed() {
                return Ok(Released::Confirmed(reservation));
            }
            transaction.prepare_cached("DELETE FROM reservations WHERE id = ?1")?.execute([&id])?;
            add_load(transaction, &reservation.vessel_id, -reservation.containers, -reservation.weight)?;
            Ok(Released::Released(reservation))
        })
        .await
    }

    async fn book(
        &self,
        consignment_id: &str,
        vessel_id: &str,
        containers: i64,
        weight: i64,
    ) -> Result<Booked, StoreError> {
        let (consignment_id, vessel_id) = (consignment_id.to_owned(), vessel_id.to_owned());
        self.write(move |transaction, instance| {
            let id = unreserved_booking_id(&consignment_id);
            let inserted = transaction
                .prepare_cached(
                    "INSERT INTO reservations (id, vessel_id, consignment_id, containers, weight, holder, state, made_by)
                     VALUES (?1, ?2, ?3, ?4, ?5, '', 'confirmed', ?6) ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![id, vessel_id, consignment_id, containers, weight, instance])?;
            if inserted == 1 {
                add_load(transaction, &vessel_id, containers, weight)?;
            }
            let reservation = reservation_by_id(transaction, &id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
            let vessel_load = load_of(transaction, &reservation.vessel_id)?;
            Ok(Booked { reservation, fresh: inserted == 1, vessel_load })
        })
        .await
    }

    async fn expired(&self, limit: usize) -> Result<Vec<Expired>, StoreError> {
        self.with_connection(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, holder, consignment_id FROM reservations
                 WHERE state = 'held' AND expires_at_ms < ?1 ORDER BY expires_at_ms LIMIT ?2",
            )?;
            let rows = statement.query_map(params![now_ms(), limit as i64], |row| {
                Ok(Expired { id: row.get(0)?, holder: row.get(1)?, consignment_id: row.get(2)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn loads(&self) -> Result<Arc<HashMap<String, Load>>, StoreError> {
        if let Ok(connection) = self.connection.try_lock()
            && let Ok(version) = data_version(&connection)
            && let Some((read_at, loads)) = &*self.loads.lock().unwrap_or_else(|e| e.into_inner())
            && *read_at == version
        {
            return Ok(loads.clone());
        }
        let cached = self.loads.clone();
        self.with_connection(move |connection| {
            let version = data_version(connection)?;
            // Another call may hold the connection for its own check: nothing new, no query.
            if let Some((read_at, loads)) = &*cached.lock().unwrap_or_else(|e| e.into_inner())
                && *read_at == version
            {
                return Ok(loads.clone());
            }
            let mut statement = connection.prepare_cached(
                "SELECT vessel_id, containers, weight FROM vessel_loads WHERE containers > 0 OR weight > 0",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get(0)?, Load { containers: row.get(1)?, weight: row.get(2)? }))
            })?;
            let loads = Arc::new(rows.collect::<rusqlite::Result<HashMap<_, _>>>()?);
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, loads.clone()));
            Ok(loads)
        })
        .await
    }

    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError> {
        let id = id.to_owned();
        self.with_connection(move |connection| reservation_by_id(connection, &id)).await
    }

    async fn reservations_for(&self, consignment_id: &str) -> Result<Vec<Reservation>, StoreError> {
        let consignment_id = consignment_id.to_owned();
        self.with_connection(move |connection| {
            let mut statement = connection
                .prepare_cached(&format!("{SELECT_RESERVATION} WHERE consignment_id = ?1 ORDER BY id"))?;
            let rows = statement.query_map([&consignment_id], reservation_row)?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
impl SqliteStore {
    /// Runs `sql` on the connection, for tests that look at the tables.
    pub(crate) fn query_i64(&self, sql: &str) -> i64 {
        self.connection.lock().unwrap().query_row(sql, [], |row| row.get(0)).unwrap()
    }
}
