//! The deploy files in `docker/` stay valid without a Docker engine: the compose file is
//! read as YAML and checked against the real binaries' flags, each Dockerfile is read
//! line by line, and when a `docker` client with the compose plugin is on PATH, `docker
//! compose config` checks the compose file too (it needs no engine). Starts no container.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use e2e::process::{binary, workspace_root};
use serde_norway::{Mapping, Value};

const COMPOSE_FILE: &str = "docker/compose.yaml";

/// Read by the binaries but not a clap flag, so absent from `--help` (see README.md,
/// Configuration).
const ENV_READ_OUTSIDE_CLAP: [&str; 1] = ["RUST_LOG"];

// ---------------------------------------------------------------------------------------
// The compose file

fn compose() -> Value {
    let path = workspace_root().join(COMPOSE_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{COMPOSE_FILE} is not valid YAML: {e}"))
}

fn services(compose: &Value) -> &Mapping {
    compose.get("services").and_then(Value::as_mapping).expect("compose file has `services`")
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// A service's `environment`, in either form compose accepts (a map or `KEY=value` list).
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|entry| {
                let entry = text(entry);
                let (key, value) = entry.split_once('=').unwrap_or((&entry, ""));
                (key.to_owned(), value.to_owned())
            })
            .collect(),
        Some(other) => panic!("`environment` must be a map or a list, got {other:?}"),
    }
}

/// The Dockerfile a service builds from: `build.context` relative to the compose file's
/// folder, `build.dockerfile` relative to the context.
fn dockerfile_of(service: &Value) -> Option<PathBuf> {
    let build = service.get("build")?;
    let compose_dir = workspace_root().join(COMPOSE_FILE).parent().unwrap().to_path_buf();
    let (context, dockerfile) = match build {
        Value::String(context) => (context.clone(), "Dockerfile".to_owned()),
        build => (
            build.get("context").map_or(".".to_owned(), text),
            build.get("dockerfile").map_or("Dockerfile".to_owned(), text),
        ),
    };
    Some(compose_dir.join(context).join(dockerfile))
}

fn replicas(service: &Value) -> u64 {
    service.get("deploy").and_then(|d| d.get("replicas")).and_then(Value::as_u64).unwrap_or(1)
}

// ---------------------------------------------------------------------------------------
// Dockerfiles

/// One build stage: its base image (global `ARG` defaults substituted) and instructions.
#[derive(Debug)]
struct Stage {
    image: String,
    instructions: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        self.instructions.iter().filter(move |(k, _)| k == keyword).map(|(_, rest)| rest.as_str())
    }
}

/// A Dockerfile's stages, read as Docker does: comment lines dropped, `\` continuations
/// joined, `${ARG}` in `FROM` taken from the `ARG` defaults before the first `FROM`.
fn stages(path: &Path) -> Vec<Stage> {
    let source = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "{}: ends inside a `\\` continuation", path.display());

    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in lines {
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let (keyword, rest) = (keyword.to_ascii_uppercase(), rest.trim().to_owned());
        if keyword == "FROM" {
            let mut image = rest.split_whitespace().next().expect("FROM names an image").to_owned();
            for (name, value) in &args {
                image = image.replace(&format!("${{{name}}}"), value);
            }
            stages.push(Stage { image, instructions: Vec::new() });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((keyword, rest));
        } else if keyword == "ARG" {
            let (name, value) = rest.split_once('=').unwrap_or((&rest, ""));
            args.insert(name.to_owned(), value.to_owned());
        }
    }
    stages
}

/// The `(package, bin)` pairs a `RUN` line builds, each with `--release --locked`.
fn cargo_builds(run: &str) -> Vec<(String, String)> {
    run.split("&&")
        .filter_map(|command| {
            let words: Vec<&str> = command.split_whitespace().skip_while(|w| *w != "cargo").collect();
            if words.get(1) != Some(&"build") {
                return None;
            }
            let after = |flag: &str| {
                let at = words.iter().position(|w| *w == flag);
                at.and_then(|i| words.get(i + 1)).map(|w| w.to_string())
            };
            assert!(
                words.contains(&"--release") && words.contains(&"--locked"),
                "`{command}` must build with --release --locked"
            );
            let package = after("-p").or_else(|| after("--package"));
            let bin = after("--bin");
            Some((
                package.unwrap_or_else(|| panic!("`{command}` names no package (-p)")),
                bin.unwrap_or_else(|| panic!("`{command}` names no binary (--bin)")),
            ))
        })
        .collect()
}

/// The binary the image runs: the first word of its exec-form `ENTRYPOINT`.
fn entrypoint_binary(stage: &Stage) -> String {
    let entrypoint = stage.all("ENTRYPOINT").last().expect("the final stage has an ENTRYPOINT");
    let words: Vec<String> = serde_json::from_str(entrypoint)
        .unwrap_or_else(|e| panic!("ENTRYPOINT {entrypoint} is not exec form (a JSON list): {e}"));
    let program = words.first().expect("ENTRYPOINT names a program");
    Path::new(program).file_name().unwrap().to_string_lossy().into_owned()
}

/// `KEY=value` pairs of the stage's `ENV` lines.
fn env_lines(stage: &Stage) -> BTreeMap<String, String> {
    stage
        .all("ENV")
        .flat_map(|rest| rest.split_whitespace())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}: use KEY=value"));
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn dockerfiles() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("docker"))
        .expect("docker/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "Dockerfile"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no docker/*.Dockerfile");
    files
}

// ---------------------------------------------------------------------------------------
// What the workspace really has

/// The workspace's packages and the binaries each one builds, from `cargo metadata`.
fn workspace_bins() -> &'static BTreeMap<String, BTreeSet<String>> {
    static BINS: OnceLock<BTreeMap<String, BTreeSet<String>>> = OnceLock::new();
    BINS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let output = Command::new(cargo)
            .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
            .arg(workspace_root().join("Cargo.toml"))
            .output()
            .expect("cargo metadata runs");
        assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
        let metadata: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
        metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|package| {
                let bins = package["targets"]
                    .as_array()
                    .expect("targets")
                    .iter()
                    .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
                    .map(|t| t["name"].as_str().unwrap().to_owned())
                    .collect();
                (package["name"].as_str().unwrap().to_owned(), bins)
            })
            .collect()
    })
}

/// The environment variables `bin` reads: each `[env: NAME…]` of its `--help`, plus the
/// ones read outside clap.
fn env_names_read_by(bin: &str) -> BTreeSet<String> {
    let output = Command::new(binary(bin)).arg("--help").output().expect("--help runs");
    assert!(output.status.success(), "{bin} --help failed");
    let help = String::from_utf8_lossy(&output.stdout);
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect()
        })
        .collect();
    assert!(names.contains("MICRO_REGISTRY"), "{bin} --help lists no MICRO_REGISTRY: {help}");
    names.extend(ENV_READ_OUTSIDE_CLAP.map(str::to_owned));
    names
}

fn rust_version() -> (u32, u32) {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let line = manifest.lines().find(|l| l.trim_start().starts_with("rust-version")).expect("rust-version");
    let version = line.split('"').nth(1).expect("rust-version = \"x.y\"");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------
// The checks

#[test]
fn every_dockerfile_is_multi_stage_non_root_and_builds_a_real_binary() {
    let (need_major, need_minor) = rust_version();
    for path in dockerfiles() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let stages = stages(&path);
        assert!(stages.len() >= 2, "{name}: a multi-stage build needs two FROM, found {}", stages.len());

        // The builder: the official rust image, no older than the workspace's rust-version.
        let builder = &stages[0];
        let tag = builder.image.strip_prefix("rust:").unwrap_or_else(|| {
            panic!("{name}: the builder should be the official rust image, is {}", builder.image)
        });
        let numbers: Vec<u32> =
            tag.split('-').next().unwrap().split('.').map_while(|p| p.parse().ok()).collect();
        match numbers[..] {
            [major, minor, ..] => assert!(
                (major, minor) >= (need_major, need_minor),
                "{name}: rust:{tag} is older than rust-version {need_major}.{need_minor}"
            ),
            [major] => assert_eq!(major, need_major, "{name}: rust:{tag}"),
            [] => panic!("{name}: pin the rust image's version, not rust:{tag}"),
        }

        // Its cargo builds name real packages and binaries, with cache mounts.
        let runs: Vec<&str> = builder.all("RUN").collect();
        let built: Vec<(String, String)> = runs.iter().flat_map(|run| cargo_builds(run)).collect();
        assert!(!built.is_empty(), "{name}: the builder runs no `cargo build`");
        for (package, bin) in &built {
            let bins = workspace_bins()
                .get(package)
                .unwrap_or_else(|| panic!("{name}: -p {package} is not a workspace package"));
            assert!(bins.contains(bin), "{name}: package {package} has no binary {bin} (it has {bins:?})");
        }
        let cargo_run = runs.iter().find(|run| run.contains("cargo build")).unwrap();
        for cache in ["/usr/local/cargo/registry", "/src/target"] {
            assert!(
                cargo_run.contains("--mount=type=cache") && cargo_run.contains(&format!("target={cache}")),
                "{name}: `cargo build` should use a BuildKit cache mount for {cache}"
            );
        }

        // Everything copied from the build context exists.
        for stage in &stages {
            for copy in stage.all("COPY").filter(|c| !c.starts_with("--from")) {
                let words: Vec<&str> = copy.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                for source in &words[..words.len() - 1] {
                    let source = workspace_root().join(source);
                    assert!(source.exists(), "{name}: COPY source {} does not exist", source.display());
                }
            }
        }

        // The runtime: small, non-root, running a binary the builder built.
        let runtime = stages.last().unwrap();
        assert!(!runtime.image.starts_with("rust:"), "{name}: the final stage still is the rust image");
        let user =
            runtime.all("USER").last().unwrap_or_else(|| panic!("{name}: the final stage sets no USER"));
        let user = user.split(':').next().unwrap();
        assert!(user != "root" && user != "0", "{name}: USER {user} is root");
        if let Ok(uid) = user.parse::<u32>() {
            assert!(uid >= 1000, "{name}: USER {uid} is a system uid");
        }
        assert!(
            runtime.all("COPY").any(|c| c.starts_with("--from=builder")),
            "{name}: the final stage copies nothing from the builder"
        );
        let program = entrypoint_binary(runtime);
        assert!(
            built.iter().any(|(_, bin)| *bin == program),
            "{name}: ENTRYPOINT runs {program}, which the builder does not build"
        );

        // Its ENV are settings the program reads; a server exposes the port it binds.
        let read = env_names_read_by(&program);
        let env = env_lines(runtime);
        for key in env.keys() {
            assert!(
                read.contains(key),
                "{name}: ENV {key} is not read by {program} (its --help lists {read:?})"
            );
        }
        if let Some(address) = env.get("MICRO_SERVER_ADDRESS") {
            let port = address.rsplit(':').next().unwrap();
            let exposed: Vec<&str> = runtime.all("EXPOSE").flat_map(str::split_whitespace).collect();
            assert!(exposed.contains(&port), "{name}: binds port {port} but EXPOSEs {exposed:?}");
        }
    }
}

#[test]
fn compose_runs_shippy_on_one_consul_agent_and_postgres_with_two_instances_of_each_service() {
    let compose = compose();
    let services = services(&compose);

    // One Consul agent, in dev mode, with a healthcheck the services wait for.
    let consul = services.get("consul").expect("a `consul` service");
    let image = text(consul.get("image").expect("consul has an image"));
    assert!(image.starts_with("hashicorp/consul:"), "consul should be the official image, pinned: {image}");
    let command = serde_norway::to_string(consul.get("command").expect("consul has a command")).unwrap();
    assert!(command.contains("-dev") && command.contains("0.0.0.0"), "consul: `agent -dev -client 0.0.0.0`");
    assert!(consul.get("healthcheck").and_then(|h| h.get("test")).is_some(), "consul has a healthcheck");
    let agents = services
        .values()
        .filter(|s| s.get("image").is_some_and(|i| text(i).starts_with("hashicorp/consul")))
        .count();
    assert_eq!(agents, 1, "exactly one Consul agent");

    // One PostgreSQL, pinned, healthy before the services start, with the two databases.
    let postgres = services.get("postgres").expect("a `postgres` service");
    let image = text(postgres.get("image").expect("postgres has an image"));
    assert!(image.starts_with("postgres:1"), "postgres should be the official image, pinned: {image}");
    assert!(postgres.get("healthcheck").and_then(|h| h.get("test")).is_some(), "postgres has a healthcheck");
    let init =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/postgres-init.sql"))
            .expect("docker/postgres-init.sql");

    let top_volumes = compose.get("volumes").and_then(Value::as_mapping);
    let (mut vessel_instances, mut consignment_instances) = (0, 0);
    let mut referenced = BTreeSet::new();
    for (name, service) in services {
        let name = text(name);
        let Some(dockerfile) = dockerfile_of(service) else {
            assert!(
                ["consul", "postgres"].contains(&name.as_str()),
                "{name}: every shippy service builds from docker/"
            );
            continue;
        };
        assert!(dockerfile.is_file(), "{name}: its Dockerfile {} does not exist", dockerfile.display());
        referenced.insert(dockerfile.canonicalize().unwrap());
        let program = entrypoint_binary(stages(&dockerfile).last().unwrap());
        if program == "vessel-service" {
            vessel_instances += replicas(service);
        }
        if program == "consignment-service" {
            consignment_instances += replicas(service);
        }

        // Every variable is one the program reads; the registry is Consul, found by name.
        let env = environment(service);
        let read = env_names_read_by(&program);
        for key in env.keys() {
            assert!(read.contains(key), "{name}: {key} is not read by {program} (its --help lists {read:?})");
        }
        assert_eq!(env.get("MICRO_REGISTRY").map(String::as_str), Some("consul"), "{name}: MICRO_REGISTRY");
        let address =
            env.get("MICRO_REGISTRY_ADDRESS").unwrap_or_else(|| panic!("{name}: MICRO_REGISTRY_ADDRESS"));
        let host = address.trim_start_matches("http://").split(':').next().unwrap();
        assert!(
            services.contains_key(host),
            "{name}: MICRO_REGISTRY_ADDRESS={address} names no compose service"
        );
        assert_eq!(env.get("MICRO_REGISTRY_RETRY").map(String::as_str), Some("true"), "{name}: start order");
        let condition =
            service.get("depends_on").and_then(|d| d.get("consul")).and_then(|c| c.get("condition"));
        assert_eq!(
            condition.map(text).as_deref(),
            Some("service_healthy"),
            "{name}: waits for a healthy consul"
        );

        // Services with a database share one PostgreSQL database per service, made by the
        // init script, and start once it is healthy.
        for key in ["VESSEL_DB", "CONSIGNMENT_DB"] {
            let Some(url) = env.get(key) else { continue };
            let database = url.rsplit('/').next().unwrap();
            assert!(url.starts_with("postgres://") && url.contains("@postgres:5432/"), "{name}: {key}={url}");
            assert!(
                init.contains(&format!("CREATE DATABASE {database} ")),
                "{name}: {database} is not made by postgres-init.sql"
            );
            let condition =
                service.get("depends_on").and_then(|d| d.get("postgres")).and_then(|c| c.get("condition"));
            assert_eq!(condition.map(text).as_deref(), Some("service_healthy"), "{name}: waits for postgres");
        }

        // Servers: a fixed port on every interface, metrics reachable, no shared advertise.
        if read.contains("MICRO_SERVER_ADDRESS") {
            let bind =
                env.get("MICRO_SERVER_ADDRESS").unwrap_or_else(|| panic!("{name}: MICRO_SERVER_ADDRESS"));
            assert!(
                bind.starts_with("0.0.0.0:") && !bind.ends_with(":0"),
                "{name}: bind 0.0.0.0:PORT, not {bind}"
            );
            let metrics = env.get("MICRO_METRICS_ADDRESS").map(String::as_str);
            assert!(
                metrics.is_some_and(|m| m.starts_with("0.0.0.0:")),
                "{name}: MICRO_METRICS_ADDRESS {metrics:?}"
            );
            if replicas(service) > 1 {
                assert!(
                    !env.contains_key("MICRO_SERVER_ADVERTISE"),
                    "{name}: one MICRO_SERVER_ADVERTISE cannot be right for every replica"
                );
            }
        } else {
            // A one-shot client must not start with a plain `up`.
            let profiles = service.get("profiles").and_then(Value::as_sequence);
            assert!(
                profiles.is_some_and(|p| !p.is_empty()),
                "{name}: a one-shot client belongs under a profile"
            );
        }

        // Named volumes are declared.
        for volume in service.get("volumes").and_then(Value::as_sequence).into_iter().flatten() {
            let volume = text(volume);
            let source = volume.split(':').next().unwrap();
            if !source.starts_with(['.', '/', '~']) {
                assert!(
                    top_volumes.is_some_and(|v| v.contains_key(source)),
                    "{name}: volume {source} is not declared under top-level `volumes`"
                );
            }
        }
    }
    assert_eq!((vessel_instances, consignment_instances), (2, 2), "two instances of each service");
    let written: BTreeSet<PathBuf> = dockerfiles().into_iter().map(|p| p.canonicalize().unwrap()).collect();
    assert_eq!(referenced, written, "every docker/*.Dockerfile is used by the compose file, and only those");
}

#[test]
fn dockerignore_keeps_build_output_and_state_out_of_the_context() {
    let ignore =
        std::fs::read_to_string(workspace_root().join(".dockerignore")).expect(".dockerignore at the root");
    let patterns: BTreeSet<&str> = ignore.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for needed in [".git", "target/", ".tools/", "**/*.db"] {
        assert!(patterns.contains(needed), ".dockerignore should list {needed}");
    }
}

/// `docker compose config -q` validates the file against the compose specification; it
/// needs the client and its compose plugin, not an engine. Without them this check is
/// reported as skipped and the two tests above are the whole check.
#[test]
fn docker_compose_config_accepts_the_file_when_the_client_is_here() {
    let root = workspace_root();
    let version = Command::new("docker").args(["compose", "version"]).current_dir(&root).output();
    let reason = match &version {
        Err(e) => Some(format!("no `docker` client on PATH ({e})")),
        Ok(out) if !out.status.success() => Some(format!(
            "`docker compose version` failed, the compose plugin is missing: {}",
            String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").trim()
        )),
        Ok(_) => None,
    };
    if let Some(reason) = reason {
        println!("docker compose CLI check skipped: {reason}; the YAML and Dockerfile checks still ran");
        return;
    }
    for profile in [None, Some("cli")] {
        let mut command = Command::new("docker");
        command.arg("compose").args(["-f", COMPOSE_FILE]);
        if let Some(profile) = profile {
            command.args(["--profile", profile]);
        }
        let out = command.args(["config", "-q"]).current_dir(&root).output().expect("docker compose runs");
        assert!(
            out.status.success(),
            "docker compose config (profile {profile:?}) rejects {COMPOSE_FILE}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("docker compose config -q accepted {COMPOSE_FILE}");
}

#[test]
fn the_connect_overlay_turns_connect_on_for_every_shippy_service_after_its_intentions() {
    let base = compose();
    let base_services = services(&base);
    let path = workspace_root().join("docker/compose.connect.yaml");
    let overlay: Value =
        serde_norway::from_str(&std::fs::read_to_string(&path).expect("docker/compose.connect.yaml"))
            .expect("docker/compose.connect.yaml is YAML");
    let overlay_services = services(&overlay);

    // The intentions are written once, by the pinned Consul image, before the services start.
    let intentions = overlay_services.get("intentions").expect("an `intentions` one-shot");
    assert!(text(intentions.get("image").expect("an image")).starts_with("hashicorp/consul:"));
    let command = serde_norway::to_string(intentions.get("command").expect("a command")).unwrap();
    for intention in [
        "-deny '*' vessel-service",
        "-allow consignment-service vessel-service",
        "-deny '*' consignment-service",
        "-allow consignment-cli consignment-service",
        "-allow vessel-service consignment-service",
    ] {
        assert!(command.contains(intention), "intentions: {intention} missing from {command}");
    }

    // Every shippy service of compose.yaml turns Connect on, with variables its binary reads.
    for (name, service) in base_services {
        let Some(dockerfile) = dockerfile_of(service) else { continue };
        let name = text(name);
        let program = entrypoint_binary(stages(&dockerfile).last().unwrap());
        let over =
            overlay_services.get(name.as_str()).unwrap_or_else(|| panic!("{name}: not in the overlay"));
        let env = environment(over);
        assert_eq!(env.get("MICRO_CONSUL_CONNECT").map(String::as_str), Some("true"), "{name}");
        let read = env_names_read_by(&program);
        for key in env.keys() {
            assert!(read.contains(key), "{name}: {key} is not read by {program}");
        }
        if program != "consignment-cli" {
            let waits =
                over.get("depends_on").and_then(|d| d.get("intentions")).and_then(|i| i.get("condition"));
            assert_eq!(waits.map(text).as_deref(), Some("service_completed_successfully"), "{name}");
        }
    }
    for name in overlay_services.keys().map(text).filter(|name| name != "intentions") {
        assert!(base_services.contains_key(name.as_str()), "{name}: extends no service of compose.yaml");
    }
}
