//! Span fields for JSON log lines. A span's fields are kept as one JSON object; a field
//! recorded later (a call's request id, its status) is appended to that object, where the
//! stock JSON field formatter parses the whole object and writes it out again on every
//! `record`, twice per served call.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, FormattedFields, format::Writer},
};

/// Formats span fields as a JSON object and appends later ones to it.
pub(super) struct AppendingJsonFields;

impl<'writer> FormatFields<'writer> for AppendingJsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut object = JsonObject::default();
        fields.record(&mut object);
        let text = serde_json::to_string(&object.0).map_err(|_| fmt::Error)?;
        writer.write_str(&text)
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

/// The fields of one record, by name.
#[derive(Default)]
struct JsonObject(Map<String, Value>);

impl Visit for JsonObject {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}
