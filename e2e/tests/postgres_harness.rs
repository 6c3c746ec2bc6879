//! The PostgreSQL harness itself (`e2e::postgres`): a real server with databases kept apart,
//! one shared server per test binary, a server on a host of an `e2e::hosts::Network`
//! reached from another host, and a dropped server no longer listening.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use e2e::{hosts::Network, postgres::PostgresServer, unique_name};

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("e2e=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

#[test]
fn two_databases_keep_their_own_rows_and_a_dropped_server_stops_listening() {
    e2e::require_private_netns();
    init_logs();
    let server = PostgresServer::start();
    let (vessels, consignments) = (unique_name("vessels"), unique_name("consignments"));
    let vessels_url = server.create_database(&vessels);
    let consignments_url = server.create_database(&consignments);
    assert_eq!(vessels_url, format!("postgres://shippy@127.0.0.1:{}/{vessels}", server.port()));
    assert_eq!(consignments_url, server.url(&consignments));

    server.query(&vessels, "create table vessel (id text primary key, capacity int)");
    server.query(&vessels, "insert into vessel values ('v1', 500), ('v2', 40)");
    server.query(&consignments, "create table consignment (id text primary key, weight int)");
    server.query(&consignments, "insert into consignment values ('c1', 55000)");

    assert_eq!(server.query(&vessels, "select id, capacity from vessel order by id"), "v1|500\nv2|40");
    assert_eq!(server.query(&consignments, "select id || ':' || weight from consignment"), "c1:55000");
    // Each database has only its own table.
    assert_eq!(server.query(&vessels, "select count(*) from pg_tables where tablename = 'consignment'"), "0");
    assert_eq!(server.query(&consignments, "select count(*) from pg_tables where tablename = 'vessel'"), "0");
    assert_eq!(server.query(&vessels, "select current_user"), "shippy");

    let address = SocketAddr::from((server.address(), server.port()));
    drop(server);
    let refused = TcpStream::connect_timeout(&address, Duration::from_secs(2));
    assert!(refused.is_err(), "the dropped server still listens on {address}");
}

#[test]
fn the_shared_server_is_one_per_test_binary() {
    e2e::require_private_netns();
    init_logs();
    let (first, second) = (PostgresServer::shared(), PostgresServer::shared());
    assert!(std::ptr::eq(first, second));
    let db = unique_name("shared");
    first.create_database(&db);
    first.query(&db, "create table t (n int); insert into t values (7)");
    assert_eq!(second.query(&db, "select n from t"), "7");
}

#[test]
fn a_server_on_a_host_answers_psql_from_another_host() {
    e2e::require_private_netns();
    init_logs();
    let network = Network::new(2);
    let server = PostgresServer::start_on(network.host(0));
    let db = unique_name("remote");
    let url = server.create_database(&db);
    assert_eq!(url, format!("postgres://shippy@{}:5432/{db}", network.host(0).address()));
    server.query(&db, "create table vessel (id text); insert into vessel values ('boaty')");

    let output = network
        .host(1)
        .command(server.binary("psql"))
        .arg("-XAt")
        .args(["-v", "ON_ERROR_STOP=1", "-w", "-d", &url])
        .args(["-c", "select id || '@' || host(inet_client_addr()) from vessel"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql on host 1");
    assert!(output.status.success(), "psql from host 1: {}", String::from_utf8_lossy(&output.stderr));
    let answer = String::from_utf8_lossy(&output.stdout);
    // The row, read over the bridge from host 1's address.
    assert_eq!(answer.trim_end(), format!("boaty@{}", network.host(1).address()));
}
