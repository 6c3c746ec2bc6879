//! [`PostgresStore`]: reservations in a PostgreSQL database, shared by vessel-service
//! instances on any hosts.
//!
//! A reservation is one transaction at PostgreSQL's default isolation (read committed): the
//! vessel's running total is raised by a conditional `UPDATE ... WHERE containers + n <=
//! capacity AND weight + w <= max_weight`, which takes the total's row lock and checks the
//! condition against the newest committed total, so two instances never both take the last
//! room; the reservation's row is written in the same transaction. Two requests racing with
//! one holder and request key meet at a unique index: the second retries and finds the
//! first's reservation. The schema is created or migrated at start, under an advisory lock
//! so instances starting together migrate once.
//!
//! The pool, session settings and migrations are [`shippy_postgres`]'s.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> Result<(), vessel_service::store::StoreError> {
//! use vessel_service::store::{PostgresStore, ReservationStore};
//! let store = PostgresStore::connect("postgres://shippy@10.0.0.5:5432/vessels").await?;
//! println!("{} at schema {}", store.database(), store.schema_version().await?);
//! # Ok(()) }
//! ```

use std::{collections::HashMap, sync::Arc};

use proto::vessel::Vessel;
use shippy_postgres::{
    PostgresError,
    deadpool_postgres::{self, GenericClient, Pool},
    lost_race, redacted,
    tokio_postgres::{self, Row},
};

use super::{
    Booked, CONFIRMED, Expired, HELD, Hold, Load, Released, Reservation, ReservationStore, Reserved,
    StoreError, new_reservation_id, this_instance, unreserved_booking_id,
};

/// How often a transaction that lost a race (a unique key, a deadlock) is tried again.
const ATTEMPTS: usize = 5;
/// The advisory lock migrations take, so instances starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7665_7373_656c; // "vessel"

/// The schema, one step per version, recorded in `schema_migrations`; a step is never
/// edited once released, only new steps are appended.
const MIGRATIONS: &[&str] = &[
    // 1: reservations (held until confirmed, or booked for good) and each vessel's total.
    "CREATE TABLE reservations (
         id             TEXT        PRIMARY KEY,
         vessel_id      TEXT        NOT NULL,
         consignment_id TEXT        NOT NULL,
         containers     BIGINT      NOT NULL,
         weight         BIGINT      NOT NULL,
         holder         TEXT        NOT NULL,
         request_key    TEXT,
         state          TEXT        NOT NULL CHECK (state IN ('held', 'confirmed')),
         expires_at_ms  BIGINT,
         made_by        TEXT        NOT NULL,
         made_at        TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE UNIQUE INDEX reservations_by_request ON reservations (holder, request_key);
     CREATE INDEX reservations_by_consignment ON reservations (consignment_id);
     CREATE INDEX reservations_expiring ON reservations (expires_at_ms) WHERE state = 'held';
     CREATE TABLE vessel_loads (
         vessel_id  TEXT   PRIMARY KEY,
         containers BIGINT NOT NULL,
         weight     BIGINT NOT NULL
     );",
];

/// Milliseconds since the Unix epoch by the database's clock, so every host agrees on when
/// a hold expires.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const SELECT_RESERVATION: &str = "SELECT id, vessel_id, consignment_id, containers, weight, holder, state, expires_at_ms FROM reservations";

/// Reservations in PostgreSQL; see the module docs.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    database: String,
    instance: String,
    /// The vessels whose running-total row is known to exist (the fleet's, so bounded).
    ensured: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("database", &self.database).finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/name`),
    /// then creates or migrates the schema. Fails when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = shippy_postgres::connect(url, MIGRATIONS, MIGRATION_LOCK, "reservations").await.map_err(
            |err| match err {
                PostgresError::SchemaTooNew { found, known, .. } => StoreError::SchemaTooNew { found, known },
                PostgresError::BadAddress { database, why } => StoreError::BadAddress { database, why },
                other => StoreError::Database { database: redacted(url), source: Box::new(other) },
            },
        )?;
        Ok(PostgresStore {
            pool,
            database: redacted(url),
            instance: this_instance(),
            ensured: Arc::default(),
        })
    }

    fn error(&self, source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Database { database: self.database.clone(), source: Box::new(source) }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|err| self.error(err))
    }
}

fn reservation_row(row: &Row) -> Reservation {
    Reservation {
        id: row.get(0),
        vessel_id: row.get(1),
        consignment_id: row.get(2),
        containers: row.get(3),
        weight: row.get(4),
        holder: row.get(5),
        state: row.get(6),
        expires_at_ms: row.get(7),
    }
}

fn load_row(row: &Row) -> Load {
    Load { containers: row.get(0), weight: row.get(1) }
}

async fn load_of(client: &impl GenericClient, vessel_id: &str) -> Result<Load, tokio_postgres::Error> {
    let statement =
        client.prepare_cached("SELECT containers, weight FROM vessel_loads WHERE vessel_id = $1").await?;
    Ok(client.query_opt(&statement, &[&vessel_id]).await?.as_ref().map(load_row).unwrap_or_default())
}

async fn reservation_by_id(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<Reservation>, tokio_postgres::Error> {
    let statement = client.prepare_cached(&format!("{SELECT_RESERVATION} WHERE id = $1")).await?;
    Ok(client.query_opt(&statement, &[&id]).await?.as_ref().map(reservation_row))
}

async fn add_load(
    client: &impl GenericClient,
    vessel_id: &str,
    containers: i64,
    weight: i64,
) -> Result<Load, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "INSERT INTO vessel_loads (vessel_id, containers, weight) VALUES ($1, $2, $3)
             ON CONFLICT (vessel_id) DO UPDATE SET containers = vessel_loads.containers + excluded.containers,
                                                   weight = vessel_loads.weight + excluded.weight
             RETURNING containers, weight",
        )
        .await?;
    Ok(load_row(&client.query_one(&statement, &[&vessel_id, &containers, &weight]).await?))
}

impl PostgresStore {
    /// One reservation attempt. The room is taken and the hold written by one statement
    /// (a single implicit transaction), so the vessel's row lock is held for that statement
    /// alone; a hold racing under the same holder and key fails on the unique index, rolls
    /// back whole, and the next attempt finds it.
    async fn try_reserve(
        &self,
        client: &mut deadpool_postgres::Object,
        hold: &Hold,
        candidates: &[Vessel],
    ) -> Result<Reserved, tokio_postgres::Error> {
        if let Some(key) = &hold.request_key {
            let statement = client
                .prepare_cached(&format!("{SELECT_RESERVATION} WHERE holder = $1 AND request_key = $2"))
                .await?;
            if let Some(row) = client.query_opt(&statement, &[&hold.holder, key]).await? {
                let reservation = reservation_row(&row);
                let vessel_load = load_of(&*client, &reservation.vessel_id).await?;
                return Ok(Reserved::Held { reservation, fresh: false, vessel_load });
            }
        }
        let take = client
            .prepare_cached(&format!(
                "WITH taken AS (
                     UPDATE vessel_loads SET containers = containers + $2, weight = weight + $3
                     WHERE vessel_id = $1 AND containers + $2 <= $4 AND weight + $3 <= $5
                     RETURNING containers, weight
                 ), held AS (
                     INSERT INTO reservations (id, vessel_id, consignment_id, containers, weight, holder,
                                               request_key, state, expires_at_ms, made_by)
                     SELECT $6, $1, $7, $2, $3, $8, $9, 'held', {NOW_MS} + $10, $11 FROM taken
                     RETURNING expires_at_ms
                 )
                 SELECT taken.containers, taken.weight, held.expires_at_ms FROM taken, held"
            ))
            .await?;
        let mut loads = Vec::with_capacity(candidates.len());
        for vessel in candidates {
            self.ensure_load_row(client, &vessel.id).await?;
            let (capacity, max_weight) = (i64::from(vessel.capacity), i64::from(vessel.max_weight));
            let id = new_reservation_id();
            let ttl_ms = hold.ttl.as_millis() as i64;
            let taken = client
                .query_opt(
                    &take,
                    &[
                        &vessel.id,
                        &hold.containers,
                        &hold.weight,
                        &capacity,
                        &max_weight,
                        &id,
                        &hold.consignment_id,
                        &hold.holder,
                        &hold.request_key,
                        &ttl_ms,
                        &self.instance,
                    ],
                )
                .await?;
            let Some(row) = taken else {
                loads.push((vessel.id.clone(), load_of(&*client, &vessel.id).await?));
                continue;
            };
            let reservation = Reservation {
                id,
                vessel_id: vessel.id.clone(),
                consignment_id: hold.consignment_id.clone(),
                containers: hold.containers,
                weight: hold.weight,
                holder: hold.holder.clone(),
                state: HELD.to_owned(),
                expires_at_ms: Some(row.get(2)),
            };
            return Ok(Reserved::Held {
                reservation,
                fresh: true,
                vessel_load: Load { containers: row.get(0), weight: row.get(1) },
            });
        }
        Ok(Reserved::Full { loads })
    }

    /// Makes sure `vessel_id` has a running total to update (once per vessel and process).
    async fn ensure_load_row(
        &self,
        client: &deadpool_postgres::Object,
        vessel_id: &str,
    ) -> Result<(), tokio_postgres::Error> {
        if self.ensured.lock().unwrap_or_else(|e| e.into_inner()).contains(vessel_id) {
            return Ok(());
        }
        let ensure = client
            .prepare_cached(
                "INSERT INTO vessel_loads (vessel_id, containers, weight) VALUES ($1, 0, 0)
                 ON CONFLICT (vessel_id) DO NOTHING",
            )
            .await?;
        client.execute(&ensure, &[&vessel_id]).await?;
        self.ensured.lock().unwrap_or_else(|e| e.into_inner()).insert(vessel_id.to_owned());
        Ok(())
    }

    async fn try_book(
        &self,
        client: &mut deadpool_postgres::Object,
        consignment_id: &str,
        vessel_id: &str,
        containers: i64,
        weight: i64,
    ) -> Result<Booked, tokio_postgres::Error> {
        let transaction = client.transaction().await?;
        let id = unreserved_booking_id(consignment_id);
        let statement = transaction
            .prepare_cached(
                "INSERT INTO reservations (id, vessel_id, consignment_id, containers, weight, holder, state, made_by)
                 VALUES ($1, $2, $3, $4, $5, '', 'confirmed', $6) ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let inserted = transaction
            .execute(&statement, &[&id, &vessel_id, &consignment_id, &containers, &weight, &self.instance])
            .await?;
        if inserted == 1 {
            add_load(&transaction, vessel_id, containers, weight).await?;
        }
        let reservation =
            reservation_by_id(&transaction, &id).await?.expect("the booking just written or found");
        let vessel_load = load_of(&transaction, &reservation.vessel_id).await?;
        transaction.commit().await?;
        Ok(Booked { reservation, fresh: inserted == 1, vessel_load })
    }
}

#[tonic::async_trait]
impl ReservationStore for PostgresStore {
    fn database(&self) -> &str {
        &self.database
    }

    async fn schema_version(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        shippy_postgres::schema_version(&client).await.map_err(|err| self.error(err))
    }

    async fn reserve(&self, hold: Hold, candidates: Vec<Vessel>) -> Result<Reserved, StoreError> {
        let mut client = self.client().await?;
        let mut attempt = 1;
        loop {
            match self.try_reserve(&mut client, &hold, &candidates).await {
                Err(err) if lost_race(&err) && attempt < ATTEMPTS => attempt += 1,
                other => return other.map_err(|err| self.error(err)),
            }
        }
    }

    async fn confirm(&self, id: &str) -> Result<Option<Booked>, StoreError> {
        let client = self.client().await?;
        let confirmed = async {
            let statement = client
                .prepare_cached(
                    "UPDATE reservations SET state = 'confirmed', expires_at_ms = NULL
                     WHERE id = $1 AND state = 'held'
                     RETURNING id, vessel_id, consignment_id, containers, weight, holder, state, expires_at_ms",
                )
                .await?;
            if let Some(row) = client.query_opt(&statement, &[&id]).await? {
                let reservation = reservation_row(&row);
                let vessel_load = load_of(&client, &reservation.vessel_id).await?;
                return Ok(Some(Booked { reservation, fresh: true, vessel_load }));
            }
            let Some(reservation) = reservation_by_id(&client, id).await? else { return Ok(None) };
            let vessel_load = load_of(&client, &reservation.vessel_id).await?;
            debug_assert_eq!(reservation.state, CONFIRMED);
            Ok::<_, tokio_postgres::Error>(Some(Booked { reservation, fresh: false, vessel_load }))
        }
        .await;
        confirmed.map_err(|err| self.error(err))
    }

    async fn release(&self, id: &str) -> Result<Released, StoreError> {
        let mut client = self.client().await?;
        let released = async {
            let transaction = client.transaction().await?;
            let statement = transaction
                .prepare_cached(
                    "DELETE FROM reservations WHERE id = $1 AND state = 'held'
                     RETURNING id, vessel_id, consignment_id, containers, weight, holder, state, expires_at_ms",
                )
                .await?;
            let outcome = match transaction.query_opt(&statement, &[&id]).await? {
                Some(row) => {
                    let reservation = reservation_row(&row);
                    add_load(&transaction, &reservation.vessel_id, -reservation.containers, -reservation.weight)
                        .await?;
                    Released::Released(reservation)
                }
                None => match reservation_by_id(&transaction, id).await? {
                    Some(reservation) => Released::Confirmed(reservation),
                    None => Released::Unknown,
                },
            };
            transaction.commit().await?;
            Ok::<_, tokio_postgres::Error>(outcome)
        }
        .await;
        released.map_err(|err| self.error(err))
    }

    async fn book(
        &self,
        consignment_id: &str,
        vessel_id: &str,
        containers: i64,
        weight: i64,
    ) -> Result<Booked, StoreError> {
        let mut client = self.client().await?;
        let mut attempt = 1;
        loop {
            match self.try_book(&mut client, consignment_id, vessel_id, containers, weight).await {
                Err(err) if lost_race(&err) && attempt < ATTEMPTS => attempt += 1,
                other => return other.map_err(|err| self.error(err)),
            }
        }
    }

    async fn expired(&self, limit: usize) -> Result<Vec<Expired>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, holder, consignment_id FROM reservations
                     WHERE state = 'held' AND expires_at_ms < {NOW_MS} ORDER BY expires_at_ms LIMIT $1"
                ),
                &[&(limit as i64)],
            )
            .await
            .map_err(|err| self.error(err))?;
        Ok(rows
            .iter()
            .map(|row| Expired { id: row.get(0), holder: row.get(1), consignment_id: row.get(2) })
            .collect())
    }

    async fn loads(&self) -> Result<Arc<HashMap<String, Load>>, StoreError> {
        let client = self.client().await?;
        let loads = async {
            let statement = client
                .prepare_cached("SELECT containers, weight, vessel_id FROM vessel_loads WHERE containers > 0 OR weight > 0")
                .await?;
            let rows = client.query(&statement, &[]).await?;
            Ok::<_, tokio_postgres::Error>(rows.iter().map(|row| (row.get(2), load_row(row))).collect())
        }
        .await;
        loads.map(Arc::new).map_err(|err| self.error(err))
    }

    async fn reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError> {
        let client = self.client().await?;
        reservation_by_id(&client, id).await.map_err(|err| self.error(err))
    }

    async fn reservations_for(&self, consignment_id: &str) -> Result<Vec<Reservation>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(&format!("{SELECT_RESERVATION} WHERE consignment_id = $1 ORDER BY id"), &[&consignment_id])
            .await
            .map_err(|err| self.error(err))?;
        Ok(rows.iter().map(reservation_row).collect())
    }
}
