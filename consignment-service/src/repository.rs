//! Where consignments are kept: the [`ConsignmentRepository`] trait and its SQLite
//! implementation, [`SqliteRepository`], on a file (durable) or in memory (tests).
//!
//! A consignment and its containers are written in one transaction, so a crash leaves
//! either nothing or all of it. An idempotency key is stored with the consignment under a
//! `UNIQUE` constraint, checked and written in the same transaction: a second create with the
//! same key returns the first consignment and writes nothing.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use consignment_service::{ConsignmentRepository, SqliteRepository};
//! use proto::consignment::Consignment;
//!
//! let repository = SqliteRepository::in_memory().unwrap();
//! let consignment = Consignment { id: "c-1".into(), weight: 10, ..Default::default() };
//! let first = repository.create(consignment.clone(), Some("key-1")).await.unwrap();
//! let again = repository.create(consignment, Some("key-1")).await.unwrap();
//! assert!(!first.replayed && again.replayed);
//! assert_eq!(repository.list().await.unwrap().len(), 1);
//! # }
//! ```

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

pub mod postgres;

pub use self::postgres::PostgresRepository;

use proto::consignment::{Consignment, Container};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The path that means "no file: keep consignments in memory, lose them on exit".
pub const IN_MEMORY: &str = ":memory:";

/// How long a write waits for another connection's lock on the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one step per version. Step `i` takes the database from `user_version` `i` to
/// `i + 1`; a step is never edited once released, only new steps are appended.
const MIGRATIONS: &[&str] = &[
    // 1: consignments, their containers in order, and the idempotency key of the create.
    "CREATE TABLE consignments (
         seq             INTEGER PRIMARY KEY AUTOINCREMENT,
         id              TEXT    NOT NULL UNIQUE,
         description     TEXT    NOT NULL,
         weight          INTEGER NOT NULL,
         vessel_id       TEXT    NOT NULL,
         idempotency_key TEXT    UNIQUE,
         created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
     );
     CREATE TABLE containers (
         consignment_seq INTEGER NOT NULL REFERENCES consignments(seq) ON DELETE CASCADE,
         position        INTEGER NOT NULL,
         id              TEXT    NOT NULL,
         customer_id     TEXT    NOT NULL,
         origin          TEXT    NOT NULL,
         user_id         TEXT    NOT NULL,
         PRIMARY KEY (consignment_seq, position)
     );",
    // 2: the transactional outbox: one event per stored consignment, written in the same
    // transaction, published by the relay, then marked sent.
    "CREATE TABLE outbox (
         seq        INTEGER PRIMARY KEY AUTOINCREMENT,
         topic      TEXT    NOT NULL,
         message_id TEXT    NOT NULL,
         body       BLOB    NOT NULL,
         sent_at    TEXT
     );
     CREATE INDEX outbox_unsent ON outbox(seq) WHERE sent_at IS NULL;",
    // 3: the trace context of the create that wrote the event, so its subscribers join
    // that trace although the relay publishes later.
    "ALTER TABLE outbox ADD COLUMN traceparent TEXT;
     ALTER TABLE outbox ADD COLUMN tracestate TEXT;",
    // 4: the vessel reservation each consignment is booked by; how each reservation this
    // service made was settled (stored, or abandoned for good); who relays the outbox.
    "ALTER TABLE consignments ADD COLUMN reservation_id TEXT NOT NULL DEFAULT '';
     CREATE TABLE reservation_settlements (
         reservation_id TEXT PRIMARY KEY,
         outcome        TEXT NOT NULL CHECK (outcome IN ('stored', 'abandoned')),
         consignment_id TEXT,
         settled_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
     );
     CREATE TABLE outbox_lease (
         name     TEXT    PRIMARY KEY,
         holder   TEXT    NOT NULL,
         until_ms INTEGER NOT NULL
     );",
];

/// The topic of the event each stored consignment gets.
pub const CONSIGNMENT_CREATED: &str = "consignment.created";

/// An event waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// Its place in the outbox.
    pub seq: i64,
    /// Where it is published.
    pub topic: String,
    /// Its message id (the consignment id for [`CONSIGNMENT_CREATED`]).
    pub message_id: String,
    /// The encoded protobuf body.
    pub body: Vec<u8>,
    /// W3C `traceparent` of the create that wrote it, when that call was traced.
    pub traceparent: Option<String>,
    /// W3C `tracestate` that goes with `traceparent`.
    pub tracestate: Option<String>,
}

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// Another consignment already has this id (a client-chosen id used twice).
    #[error("a consignment with id {0:?} already exists")]
    DuplicateId(String),
    /// The database file was written by a newer version of this service.
    #[error(
        "database schema version {found} is newer than this binary knows ({known}); upgrade consignment-service"
    )]
    SchemaTooNew {
        /// The version found in the file.
        found: i64,
        /// The newest version this binary can migrate to.
        known: i64,
    },
    /// The database could not be opened, read or written.
    #[error("database {path}")]
    Database {
        /// The database's path, or `:memory:`.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database server could not be reached, read or written.
    #[error("database {database}")]
    Server {
        /// The database's address, without a password.
        database: String,
        /// What the server or driver said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `--db` that is neither a path nor a usable `postgres://` URL.
    #[error("database {database:?}: {why}")]
    BadAddress {
        /// What was given.
        database: String,
        /// What is wrong with it.
        why: String,
    },
    /// The vessel reservation was abandoned (settled with vessel-service as never to be
    /// stored) before the consignment could be stored under it.
    #[error("reservation {0} was abandoned before the consignment was stored")]
    ReservationAbandoned(String),
    /// The blocking storage task did not finish (it panicked or the runtime is shutting down).
    #[error("storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// How a reservation this service made is settled, as [`ConsignmentRepository::settle`]
/// answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// This consignment is stored under it.
    Stored(String),
    /// Nothing is, nor will ever be, stored under it.
    Abandoned,
}

/// The outcome of [`ConsignmentRepository::create`].
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The consignment as stored: the new one, or the one first stored under the same key.
    pub consignment: Consignment,
    /// True when the key was already used and nothing new was stored.
    pub replayed: bool,
}

/// Opens the repository `database` names: a `postgres://` (or `postgresql://`) URL,
/// `:memory:`, or the path of an SQLite file (created if missing); the schema is created or
/// migrated.
pub async fn open(database: &str) -> Result<std::sync::Arc<dyn ConsignmentRepository>, RepositoryError> {
    if shippy_postgres::is_postgres(database) {
        return Ok(std::sync::Arc::new(PostgresRepository::connect(database).await?));
    }
    let path = database.to_owned();
    let repository = tokio::task::spawn_blocking(move || SqliteRepository::open(&path))
        .await
        .map_err(RepositoryError::Task)??;
    Ok(std::sync::Arc::new(repository))
}

/// Where consignments are kept.
#[tonic::async_trait]
pub trait ConsignmentRepository: Send + Sync + 'static {
    /// The database, for logs and errors: a path, `:memory:`, or a URL without its password.
    fn database(&self) -> &str;
    /// The schema version the database is at.
    async fn schema_version(&self) -> Result<i64, RepositoryError>;
    /// Stores `consignment`, its containers and its `consignment.created` outbox event in
    /// one transaction, and settles its `reservation_id` (when set) as stored in the same
    /// one. With a `key` already used, stores nothing and returns the consignment first
    /// stored under it (`replayed: true`), whatever `consignment` holds: comparing is the
    /// caller's job. A reservation settled as abandoned already is
    /// [`RepositoryError::ReservationAbandoned`], and nothing is stored.
    async fn create(&self, consignment: Consignment, key: Option<&str>) -> Result<Created, RepositoryError>;
    /// Settles `reservation_id` for good: stored when a consignment was stored under it,
    /// else abandoned from now on (a later [`ConsignmentRepository::create`] under it is
    /// refused). Asking again gives the same answer.
    async fn settle(&self, reservation_id: &str) -> Result<Settled, RepositoryError>;
    /// Up to `limit` outbox events not yet marked sent, oldest first.
    async fn unsent_events(&self, limit: usize) -> Result<Vec<OutboxEvent>, RepositoryError>;
    /// Marks the outbox event at `seq` sent.
    async fn mark_sent(&self, seq: i64) -> Result<(), RepositoryError>;
    /// Takes or renews the outbox lease for `holder` for `lease`, unless another holder's
    /// lease runs; true when `holder` has it. One relay at a time per database.
    async fn lease_outbox(&self, holder: &str, lease: std::time::Duration) -> Result<bool, RepositoryError>;
    /// The consignment stored under idempotency `key`, if any.
    async fn find_by_key(&self, key: &str) -> Result<Option<Consignment>, RepositoryError>;
    /// Every stored consignment, oldest first.
    async fn list(&self) -> Result<Vec<Consignment>, RepositoryError>;
    /// Where consignment `id` stands in the order consignments were stored, if it is stored.
    /// Positions grow in the order creations commit, for every replica of the database.
    async fn position_of(&self, id: &str) -> Result<Option<i64>, RepositoryError>;
    /// The position of the newest stored consignment; 0 when none is.
    async fn latest_position(&self) -> Result<i64, RepositoryError>;
    /// Up to `limit` consignments stored after `position`, oldest first, each with its own.
    async fn stored_after(
        &self,
        position: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Consignment)>, RepositoryError>;
}

/// Consignments in an SQLite database: a file in WAL mode with `synchronous=FULL` (each
/// commit is on disk before `create` returns), or memory for tests.
#[derive(Debug, Clone)]
pub struct SqliteRepository {
    connection: Arc<Mutex<Connection>>,
    path: String,
}

impl SqliteRepository {
    /// Opens (or creates) the database at `path` and runs the migrations it lacks; the path
    /// `:memory:` ([`IN_MEMORY`]) keeps everything in memory instead.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RepositoryError> {
        let path = path.as_ref();
        if path == Path::new(IN_MEMORY) {
            return Self::in_memory();
        }
        let shown = path.display().to_string();
        let db = |source| RepositoryError::Database { path: shown.clone(), source };
        // WAL and full sync: a reported consignment survives a crash or power loss.
        let (connection, mode) = shippy_sqlite::open_wal(path, BUSY_TIMEOUT).map_err(db)?;
        if mode != "wal" {
            tracing::warn!(path = %shown, journal_mode = %mode, "the database is not in WAL mode");
        }
        Self::ready(connection, shown)
    }

    /// A database in this process's memory; everything is lost when it is dropped.
    pub fn in_memory() -> Result<Self, RepositoryError> {
        let connection = Connection::open_in_memory()
            .map_err(|source| RepositoryError::Database { path: IN_MEMORY.to_owned(), source })?;
        Self::ready(connection, IN_MEMORY.to_owned())
    }

    /// The database's path, or `:memory:`.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn ready(mut connection: Connection, path: String) -> Result<Self, RepositoryError> {
        let db = |source| RepositoryError::Database { path: path.clone(), source };
        connection.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        migrate(&mut connection, &path)?;
        Ok(SqliteRepository { connection: Arc::new(Mutex::new(connection)), path })
    }

    /// Runs `work` on the connection in a blocking task.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, RepositoryError> + Send + 'static,
    ) -> Result<T, RepositoryError> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut connection)
        })
        .await
        .map_err(RepositoryError::Task)?
    }
}

fn user_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Brings the schema to the newest version, each step in its own transaction together with
/// its new `user_version`, so a crash mid-migration leaves the previous version whole.
fn migrate(connection: &mut Connection, path: &str) -> Result<(), RepositoryError> {
    let db = |source| RepositoryError::Database { path: path.to_owned(), source };
    let known = MIGRATIONS.len() as i64;
    let found = user_version(connection).map_err(db)?;
    if found > known {
        return Err(RepositoryError::SchemaTooNew { found, known });
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
        tracing::info!(%path, version = next, "database migrated");
    }
    Ok(())
}

const SELECT_CONSIGNMENT: &str =
    "SELECT seq, id, description, weight, vessel_id, reservation_id FROM consignments";

fn consignment_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Consignment)> {
    Ok((
        row.get(0)?,
        Consignment {
            id: row.get(1)?,
            description: row.get(2)?,
            weight: row.get(3)?,
            vessel_id: row.get(4)?,
            containers: Vec::new(),
            reservation_id: row.get(5)?,
        },
    ))
}

fn container_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Container> {
    Ok(Container { id: row.get(0)?, customer_id: row.get(1)?, origin: row.get(2)?, user_id: row.get(3)? })
}

/// The consignment stored under `key`, containers included.
fn by_key(connection: &Connection, key: &str) -> rusqlite::Result<Option<Consignment>> {
    let found = connection
        .query_row(&format!("{SELECT_CONSIGNMENT} WHERE idempotency_key = ?1"), [key], consignment_row)
        .optional()?;
    let Some((seq, mut consignment)) = found else { return Ok(None) };
    let mut statement = connection.prepare_cached(
        "SELECT id, customer_id, origin, user_id FROM containers WHERE consignment_seq = ?1 ORDER BY position",
    )?;
    consignment.containers = statement.query_map([seq], container_row)?.collect::<rusqlite::Result<_>>()?;
    Ok(Some(consignment))
}

/// How `reservation_id` was settled, if it was.
fn settlement_of(connection: &Connection, reservation_id: &str) -> rusqlite::Result<Option<Settled>> {
    connection
        .query_row(
            "SELECT outcome, consignment_id FROM reservation_settlements WHERE reservation_id = ?1",
            [reservation_id],
            |row| {
                let (outcome, consignment): (String, Option<String>) = (row.get(0)?, row.get(1)?);
                Ok(match outcome.as_str() {
                    "stored" => Settled::Stored(consignment.unwrap_or_default()),
                    _ => Settled::Abandoned,
                })
            },
        )
        .optional()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

fn is_unique_violation(err: &rusqlite::Error, column: &str) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, Some(message))
        if e.code == rusqlite::ErrorCode::ConstraintViolation && message.contains(column))
}

#[tonic::async_trait]
impl ConsignmentRepository for SqliteRepository {
    fn database(&self) -> &str {
        &self.path
    }

    async fn schema_version(&self) -> Result<i64, RepositoryError> {
        let path = self.path.clone();
        self.with_connection(move |connection| {
            user_version(connection).map_err(|source| RepositoryError::Database { path, source })
        })
        .await
    }

    async fn settle(&self, reservation_id: &str) -> Result<Settled, RepositoryError> {
        let (reservation_id, path) = (reservation_id.to_owned(), self.path.clone());
        self.with_connection(move |connection| {
            let db = |source| RepositoryError::Database { path: path.clone(), source };
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            transaction
                .execute(
                    "INSERT INTO reservation_settlements (reservation_id, outcome) VALUES (?1, 'abandoned')
                     ON CONFLICT (reservation_id) DO NOTHING",
                    [&reservation_id],
                )
                .map_err(db)?;
            let settled = settlement_of(&transaction, &reservation_id).map_err(db)?;
            transaction.commit().map_err(db)?;
            Ok(settled.unwrap_or(Settled::Abandoned))
        })
        .await
    }

    async fn lease_outbox(&self, holder: &str, lease: Duration) -> Result<bool, RepositoryError> {
        let (holder, path) = (holder.to_owned(), self.path.clone());
        self.with_connection(move |connection| {
            let now = now_ms();
            let until = now + lease.as_millis() as i64;
            connection
                .execute(
                    "INSERT INTO outbox_lease (name, holder, until_ms) VALUES ('relay', ?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                     WHERE outbox_lease.holder = excluded.holder OR outbox_lease.until_ms < ?3",
                    params![holder, until, now],
                )
                .map(|changed| changed == 1)
                .map_err(|source| RepositoryError::Database { path, source })
        })
        .await
    }

    async fn unsent_events(&self, limit: usize) -> Result<Vec<OutboxEvent>, RepositoryError> {
        let path = self.path.clone();
        self.with_connection(move |connection| {
            let db = |source| RepositoryError::Database { path: path.clone(), source };
            let mut statement = connection
                .prepare_cached(
                    "SELECT seq, topic, message_id, body, traceparent, tracestate FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT ?1",
                )
                .map_err(db)?;
            let rows = statement
                .query_map(params![limit as i64], |row| {
                    Ok(OutboxEvent {
                        seq: row.get(0)?,
                        topic: row.get(1)?,
                        message_id: row.get(2)?,
                        body: row.get(3)?,
                        traceparent: row.get(4)?,
                        tracestate: row.get(5)?,
                    })
                })
                .map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
        })
        .await
    }

    async fn mark_sent(&self, seq: i64) -> Result<(), RepositoryError> {
        let path = self.path.clone();
        self.with_connection(move |connection| {
            connection
                .execute(
                    "UPDATE outbox SET sent_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE seq = ?1",
                    params![seq],
                )
                .map(drop)
                .map_err(|source| RepositoryError::Database { path, source })
        })
        .await
    }

    async fn create(&self, consignment: Consignment, key: Option<&str>) -> Result<Created, RepositoryError> {
        let key = key.map(str::to_owned);
        let path = self.path.clone();
        let mut trace = micro_core::broker::current_trace_headers();
        let traceparent = trace.remove(micro_core::broker::headers::TRACEPARENT);
        let tracestate = trace.remove(micro_core::broker::headers::TRACESTATE);
        self.with_connection(move |connection| {
            let db = |source| RepositoryError::Database { path: path.clone(), source };
            // IMMEDIATE takes the write lock first, so the key check and the insert are one
            // step even for another process on the same file; UNIQUE backs it up.
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            if let Some(key) = &key
                && let Some(existing) = by_key(&transaction, key).map_err(db)?
            {
                return Ok(Created { consignment: existing, replayed: true });
            }
            if !consignment.reservation_id.is_empty() {
                let settled = transaction
                    .execute(
                        "INSERT INTO reservation_settlements (reservation_id, outcome, consignment_id)
                         VALUES (?1, 'stored', ?2) ON CONFLICT (reservation_id) DO NOTHING",
                        params![consignment.reservation_id, consignment.id],
                    )
                    .map_err(db)?;
                if settled == 0 {
                    return Err(RepositoryError::ReservationAbandoned(consignment.reservation_id.clone()));
                }
            }
            let inserted = transaction.execute(
                "INSERT INTO consignments (id, description, weight, vessel_id, idempotency_key, reservation_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![consignment.id, consignment.description, consignment.weight, consignment.vessel_id, key, consignment.reservation_id],
            );
            match inserted {
                Err(err) if is_unique_violation(&err, "consignments.id") => {
                    return Err(RepositoryError::DuplicateId(consignment.id.clone()));
                }
                other => other.map_err(db)?,
            };
            let seq = transaction.last_insert_rowid();
            {
                let mut insert = transaction
                    .prepare_cached(
                        "INSERT INTO containers (consignment_seq, position, id, customer_id, origin, user_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(db)?;
                for (position, c) in consignment.containers.iter().enumerate() {
                    insert
                        .execute(params![seq, position as i64, c.id, c.customer_id, c.origin, c.user_id])
                        .map_err(db)?;
                }
            }
            {
                use prost::Message;
                transaction
                    .execute(
                        "INSERT INTO outbox (topic, message_id, body, traceparent, tracestate) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![CONSIGNMENT_CREATED, consignment.id, consignment.encode_to_vec(), traceparent, tracestate],
                    )
                    .map_err(db)?;
            }
            transaction.commit().map_err(db)?;
            Ok(Created { consignment, replayed: false })
        })
        .await
    }

    async fn find_by_key(&self, key: &str) -> Result<Option<Consignment>, RepositoryError> {
        let key = key.to_owned();
        let path = self.path.clone();
        self.with_connection(move |connection| {
            by_key(connection, &key).map_err(|source| RepositoryError::Database { path, source })
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Consignment>, RepositoryError> {
        let listed = self.stored_after(0, usize::MAX).await?;
        Ok(listed.into_iter().map(|(_, consignment)| consignment).collect())
    }

    async fn position_of(&self, id: &str) -> Result<Option<i64>, RepositoryError> {
        let id = id.to_owned();
        let path = self.path.clone();
        self.with_connection(move |connection| {
            connection
                .query_row("SELECT seq FROM consignments WHERE id = ?1", [id], |row| row.get(0))
                .optional()
                .map_err(|source| RepositoryError::Database { path, source })
        })
        .await
    }

    async fn latest_position(&self) -> Result<i64, RepositoryError> {
        let path = self.path.clone();
        self.with_connection(move |connection| {
            connection
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM consignments", [], |row| row.get(0))
                .map_err(|source| RepositoryError::Database { path, source })
        })
        .await
    }

    async fn stored_after(
        &self,
        position: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Consignment)>, RepositoryError> {
        let path = self.path.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_connection(move |connection| {
            let db = |source| RepositoryError::Database { path: path.clone(), source };
            // One read transaction, so consignments and containers come from the same snapshot.
            let transaction = connection.transaction().map_err(db)?;
            let read = read_after(&transaction, position, limit).map_err(db)?;
            transaction.commit().map_err(db)?;
            Ok(read)
        })
        .await
    }
}

/// Up to `limit` consignments after `position`, oldest first, with their containers.
fn read_after(
    connection: &Connection,
    position: i64,
    limit: i64,
) -> rusqlite::Result<Vec<(i64, Consignment)>> {
    let mut consignments: Vec<(i64, Consignment)> = {
        let mut statement = connection
            .prepare_cached(&format!("{SELECT_CONSIGNMENT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
        statement.query_map(params![position, limit], consignment_row)?.collect::<rusqlite::Result<_>>()?
    };
    let Some(last) = consignments.last().map(|(seq, _)| *seq) else { return Ok(consignments) };
    let mut statement = connection.prepare_cached(
        "SELECT consignment_seq, id, customer_id, origin, user_id FROM containers
         WHERE consignment_seq > ?1 AND consignment_seq <= ?2 ORDER BY consignment_seq, position",
    )?;
    let mut rows = statement.query(params![position, last])?;
    let mut at = 0;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        while at < consignments.len() && consignments[at].0 < seq {
            at += 1;
        }
        let container = Container {
            id: row.get(1)?,
            customer_id: row.get(2)?,
            origin: row.get(3)?,
            user_id: row.get(4)?,
        };
        if let Some((_, consignment)) = consignments.get_mut(at).filter(|(s, _)| *s == seq) {
            consignment.containers.push(container);
        }
    }
    Ok(consignments)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_path_in(dir: &Path) -> std::path::PathBuf {
        dir.join(crate::DEFAULT_DB)
    }

    fn sample(id: &str, containers: usize) -> Consignment {
        Consignment {
            id: id.to_owned(),
            description: format!("consignment {id}"),
            weight: 100,
            vessel_id: "vessel001".to_owned(),
            containers: (0..containers)
                .map(|i| Container {
                    id: format!("k{i}"),
                    customer_id: format!("cust{i}"),
                    origin: "Derby".to_owned(),
                    user_id: "u1".to_owned(),
                })
                .collect(),
            reservation_id: String::new(),
        }
    }

    #[tokio::test]
    async fn positions_follow_the_order_of_storing_and_a_page_resumes_after_one() {
        let repository = SqliteRepository::in_memory().unwrap();
        assert_eq!(repository.latest_position().await.unwrap(), 0);
        for id in ["a", "b", "c"] {
            repository.create(sample(id, 2), None).await.unwrap();
        }
        let first = repository.stored_after(0, 2).await.unwrap();
        let ids: Vec<&str> = first.iter().map(|(_, c)| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(first.iter().all(|(_, c)| c.containers.len() == 2), "{first:?}");
        let rest = repository.stored_after(first[1].0, 10).await.unwrap();
        assert_eq!(rest.iter().map(|(_, c)| c.id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(rest[0].1.containers.len(), 2);
        assert_eq!(repository.position_of("b").await.unwrap(), Some(first[1].0));
        assert_eq!(repository.position_of("nowhere").await.unwrap(), None);
        assert_eq!(repository.latest_position().await.unwrap(), rest[0].0);
        assert!(repository.stored_after(rest[0].0, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_file_database_keeps_consignments_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path_in(dir.path());
        let first = SqliteRepository::open(&path).unwrap();
        first.create(sample("c-1", 3), Some("k-1")).await.unwrap();
        first.create(sample("c-2", 1), None).await.unwrap();
        drop(first);

        let again = SqliteRepository::open(&path).unwrap();
        assert_eq!(again.schema_version().await.unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(again.list().await.unwrap(), vec![sample("c-1", 3), sample("c-2", 1)]);
        let replay = again.create(sample("c-other", 2), Some("k-1")).await.unwrap();
        assert_eq!(replay, Created { consignment: sample("c-1", 3), replayed: true });
        assert_eq!(again.list().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn file_database_is_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let repository = SqliteRepository::open(default_path_in(dir.path())).unwrap();
        let connection = repository.connection.lock().unwrap();
        let mode: String = connection.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = connection.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2));
    }

    #[tokio::test]
    async fn same_key_stores_once_even_when_creates_race() {
        let repository = SqliteRepository::in_memory().unwrap();
        let creates = (0..16).map(|i| {
            let repository = repository.clone();
            tokio::spawn(async move { repository.create(sample(&format!("c-{i}"), 2), Some("same")).await })
        });
        let mut fresh = 0;
        for create in creates {
            fresh += usize::from(!create.await.unwrap().unwrap().replayed);
        }
        assert_eq!(fresh, 1);
        assert_eq!(repository.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_duplicate_id_is_refused_and_leaves_nothing_behind() {
        let repository = SqliteRepository::in_memory().unwrap();
        repository.create(sample("c-1", 1), None).await.unwrap();
        let err = repository.create(sample("c-1", 4), Some("k")).await.unwrap_err();
        assert!(matches!(err, RepositoryError::DuplicateId(ref id) if id == "c-1"), "{err:?}");
        assert_eq!(repository.list().await.unwrap(), vec![sample("c-1", 1)]);
        assert_eq!(repository.find_by_key("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_failed_container_insert_rolls_the_whole_consignment_back() {
        let repository = SqliteRepository::in_memory().unwrap();
        repository
            .connection
            .lock()
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER fail_third BEFORE INSERT ON containers WHEN NEW.position = 2
                 BEGIN SELECT RAISE(ABORT, 'disk full, pretend'); END;",
            )
            .unwrap();
        assert!(repository.create(sample("c-1", 5), Some("k")).await.is_err());
        assert!(repository.list().await.unwrap().is_empty());
        assert_eq!(repository.find_by_key("k").await.unwrap(), None);
        let count: i64 = repository
            .connection
            .lock()
            .unwrap()
            .query_row("SELECT count(*) FROM containers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 0);
    }

    #[tokio::test]
    async fn an_outbox_written_by_schema_2_is_relayed_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path_in(dir.path());
        {
            let connection = Connection::open(&path).unwrap();
            connection.execute_batch(MIGRATIONS[0]).unwrap();
            connection.execute_batch(MIGRATIONS[1]).unwrap();
            connection.pragma_update(None, "user_version", 2).unwrap();
            connection
                .execute("INSERT INTO outbox (topic, message_id, body) VALUES ('t', 'old', x'00')", [])
                .unwrap();
        }
        let repository = SqliteRepository::open(&path).unwrap();
        assert_eq!(repository.schema_version().await.unwrap(), MIGRATIONS.len() as i64);
        let events = repository.unsent_events(10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].message_id.as_str(), events[0].traceparent.as_deref()), ("old", None));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path_in(dir.path());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteRepository::open(&path).unwrap_err();
        assert!(matches!(err, RepositoryError::SchemaTooNew { found: 99, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn each_new_consignment_leaves_one_event_and_a_replay_none() {
        let repository = SqliteRepository::in_memory().unwrap();
        repository.create(sample("c-1", 2), Some("k")).await.unwrap();
        repository.create(sample("c-1", 2), Some("k")).await.unwrap();
        let events = repository.unsent_events(10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].topic.as_str(), events[0].message_id.as_str()), (CONSIGNMENT_CREATED, "c-1"));
        assert_eq!(events[0].traceparent, None, "the create was not traced");
        use prost::Message;
        assert_eq!(Consignment::decode(&events[0].body[..]).unwrap().id, "c-1");
        repository.mark_sent(events[0].seq).await.unwrap();
        assert!(repository.unsent_events(10).await.unwrap().is_empty());
    }

    #[test]
    fn memory_path_opens_an_in_memory_database() {
        assert_eq!(SqliteRepository::open(IN_MEMORY).unwrap().path(), IN_MEMORY);
    }
}
