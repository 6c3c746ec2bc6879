//! The SQLite store on real files: migrations, reopening, racing writers.

use std::time::Duration;

use proto::vessel::Vessel;

use super::*;

fn vessel(capacity: i32, max_weight: i32) -> Vessel {
    Vessel {
        id: "v1".into(),
        name: "v1".into(),
        capacity,
        max_weight,
        available: true,
        owner_id: String::new(),
    }
}

fn hold(consignment: &str, key: Option<&str>, containers: i64, weight: i64) -> Hold {
    Hold {
        holder: "shipping".into(),
        request_key: key.map(str::to_owned),
        consignment_id: consignment.into(),
        containers,
        weight,
        ttl: Duration::from_secs(10),
    }
}

fn held(reserved: Reserved) -> Reservation {
    match reserved {
        Reserved::Held { reservation, .. } => reservation,
        Reserved::Full { loads } => panic!("expected room, got full: {loads:?}"),
    }
}

#[tokio::test]
async fn a_booking_without_a_reservation_is_made_once_however_often_it_comes() {
    let store = SqliteStore::in_memory().unwrap();
    assert!(store.book("c-1", "v1", 3, 100).await.unwrap().fresh);
    let again = store.book("c-1", "v2", 9, 900).await.unwrap();
    assert!(!again.fresh);
    assert_eq!(
        (again.reservation.vessel_id.as_str(), again.vessel_load),
        ("v1", Load { containers: 3, weight: 100 })
    );
    assert_eq!(
        *store.loads().await.unwrap(),
        HashMap::from([("v1".to_owned(), Load { containers: 3, weight: 100 })])
    );
}

#[tokio::test]
async fn racing_holds_on_one_file_from_two_stores_never_overbook() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DEFAULT_DB);
    // Two stores on one file: two instances on one host.
    let stores = [SqliteStore::open(&path).unwrap(), SqliteStore::open(&path).unwrap()];
    let attempts = (0..24).map(|n| {
        let store = stores[n % 2].clone();
        tokio::spawn(async move {
            store.reserve(hold(&format!("c-{n}"), None, 1, 55_000), vec![vessel(500, 200_000)]).await
        })
    });
    let mut fresh = 0;
    for attempt in attempts {
        fresh += usize::from(matches!(attempt.await.unwrap().unwrap(), Reserved::Held { .. }));
    }
    assert_eq!(fresh, 3);
    assert_eq!(stores[1].loads().await.unwrap()["v1"], Load { containers: 3, weight: 165_000 });
    assert_eq!(stores[0].query_i64("SELECT count(*) FROM reservations"), 3);
}

#[tokio::test]
async fn a_request_key_gets_its_live_hold_back_and_a_new_one_once_released() {
    let store = SqliteStore::in_memory().unwrap();
    let first = held(store.reserve(hold("c-1", Some("k"), 1, 1), vec![vessel(5, 5)]).await.unwrap());
    let again = held(store.reserve(hold("c-other", Some("k"), 1, 1), vec![vessel(5, 5)]).await.unwrap());
    assert_eq!(again, first);
    assert!(matches!(store.release(&first.id).await.unwrap(), Released::Released(_)));
    assert_eq!(store.release(&first.id).await.unwrap(), Released::Unknown);
    let fresh = held(store.reserve(hold("c-1", Some("k"), 1, 1), vec![vessel(5, 5)]).await.unwrap());
    assert_ne!(fresh.id, first.id);
    assert_eq!(store.loads().await.unwrap()["v1"], Load { containers: 1, weight: 1 });
}

#[tokio::test]
async fn holds_expire_and_confirmed_ones_never_do() {
    let store = SqliteStore::in_memory().unwrap();
    let short = |consignment: &str| Hold { ttl: Duration::ZERO, ..hold(consignment, None, 1, 1) };
    let lapsing = held(store.reserve(short("c-1"), vec![vessel(5, 5)]).await.unwrap());
    let confirmed = held(store.reserve(short("c-2"), vec![vessel(5, 5)]).await.unwrap());
    assert!(store.confirm(&confirmed.id).await.unwrap().unwrap().fresh);
    let expired = e2e_poll(|| async { store.expired(10).await.unwrap() }).await;
    assert_eq!(
        expired,
        vec![Expired { id: lapsing.id, holder: "shipping".into(), consignment_id: "c-1".into() }]
    );
}

/// Polls `read` until it returns something non-empty (the clock must pass an expiry).
async fn e2e_poll<T, F, Fut>(read: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<T>>,
{
    for _ in 0..1000 {
        let found = read().await;
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("nothing expired within 5 s");
}

#[tokio::test]
async fn bookings_of_schema_1_become_confirmed_reservations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DEFAULT_DB);
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection.execute_batch(sqlite::MIGRATIONS[0]).unwrap();
        connection.pragma_update(None, "user_version", 1).unwrap();
        connection
            .execute_batch(
                "INSERT INTO bookings (consignment_id, vessel_id, containers, weight, booked_by)
                 VALUES ('c-1', 'v1', 3, 100, 'old'), ('c-2', 'v1', 1, 50, 'old');",
            )
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().await.unwrap(), sqlite::MIGRATIONS.len() as i64);
    assert_eq!(store.loads().await.unwrap()["v1"], Load { containers: 4, weight: 150 });
    assert!(!store.book("c-1", "v1", 3, 100).await.unwrap().fresh, "booked under the same id as before");
    let full = store.reserve(hold("c-3", None, 2, 1), vec![vessel(5, 1000)]).await.unwrap();
    assert!(matches!(full, Reserved::Full { .. }), "4 of 5 containers taken: {full:?}");
}

#[tokio::test]
async fn reservations_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DEFAULT_DB);
    let store = SqliteStore::open(&path).unwrap();
    let kept = held(store.reserve(hold("c-1", None, 2, 2), vec![vessel(5, 5)]).await.unwrap());
    drop(store);
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.reservation(&kept.id).await.unwrap(), Some(kept));
    assert_eq!(again.query_i64("PRAGMA synchronous"), 2, "FULL");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DEFAULT_DB);
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err:?}");
}
