//! Headless Chromium for the tests of pages: the dashboard, its live feed.

use std::{path::PathBuf, time::Duration};

/// Chromium, from `PATH`; fails saying what to install when it is missing.
pub fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "the page tests need a real browser: `apt-get install --no-install-recommends chromium` \
             (scripts/install-test-deps installs it; `make test` runs that)"
        )
    })
}

/// What headless Chromium, with a fresh profile, prints for `url` once its scripts ran,
/// with `mode`: `--dump-dom`, or `--screenshot=FILE` and a window size.
pub async fn chromium_run(mode: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().expect("a profile folder");
    let run = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium must finish within 60 s")
        .expect("chromium runs");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `text` with every byte outside `A-Za-z0-9` percent-encoded, for a query string.
pub fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
