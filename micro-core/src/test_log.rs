//! Log capture for unit tests: a writer that keeps what is written, and what a plain
//! subscriber logs while a future runs.

use std::sync::{Arc, Mutex};

/// A writer that keeps what is written; its clones share what they keep.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What was written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("captured lock").clone()).expect("UTF-8 log")
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("captured lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything logged while `work` runs on this thread, as plain text.
pub(crate) async fn logged<F: Future<Output = ()>>(work: F) -> String {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone()).finish();
    let _default = tracing::subscriber::set_default(subscriber);
    work.await;
    captured.text()
}
