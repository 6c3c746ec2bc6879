//! What shippy's services share on SQLite: [`open_wal`] opens a database file in WAL mode
//! (a commit appends to the log; readers never block the writer) with `synchronous = FULL`
//! (the log is synced at every commit, so an answered write survives a crash or power
//! loss), waiting out the locks of replicas that open the same file at the same moment.
//!
//! # Examples
//! ```no_run
//! let (connection, journal_mode) =
//!     shippy_sqlite::open_wal("things.db", std::time::Duration::from_secs(5)).expect("opened");
//! assert_eq!(journal_mode, "wal");
//! ```

use std::{
    path::Path,
    time::{Duration, Instant},
};

use rusqlite::{Connection, ErrorCode};

/// Opens (or creates) the database at `path`, waits up to `busy_timeout` for a lock another
/// connection holds, and asks for WAL mode and full sync. Returns the connection and the
/// journal mode the file is in: `wal`, unless the file system cannot hold a WAL (then the
/// caller may warn).
pub fn open_wal(path: impl AsRef<Path>, busy_timeout: Duration) -> rusqlite::Result<(Connection, String)> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(busy_timeout)?;
    let mode: String = again_while_busy(busy_timeout, || {
        connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
    })?;
    again_while_busy(busy_timeout, || connection.pragma_update(None, "synchronous", "FULL"))?;
    Ok((connection, mode.to_ascii_lowercase()))
}

/// Runs `step` again while another connection holds the lock it needs, for up to `limit`:
/// switching a new file to WAL fails at once, rather than waiting in the busy handler, when
/// replicas open it together.
fn again_while_busy<T>(
    limit: Duration,
    mut step: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            outcome => return outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_opening_one_new_file_at_once_all_open_it_in_wal_mode_with_full_sync() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("shared.db");
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                let opening: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| -> rusqlite::Result<(String, i64)> {
                            start.wait();
                            let (connection, mode) = open_wal(&path, Duration::from_secs(5))?;
                            // A write each, as a replica's migrations are.
                            connection.execute_batch(
                                "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS t (n INTEGER); INSERT INTO t VALUES (1); COMMIT;",
                            )?;
                            let sync: i64 = connection.query_row("PRAGMA synchronous", [], |row| row.get(0))?;
                            Ok((mode, sync))
                        })
                    })
                    .collect();
                for replica in opening {
                    let opened = replica.join().unwrap().expect("each replica opens the database");
                    assert_eq!(opened, ("wal".to_owned(), 2), "WAL mode, synchronous FULL");
                }
            });
        }
    }
}
