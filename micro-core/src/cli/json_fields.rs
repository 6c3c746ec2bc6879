//! Span fields for JSON log lines. A span's fields are written as one JSON object, straight
//! into the span's text (no map of values built first), and a field recorded later (a call's
//! request id, its status) is appended to that object, where the stock JSON field formatter
//! parses the whole object and writes it out again on every `record`, twice per served call.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, FormattedFields, format::Writer},
};

/// Formats span fields as a JSON object and appends later ones to it.
pub(super) struct AppendingJsonFields;

impl<'writer> FormatFields<'writer> for AppendingJsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut object = JsonObject { text: String::from("{"), result: Ok(()) };
        fields.record(&mut object);
        object.result?;
        object.text.push('}');
        writer.write_str(&object.text)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        if added == "{}" {
            return Ok(());
        }
        if current.fields.is_empty() || current.fields == "{}" {
            current.fields = added;
            return Ok(());
        }
        // `{"a":1}` and `{"b":2}` make `{"a":1,"b":2}`.
        current.fields.pop();
        current.fields.push(',');
        current.fields.push_str(&added[1..]);
        Ok(())
    }
}

/// The fields of one record as the inside of a JSON object, `{` included.
struct JsonObject {
    text: String,
    result: fmt::Result,
}

impl JsonObject {
    /// Writes `"name":` after a comma when a field came before; false, writing nothing,
    /// for a directive to the trace exporter (`otel.name`, `otel.kind`, `otel.status_code`),
    /// which says nothing the line does not.
    fn key(&mut self, field: &Field) -> bool {
        if field.name().starts_with("otel.") {
            return false;
        }
        if self.text.len() > 1 {
            self.text.push(',');
        }
        self.text.push('"');
        escape_into(&mut self.text, field.name());
        self.text.push_str("\":");
        true
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        if self.key(field) && self.result.is_ok() {
            self.result = write!(self.text, "{value}");
        }
    }
}

impl Visit for JsonObject {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.number(field, value);
        } else if self.key(field) {
            // JSON has no NaN or infinity: as serde_json writes them.
            self.text.push_str("null");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.key(field) {
            return;
        }
        self.text.push_str(if value { "true" } else { "false" });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.key(field) {
            return;
        }
        self.text.push('"');
        escape_into(&mut self.text, value);
        self.text.push('"');
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.key(field) {
            return;
        }
        self.text.push('"');
        if self.result.is_ok() {
            self.result = write!(Escaping(&mut self.text), "{value:?}");
        }
        self.text.push('"');
    }
}

/// Writes what it is given as the inside of a JSON string.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        escape_into(self.0, text);
        Ok(())
    }
}

/// Appends `text` to `out` escaped as the inside of a JSON string.
fn escape_into(out: &mut String, text: &str) {
    let mut plain = 0;
    for (at, byte) in text.bytes().enumerate() {
        let escaped = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[plain..at]);
        plain = at + 1;
        if escaped.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escaped);
        }
    }
    out.push_str(&text[plain..]);
}
