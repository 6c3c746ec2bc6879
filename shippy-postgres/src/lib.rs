//! What shippy's services share on PostgreSQL: a connection pool with the session settings
//! both need, versioned migrations applied once however many replicas start together, and
//! addresses shown without their password.
//!
//! - Each session ends a transaction whose client went silent (a host partitioned mid-way)
//!   after 5 s, so the rows it locked are not held for the TCP timeout, and gives up a lock
//!   wait after 5 s (the call fails and is retried) rather than waiting on.
//! - Migrations are numbered steps recorded in `schema_migrations`, run in one transaction
//!   under an advisory lock; a step is never edited once released, only appended.
//!
//! Driver: `tokio-postgres` with a `deadpool-postgres` pool, over plain TCP.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> Result<(), shippy_postgres::PostgresError> {
//! let migrations = ["CREATE TABLE things (id TEXT PRIMARY KEY)"];
//! let pool = shippy_postgres::connect("postgres://shippy@10.0.0.5/things", &migrations, 42, "things").await?;
//! let client = pool.get().await.expect("a connection");
//! # Ok(()) }
//! ```

use std::time::Duration;

use deadpool_postgres::{Pool, Runtime};
use tokio_postgres::{NoTls, error::SqlState};

pub use deadpool_postgres;
pub use tokio_postgres;

/// Connections a pool keeps at most.
pub const POOL_SIZE: usize = 16;
/// See the module docs.
const SESSION_OPTIONS: &str = "-c idle_in_transaction_session_timeout=5000 -c lock_timeout=5000";
/// TCP keepalive on idle pool connections, so a dead server is noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The address is not a usable `postgres://` URL.
    #[error("database {database:?}: {why}")]
    BadAddress {
        /// The address, without its password.
        database: String,
        /// What is wrong with it.
        why: String,
    },
    /// The server could not be reached, or refused a step.
    #[error("database {database}")]
    Server {
        /// The address, without its password.
        database: String,
        /// What the server or driver said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database was migrated by a newer version of the service.
    #[error("database {database}: schema version {found} is newer than this binary knows ({known})")]
    SchemaTooNew {
        /// The address, without its password.
        database: String,
        /// The version found.
        found: i64,
        /// The newest this binary can migrate to.
        known: i64,
    },
}

/// `url` with its password, if any, replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((credentials, host)) = rest.rsplit_once('@') else { return url.to_owned() };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Whether `database` names PostgreSQL (`postgres://` or `postgresql://`).
pub fn is_postgres(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// Whether `err` lost a race that trying again resolves: a unique key taken meanwhile, a
/// serialization failure or a deadlock.
pub fn lost_race(err: &tokio_postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(code) if *code == SqlState::UNIQUE_VIOLATION
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// A pool for the database at `url` (`postgres://user[:password]@host[:port]/name`), its
/// schema brought to the last of `migrations` under the advisory lock `lock` (one number
/// per service); `what` names the database in logs. Fails when the server cannot be reached.
pub async fn connect(url: &str, migrations: &[&str], lock: i64, what: &str) -> Result<Pool, PostgresError> {
    let database = redacted(url);
    let bad = |why: String| PostgresError::BadAddress { database: database.clone(), why };
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|err: tokio_postgres::Error| bad(err.to_string()))?;
    config.options(SESSION_OPTIONS).keepalives_idle(KEEPALIVE_IDLE);
    let manager = deadpool_postgres::Manager::from_config(
        config,
        NoTls,
        deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
    );
    let pool = Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|err| bad(err.to_string()))?;
    migrate(&pool, &database, migrations, lock, what).await?;
    Ok(pool)
}

/// The schema version the database is at.
pub async fn schema_version(client: &deadpool_postgres::Object) -> Result<i64, tokio_postgres::Error> {
    Ok(client.query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[]).await?.get(0))
}

async fn migrate(
    pool: &Pool,
    database: &str,
    migrations: &[&str],
    lock: i64,
    what: &str,
) -> Result<(), PostgresError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| PostgresError::Server {
        database: database.to_owned(),
        source,
    };
    let mut client = pool.get().await.map_err(|err| failed(Box::new(err)))?;
    let transaction = client.transaction().await.map_err(|err| failed(Box::new(err)))?;
    let found: i64 = async {
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&lock]).await?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    BIGINT      PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        Ok::<_, tokio_postgres::Error>(
            transaction
                .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
                .await?
                .get(0),
        )
    }
    .await
    .map_err(|err| failed(Box::new(err)))?;
    let known = migrations.len() as i64;
    if found > known {
        return Err(PostgresError::SchemaTooNew { database: database.to_owned(), found, known });
    }
    for (version, step) in migrations.iter().enumerate().skip(found as usize) {
        let next = version as i64 + 1;
        async {
            transaction.batch_execute(step).await?;
            transaction.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&next]).await
        }
        .await
        .map_err(|err| failed(Box::new(err)))?;
        tracing::info!(%database, version = next, "{what} database migrated");
    }
    transaction.commit().await.map_err(|err| failed(Box::new(err)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        assert_eq!(redacted("postgres://shippy:secret@db:5432/v"), "postgres://shippy:***@db:5432/v");
        assert_eq!(redacted("postgres://shippy@db/v"), "postgres://shippy@db/v");
        assert_eq!(redacted("postgresql://db/v"), "postgresql://db/v");
        assert!(is_postgres("postgresql://db/v") && !is_postgres("vessels.db"));
    }
}
