//! [`PostgresRepository`]: consignments in a PostgreSQL database, shared by replicas of
//! consignment-service on any hosts.
//!
//! The idempotency key, the consignment id and the reservation's settlement are unique
//! keys, so two replicas racing with one key store once: the loser's transaction fails on
//! the key, rolls back whole, and answers with the winner's consignment. The schema is
//! created or migrated at start, under an advisory lock, so replicas starting together
//! migrate once; the pool, session settings and migrations are [`shippy_postgres`]'s.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> Result<(), consignment_service::RepositoryError> {
//! use consignment_service::{ConsignmentRepository, PostgresRepository};
//! let repository = PostgresRepository::connect("postgres://shippy@10.0.0.5:5432/consignments").await?;
//! println!("{} consignments", repository.list().await?.len());
//! # Ok(()) }
//! ```

use std::time::Duration;

use proto::consignment::{Consignment, Container};
use shippy_postgres::{
    PostgresError,
    deadpool_postgres::{self, GenericClient, Pool},
    redacted,
    tokio_postgres::{self, Row, error::SqlState},
};

use super::{CONSIGNMENT_CREATED, ConsignmentRepository, Created, OutboxEvent, RepositoryError, Settled};

/// The advisory lock migrations take, so replicas starting together migrate once.
const MIGRATION_LOCK: i64 = 0x636f_6e73_6967; // "consig"

/// The advisory lock each creation holds from its insert to its commit (see `try_create`).
const STORE_ORDER_LOCK: i64 = 0x636f_6e73_6f72; // "consor"

/// The schema, one step per version, recorded in `schema_migrations`; a step is never
/// edited once released, only new steps are appended.
const MIGRATIONS: &[&str] = &[
    // 1: consignments and their containers, the outbox, how each reservation was settled,
    // and the outbox lease.
    "CREATE TABLE consignments (
         seq             BIGSERIAL   PRIMARY KEY,
         id              TEXT        NOT NULL UNIQUE,
         description     TEXT        NOT NULL,
         weight          INTEGER     NOT NULL,
         vessel_id       TEXT        NOT NULL,
         idempotency_key TEXT        UNIQUE,
         reservation_id  TEXT        NOT NULL DEFAULT '',
         created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE TABLE containers (
         consignment_seq BIGINT  NOT NULL REFERENCES consignments (seq) ON DELETE CASCADE,
         position        INTEGER NOT NULL,
         id              TEXT    NOT NULL,
         customer_id     TEXT    NOT NULL,
         origin          TEXT    NOT NULL,
         user_id         TEXT    NOT NULL,
         PRIMARY KEY (consignment_seq, position)
     );
     CREATE TABLE outbox (
         seq         BIGSERIAL   PRIMARY KEY,
         topic       TEXT        NOT NULL,
         message_id  TEXT        NOT NULL,
         body        BYTEA       NOT NULL,
         sent_at     TIMESTAMPTZ,
         traceparent TEXT,
         tracestate  TEXT
     );
     CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
     CREATE TABLE reservation_settlements (
         reservation_id TEXT        PRIMARY KEY,
         outcome        TEXT        NOT NULL CHECK (outcome IN ('stored', 'abandoned')),
         consignment_id TEXT,
         settled_at     TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE TABLE outbox_lease (
         name     TEXT   PRIMARY KEY,
         holder   TEXT   NOT NULL,
         until_ms BIGINT NOT NULL
     );",
];

/// Milliseconds since the Unix epoch by the database's clock, which every replica shares.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const SELECT_CONSIGNMENT: &str =
    "SELECT seq, id, description, weight, vessel_id, reservation_id FROM consignments";

/// Consignments in PostgreSQL; see the module docs.
#[derive(Clone)]
pub struct PostgresRepository {
    pool: Pool,
    database: String,
}

impl std::fmt::Debug for PostgresRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRepository").field("database", &self.database).finish_non_exhaustive()
    }
}

/// What went wrong inside one transaction.
enum Failure {
    Database(tokio_postgres::Error),
    Domain(RepositoryError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(err: tokio_postgres::Error) -> Self {
        Failure::Database(err)
    }
}

impl PostgresRepository {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/name`),
    /// then creates or migrates the schema. Fails when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
        let pool = shippy_postgres::connect(url, MIGRATIONS, MIGRATION_LOCK, "consignment").await.map_err(
            |err| match err {
                PostgresError::SchemaTooNew { found, known, .. } => {
                    RepositoryError::SchemaTooNew { found, known }
                }
                PostgresError::BadAddress { database, why } => RepositoryError::BadAddress { database, why },
                other => RepositoryError::Server { database: redacted(url), source: Box::new(other) },
            },
        )?;
        Ok(PostgresRepository { pool, database: redacted(url) })
    }

    fn error(&self, source: impl std::error::Error + Send + Sync + 'static) -> RepositoryError {
        RepositoryError::Server { database: self.database.clone(), source: Box::new(source) }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, RepositoryError> {
        self.pool.get().await.map_err(|err| self.error(err))
    }

    /// One attempt at [`ConsignmentRepository::create`], in one transaction.
    async fn try_create(
        &self,
        client: &mut deadpool_postgres::Object,
        consignment: &Consignment,
        key: Option<&str>,
        trace: &(Option<String>, Option<String>),
    ) -> Result<Created, Failure> {
        let transaction = client.transaction().await?;
        if let Some(key) = key
            && let Some(existing) = by_key(&transaction, key).await?
        {
            return Ok(Created { consignment: existing, replayed: true });
        }
        if !consignment.reservation_id.is_empty() {
            let settle = transaction
                .prepare_cached(
                    "INSERT INTO reservation_settlements (reservation_id, outcome, consignment_id)
                     VALUES ($1, 'stored', $2) ON CONFLICT (reservation_id) DO NOTHING",
                )
                .await?;
            if transaction.execute(&settle, &[&consignment.reservation_id, &consignment.id]).await? == 0 {
                drop(transaction);
                // Settled meanwhile: by another attempt that stored (then this is a replay of
                // it), or as abandoned.
                if let Some(key) = key
                    && let Some(existing) = by_key(&*client, key).await?
                {
                    return Ok(Created { consignment: existing, replayed: true });
                }
                return Err(Failure::Domain(RepositoryError::ReservationAbandoned(
                    consignment.reservation_id.clone(),
                )));
            }
        }
        // Consignments are stored one at a time across replicas, so positions (`seq`) become
        // visible in order and a watcher that has read up to one position never finds an
        // older one committed later.
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&STORE_ORDER_LOCK]).await?;
        let insert = transaction
            .prepare_cached(
                "INSERT INTO consignments (id, description, weight, vessel_id, idempotency_key, reservation_id)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
            )
            .await?;
        let seq: i64 = transaction
            .query_one(
                &insert,
                &[
                    &consignment.id,
                    &consignment.description,
                    &consignment.weight,
                    &consignment.vessel_id,
                    &key,
                    &consignment.reservation_id,
                ],
            )
            .await?
            .get(0);
        let container = transaction
            .prepare_cached(
                "INSERT INTO containers (consignment_seq, position, id, customer_id, origin, user_id)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        for (position, c) in consignment.containers.iter().enumerate() {
            let position = position as i32;
            transaction
                .execute(&container, &[&seq, &position, &c.id, &c.customer_id, &c.origin, &c.user_id])
                .await?;
        }
        let event = transaction
            .prepare_cached(
                "INSERT INTO outbox (topic, message_id, body, traceparent, tracestate) VALUES ($1, $2, $3, $4, $5)",
            )
            .await?;
        let body = prost::Message::encode_to_vec(consignment);
        transaction
            .execute(&event, &[&CONSIGNMENT_CREATED, &consignment.id, &body, &trace.0, &trace.1])
            .await?;
        transaction.commit().await?;
        Ok(Created { consignment: consignment.clone(), replayed: false })
    }
}

fn consignment_row(row: &Row) -> (i64, Consignment) {
    (
        row.get(0),
        Consignment {
            id: row.get(1),
            description: row.get(2),
            weight: row.get(3),
            vessel_id: row.get(4),
            containers: Vec::new(),
            reservation_id: row.get(5),
        },
    )
}

fn container_row(row: &Row, first: usize) -> Container {
    Container {
        id: row.get(first),
        customer_id: row.get(first + 1),
        origin: row.get(first + 2),
        user_id: row.get(first + 3),
    }
}

/// The consignment stored under `key`, containers included.
async fn by_key(
    client: &impl GenericClient,
    key: &str,
) -> Result<Option<Consignment>, tokio_postgres::Error> {
    let statement =
        client.prepare_cached(&format!("{SELECT_CONSIGNMENT} WHERE idempotency_key = $1")).await?;
    let Some(row) = client.query_opt(&statement, &[&key]).await? else { return Ok(None) };
    let (seq, mut consignment) = consignment_row(&row);
    let statement = client
        .prepare_cached(
            "SELECT id, customer_id, origin, user_id FROM containers WHERE consignment_seq = $1 ORDER BY position",
        )
        .await?;
    consignment.containers =
        client.query(&statement, &[&seq]).await?.iter().map(|row| container_row(row, 0)).collect();
    Ok(Some(consignment))
}

/// The name of the unique constraint `err` violated, if it is such a violation.
fn violated_constraint(err: &tokio_postgres::Error) -> Option<&str> {
    let db = err.as_db_error()?;
    (*db.code() == SqlState::UNIQUE_VIOLATION).then(|| db.constraint()).flatten()
}

#[tonic::async_trait]
impl ConsignmentRepository for PostgresRepository {
    fn database(&self) -> &str {
        &self.database
    }

    async fn schema_version(&self) -> Result<i64, RepositoryError> {
        let client = self.client().await?;
        shippy_postgres::schema_version(&client).await.map_err(|err| self.error(err))
    }

    async fn create(&self, consignment: Consignment, key: Option<&str>) -> Result<Created, RepositoryError> {
        let mut trace = micro_core::broker::current_trace_headers();
        let trace = (
            trace.remove(micro_core::broker::headers::TRACEPARENT),
            trace.remove(micro_core::broker::headers::TRACESTATE),
        );
        let mut client = self.client().await?;
        match self.try_create(&mut client, &consignment, key, &trace).await {
            Ok(created) => Ok(created),
            Err(Failure::Domain(err)) => Err(err),
            Err(Failure::Database(err)) => match violated_constraint(&err) {
                Some("consignments_idempotency_key_key") if key.is_some() => {
                    // Another replica stored under the key first: answer with its consignment.
                    let existing =
                        by_key(&client, key.unwrap_or_default()).await.map_err(|err| self.error(err))?;
                    existing
                        .map(|consignment| Created { consignment, replayed: true })
                        .ok_or_else(|| self.error(err))
                }
                Some("consignments_id_key") => Err(RepositoryError::DuplicateId(consignment.id.clone())),
                _ => Err(self.error(err)),
            },
        }
    }

    async fn settle(&self, reservation_id: &str) -> Result<Settled, RepositoryError> {
        let client = self.client().await?;
        let settled = async {
            let statement = client
                .prepare_cached(
                    "INSERT INTO reservation_settlements (reservation_id, outcome) VALUES ($1, 'abandoned')
                     ON CONFLICT (reservation_id) DO NOTHING",
                )
                .await?;
            client.execute(&statement, &[&reservation_id]).await?;
            let row = client
                .query_one(
                    "SELECT outcome, coalesce(consignment_id, '') FROM reservation_settlements WHERE reservation_id = $1",
                    &[&reservation_id],
                )
                .await?;
            let outcome: String = row.get(0);
            Ok::<_, tokio_postgres::Error>(match outcome.as_str() {
                "stored" => Settled::Stored(row.get(1)),
                _ => Settled::Abandoned,
            })
        }
        .await;
        settled.map_err(|err| self.error(err))
    }

    async fn unsent_events(&self, limit: usize) -> Result<Vec<OutboxEvent>, RepositoryError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, topic, message_id, body, traceparent, tracestate FROM outbox
                 WHERE sent_at IS NULL ORDER BY seq LIMIT $1",
                &[&(limit as i64)],
            )
            .await
            .map_err(|err| self.error(err))?;
        Ok(rows
            .iter()
            .map(|row| OutboxEvent {
                seq: row.get(0),
                topic: row.get(1),
                message_id: row.get(2),
                body: row.get(3),
                traceparent: row.get(4),
                tracestate: row.get(5),
            })
            .collect())
    }

    async fn mark_sent(&self, seq: i64) -> Result<(), RepositoryError> {
        let client = self.client().await?;
        client
            .execute("UPDATE outbox SET sent_at = now() WHERE seq = $1", &[&seq])
            .await
            .map(drop)
            .map_err(|err| self.error(err))
    }

    async fn lease_outbox(&self, holder: &str, lease: Duration) -> Result<bool, RepositoryError> {
        let client = self.client().await?;
        let lease_ms = lease.as_millis() as i64;
        let changed = client
            .execute(
                &format!(
                    "INSERT INTO outbox_lease (name, holder, until_ms) VALUES ('relay', $1, {NOW_MS} + $2)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                     WHERE outbox_lease.holder = excluded.holder OR outbox_lease.until_ms < {NOW_MS}"
                ),
                &[&holder, &lease_ms],
            )
            .await
            .map_err(|err| self.error(err))?;
        Ok(changed == 1)
    }

    async fn find_by_key(&self, key: &str) -> Result<Option<Consignment>, RepositoryError> {
        let client = self.client().await?;
        by_key(&client, key).await.map_err(|err| self.error(err))
    }

    async fn list(&self) -> Result<Vec<Consignment>, RepositoryError> {
        let listed = self.stored_after(0, usize::MAX).await?;
        Ok(listed.into_iter().map(|(_, consignment)| consignment).collect())
    }

    async fn position_of(&self, id: &str) -> Result<Option<i64>, RepositoryError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT seq FROM consignments WHERE id = $1", &[&id])
            .await
            .map_err(|err| self.error(err))?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn latest_position(&self) -> Result<i64, RepositoryError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(seq), 0)::bigint FROM consignments", &[])
            .await
            .map_err(|err| self.error(err))?;
        Ok(row.get(0))
    }

    async fn stored_after(
        &self,
        position: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Consignment)>, RepositoryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let read = async {
            // One snapshot for consignments and containers alike.
            let transaction = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let rows = transaction
                .query(
                    &format!("{SELECT_CONSIGNMENT} WHERE seq > $1 ORDER BY seq LIMIT $2"),
                    &[&position, &limit],
                )
                .await?;
            let mut consignments: Vec<(i64, Consignment)> = rows.iter().map(consignment_row).collect();
            if let Some(last) = consignments.last().map(|(seq, _)| *seq) {
                let rows = transaction
                    .query(
                        "SELECT consignment_seq, id, customer_id, origin, user_id FROM containers
                         WHERE consignment_seq > $1 AND consignment_seq <= $2
                         ORDER BY consignment_seq, position",
                        &[&position, &last],
                    )
                    .await?;
                let mut at = 0;
                for row in &rows {
                    let seq: i64 = row.get(0);
                    while at < consignments.len() && consignments[at].0 < seq {
                        at += 1;
                    }
                    if let Some((_, consignment)) = consignments.get_mut(at).filter(|(s, _)| *s == seq) {
                        consignment.containers.push(container_row(row, 1));
                    }
                }
            }
            transaction.commit().await?;
            Ok::<_, tokio_postgres::Error>(consignments)
        }
        .await;
        read.map_err(|err| self.error(err))
    }
}
