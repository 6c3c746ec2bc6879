//! `micro config`: each setting's value and where it came from.

use clap::{ArgMatches, CommandFactory, parser::ValueSource};

use crate::{Cli, Output, out};

/// One row per setting: its id, value and source (`flag`, `env NAME`, `default`).
pub fn print(matches: &ArgMatches, output: Output) {
    let command = Cli::command();
    let mut rows = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(source) = matches.value_source(id) else { continue };
        let value: Vec<String> =
            matches.get_raw(id).into_iter().flatten().map(|v| v.to_string_lossy().into_owned()).collect();
        let secret = arg.get_env().is_some_and(|env| env.to_string_lossy().contains("TOKEN"));
        let value = if secret && !value.is_empty() { vec!["(set, hidden)".to_owned()] } else { value };
        let source = match (source, arg.get_env()) {
            (ValueSource::CommandLine, _) => "flag".to_owned(),
            (ValueSource::EnvVariable, Some(env)) => format!("env {}", env.to_string_lossy()),
            _ => "default".to_owned(),
        };
        rows.push([id.to_owned(), value.join(","), source]);
    }
    match output {
        Output::Json => {
            let map: serde_json::Map<String, serde_json::Value> = rows
                .into_iter()
                .map(|[id, value, source]| (id, serde_json::json!({ "value": value, "source": source })))
                .collect();
            out::line(out::json(&map));
        }
        Output::Table => out::table(["SETTING", "VALUE", "SOURCE"], &rows),
    }
}
