//! The bookings store on real SQLite files, and the fleet read through it.

use std::path::PathBuf;

use proto::vessel::{Specification, Vessel};

use super::*;
use crate::Fleet;

fn db_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join(DEFAULT_DB)
}

fn booking(consignment: &str, vessel: &str, containers: i64, weight: i64) -> Booking {
    Booking { consignment_id: consignment.into(), vessel_id: vessel.into(), containers, weight }
}

fn fleet(capacity: i32, max_weight: i32) -> Fleet {
    Fleet::new(vec![Vessel {
        id: "v1".into(),
        name: "v1".into(),
        capacity,
        max_weight,
        available: true,
        owner_id: String::new(),
    }])
}

#[tokio::test]
async fn a_consignment_is_booked_once_however_often_it_comes() {
    let store = BookingStore::in_memory().unwrap();
    let first = store.book(booking("c-1", "v1", 3, 100)).await.unwrap();
    assert!(first.fresh);
    // The same consignment again, even claiming another vessel or load: nothing new.
    let again = store.book(booking("c-1", "v2", 9, 900)).await.unwrap();
    assert_eq!(
        again,
        Booked { fresh: false, vessel_id: "v1".into(), vessel_load: Load { containers: 3, weight: 100 } }
    );
    assert_eq!(store.booking("c-1").await.unwrap(), Some(booking("c-1", "v1", 3, 100)));
    assert_eq!(
        *store.loads().await.unwrap(),
        HashMap::from([("v1".to_owned(), Load { containers: 3, weight: 100 })])
    );
}

#[tokio::test]
async fn racing_bookings_of_one_consignment_book_it_once() {
    let store = BookingStore::in_memory().unwrap();
    let books = (0..16).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.book(booking("c-1", "v1", 2, 10)).await })
    });
    let mut fresh = 0;
    for book in books {
        fresh += usize::from(book.await.unwrap().unwrap().fresh);
    }
    assert_eq!(fresh, 1);
    assert_eq!(store.loads().await.unwrap()["v1"], Load { containers: 2, weight: 10 });
}

#[tokio::test]
async fn bookings_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = BookingStore::open(db_in(&dir)).unwrap().instance("first");
    store.book(booking("c-1", "v1", 3, 100)).await.unwrap();
    store.book(booking("c-2", "v1", 1, 50)).await.unwrap();
    drop(store);

    let again = BookingStore::open(db_in(&dir)).unwrap();
    assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len() as i64);
    assert_eq!(again.loads().await.unwrap()["v1"], Load { containers: 4, weight: 150 });
    assert!(!again.book(booking("c-1", "v1", 3, 100)).await.unwrap().fresh);
    let booked_by: String = again
        .connection
        .lock()
        .unwrap()
        .query_row("SELECT booked_by FROM bookings WHERE consignment_id = 'c-1'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(booked_by, "first");
}

#[tokio::test]
async fn a_file_database_is_in_wal_mode_with_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = BookingStore::open(db_in(&dir)).unwrap();
    let connection = store.connection.lock().unwrap();
    let mode: String = connection.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    let sync: i64 = connection.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!((mode.as_str(), sync), ("wal", 2));
}

#[tokio::test]
async fn two_stores_on_one_file_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (BookingStore::open(db_in(&dir)).unwrap(), BookingStore::open(db_in(&dir)).unwrap());
    a.book(booking("c-1", "v1", 3, 100)).await.unwrap();
    assert_eq!(b.loads().await.unwrap()["v1"], Load { containers: 3, weight: 100 });
    assert_eq!(a.loads().await.unwrap()["v1"], Load { containers: 3, weight: 100 }, "read, and kept");
    // What one booked, the other will not book again; and its booking counts for both.
    assert!(!b.book(booking("c-1", "v1", 3, 100)).await.unwrap().fresh);
    let booked = b.book(booking("c-2", "v1", 2, 20)).await.unwrap();
    assert_eq!(booked.vessel_load, Load { containers: 5, weight: 120 });
    assert_eq!(a.loads().await.unwrap()["v1"], Load { containers: 5, weight: 120 }, "b's commit seen");
    // Its own booking too, although that leaves its connection's data_version as it was.
    a.book(booking("c-3", "v1", 1, 1)).await.unwrap();
    assert_eq!(a.loads().await.unwrap()["v1"], Load { containers: 6, weight: 121 });
}

#[tokio::test]
async fn two_stores_on_one_file_racing_on_one_consignment_book_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let stores = [BookingStore::open(db_in(&dir)).unwrap(), BookingStore::open(db_in(&dir)).unwrap()];
    let books = (0..16).map(|i| {
        let store = stores[i % 2].clone();
        tokio::spawn(async move { store.book(booking("c-1", "v1", 2, 10)).await })
    });
    let mut fresh = 0;
    for book in books {
        fresh += usize::from(book.await.unwrap().unwrap().fresh);
    }
    assert_eq!(fresh, 1);
}

#[tokio::test]
async fn a_full_vessel_is_not_offered() {
    let store = BookingStore::in_memory().unwrap();
    let fleet = fleet(10, 1_000);
    let spec = Specification { capacity: 4, max_weight: 100 };
    assert!(fleet.find_available(&spec, &store.loads().await.unwrap()).is_some());
    store.book(booking("c-1", "v1", 6, 100)).await.unwrap();
    assert!(fleet.find_available(&spec, &store.loads().await.unwrap()).is_some(), "exactly the 4 left");
    store.book(booking("c-2", "v1", 1, 100)).await.unwrap();
    assert!(fleet.find_available(&spec, &store.loads().await.unwrap()).is_none());
    // Bookings on another vessel do not count against it.
    let other = BookingStore::in_memory().unwrap();
    other.book(booking("c-1", "v2", 10, 1_000)).await.unwrap();
    assert!(fleet.find_available(&spec, &other.loads().await.unwrap()).is_some());
}

#[tokio::test]
async fn capacity_and_weight_are_both_counted() {
    let fleet = fleet(10, 1_000);
    let spec = Specification { capacity: 1, max_weight: 1 };
    let by_containers = BookingStore::in_memory().unwrap();
    by_containers.book(booking("c-1", "v1", 10, 1)).await.unwrap();
    assert!(fleet.find_available(&spec, &by_containers.loads().await.unwrap()).is_none(), "no slot left");
    let by_weight = BookingStore::in_memory().unwrap();
    by_weight.book(booking("c-1", "v1", 1, 1_000)).await.unwrap();
    assert!(fleet.find_available(&spec, &by_weight.loads().await.unwrap()).is_none(), "no weight left");
    let neither = BookingStore::in_memory().unwrap();
    neither.book(booking("c-1", "v1", 9, 999)).await.unwrap();
    assert!(fleet.find_available(&spec, &neither.loads().await.unwrap()).is_some(), "one slot and 1 left");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Connection::open(db_in(&dir)).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = BookingStore::open(db_in(&dir)).unwrap_err();
    assert!(matches!(err, BookingError::SchemaTooNew { found: 99, .. }), "{err:?}");
}

#[test]
fn memory_path_opens_an_in_memory_database() {
    assert_eq!(BookingStore::open(IN_MEMORY).unwrap().path(), IN_MEMORY);
}
