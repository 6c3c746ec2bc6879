//! Writing to stdout without panicking when the reader went away: `micro … | head -1`
//! ends quietly with exit 0, as `ls | head -1` does.

use std::{fmt::Display, io::Write};

/// Writes `text` and a newline to stdout; exits 0 at once if stdout is a closed pipe.
pub fn line(text: impl Display) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {err}");
        std::process::exit(1);
    }
}

/// Writes `text` and a newline to stdout; a closed pipe is an error of kind `BrokenPipe`,
/// for commands that must clean up before they exit.
pub fn try_line(text: impl Display) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").and_then(|()| stdout.flush())
}

/// Pretty JSON of plain data.
pub fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("plain data serializes")
}

/// Prints rows under a header in columns as wide as their widest cell.
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        line(cells.join("  ").trim_end());
    }
}
