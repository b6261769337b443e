//! Output: tables by default, `--output json`; secrets hidden unless `--show-keys`; short
//! error messages with a hint.

use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct OutputArgs {
    /// Output format
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Fields that hold secrets.
const SECRET_FIELDS: &[&str] = &[
    "primaryKey",
    "secondaryKey",
    "connectionString",
    "certificate",
];

/// Removes secret fields everywhere in `v`.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for f in SECRET_FIELDS {
                m.remove(*f);
            }
            for (_, x) in m.iter_mut() {
                redact(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A cell: strings as-is, arrays joined, missing as `-`.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => {
            let parts: Vec<String> = a.iter().map(|x| cell(Some(x))).collect();
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(",")
            }
        }
        Some(other) => other.to_string(),
    }
}

/// Prints rows under headers, columns padded.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                s.push_str(c);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        emit(s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A list: JSON array, or a table with `columns` (header, JSON pointer).
pub fn print_list(format: Format, items: &[Value], columns: &[(&str, &str)]) {
    match format {
        Format::Json => print_json(&Value::Array(items.to_vec())),
        Format::Table => {
            let headers: Vec<&str> = columns.iter().map(|c| c.0).collect();
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|it| columns.iter().map(|c| cell(it.pointer(c.1))).collect())
                .collect();
            print_table(&headers, &rows);
        }
    }
}

/// One object: JSON, or a FIELD/VALUE table of its leaves (dotted paths).
pub fn print_object(format: Format, v: &Value) {
    match format {
        Format::Json => print_json(v),
        Format::Table => {
            let mut rows = Vec::new();
            flatten("", v, &mut rows);
            print_table(&["FIELD", "VALUE"], &rows);
        }
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        Value::Null => {}
        Value::Object(_) => {}
        other => out.push(vec![prefix.to_string(), cell(Some(other))]),
    }
}

pub fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => emit(&s),
        Err(_) => emit(&v.to_string()),
    }
}

/// Writes one line to standard output; a closed pipe (`| head`) ends the program quietly.
pub fn emit(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// The CA file the command's clients trust besides the system roots, for the hint when the
/// server's certificate is not trusted.
static TRUSTED_CA: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Records the CA file a client was built with (`None`: the system roots only).
pub fn remember_trusted_ca(ca: Option<&std::path::Path>) {
    *TRUSTED_CA.lock().unwrap_or_else(|e| e.into_inner()) = ca.map(|p| p.to_path_buf());
}

/// A one-line message with a hint for the common causes.
pub fn describe(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let hint = e
        .chain()
        .find_map(|c| c.downcast_ref::<muster_client::Error>())
        .and_then(hint);
    match hint {
        Some(h) => format!("{text}\n  hint: {h}"),
        None => text,
    }
}

/// What to do about a server certificate nobody trusted, naming the CA file that was tried.
fn untrusted_certificate_hint() -> String {
    let tried = TRUSTED_CA.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match tried {
        Some(ca) => format!(
            "the server's certificate is issued neither by the CA in {} nor by a CA of the \
             system roots: pass --ca-cert with the PEM of the CA that issued it",
            ca.display()
        ),
        None => "the server's certificate is not issued by a CA of the system roots: pass \
                 --ca-cert with the PEM of the CA that issued it (a `muster serve` with its own \
                 CA: DATA_DIR/ca.pem, or --data-dir DATA_DIR)"
            .to_owned(),
    }
}

fn hint(e: &muster_client::Error) -> Option<String> {
    use muster_client::Error as E;
    let text = format!("{e:?}");
    let fixed = |s: &str| Some(s.to_owned());
    match e {
        E::Transport { .. } | E::Mqtt(_)
            if text.contains("UnknownIssuer") || text.contains("certificate") =>
        {
            Some(untrusted_certificate_hint())
        }
        E::Transport { .. } | E::Mqtt(_) => fixed(
            "is `muster serve` running, and is the host/port right? (see --endpoint, --data-dir, --connection-string)",
        ),
        E::Service { status: 401, .. } => {
            fixed("the key was refused: check the connection string or the device / group key")
        }
        E::Service { status: 403, .. } => {
            fixed("the policy of this connection string lacks the right this command needs")
        }
        E::Hub { status: 401, .. } => fixed("the hub refused the key: check --hub-connection-string"),
        E::Tls(_) => fixed("pass --ca-cert with the PEM of the CA that issued the server's certificate"),
        _ => None,
    }
}
