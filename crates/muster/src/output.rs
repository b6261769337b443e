//! Output, as `az` prints it: `-o/--output json|jsonc|yaml|tsv|table|none` and `--query`
//! (JMESPath, applied before formatting) on every command that prints a result. Without `-o`
//! the output is a table when standard output is a terminal and JSON otherwise, so scripts get
//! JSON like az's. Secrets are hidden unless `--show-keys`; errors are short, with a hint, and a
//! service refusal also prints the DPS error body.
//!
//! Exit codes ([`EXIT_FAILED`], [`EXIT_USAGE`]): 0 success; 1 the command failed (the service
//! or hub refused it, it could not be reached, or a local file could not be read); 2 usage
//! (unknown command or option, a bad value, an invalid `--query`).

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use serde_json::Value;

/// The exit code of a failed command.
pub const EXIT_FAILED: i32 = 1;
/// The exit code of a usage error (clap's too).
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Pretty-printed JSON
    Json,
    /// JSON with colours
    Jsonc,
    /// YAML
    Yaml,
    /// Tab-separated values: one line per item, its scalar fields in order (no headers)
    Tsv,
    /// A human-readable table
    Table,
    /// Nothing (the exit code still tells)
    None,
}

#[derive(Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Output format [default: table on a terminal, json otherwise]
    #[arg(long, short = 'o', value_enum)]
    pub output: Option<Format>,
    /// JMESPath query applied to the result before it is printed, e.g. "[].registrationId"
    #[arg(long, value_parser = valid_query)]
    pub query: Option<String>,
}

impl OutputArgs {
    /// The format asked for, or the default for where standard output goes.
    pub fn format(&self) -> Format {
        self.output.unwrap_or_else(|| {
            if std::io::stdout().is_terminal() {
                Format::Table
            } else {
                Format::Json
            }
        })
    }

    /// Applies `--query`; an invalid expression is a usage error (exit 2).
    fn apply_query(&self, v: Value) -> Value {
        let Some(q) = &self.query else { return v };
        let expr = match jmespath::compile(q) {
            Ok(e) => e,
            Err(e) => usage_error(&format!("--query is not a valid JMESPath expression: {e}")),
        };
        match expr.search(v) {
            Ok(r) => serde_json::to_value(&*r).unwrap_or(Value::Null),
            Err(e) => usage_error(&format!("--query failed: {e}")),
        }
    }
}

/// `--query` is checked when the options are parsed, so a typo is a usage error (exit 2)
/// before any request is sent.
fn valid_query(q: &str) -> Result<String, String> {
    jmespath::compile(q)
        .map(|_| q.to_string())
        .map_err(|e| format!("not a valid JMESPath expression: {e}"))
}

fn usage_error(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(EXIT_USAGE);
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

/// A list: as `out` says; its table has `columns` (header, JSON pointer) unless `--query`
/// reshaped the items.
pub fn print_list(out: &OutputArgs, items: &[Value], columns: &[(&str, &str)]) {
    render(out, Value::Array(items.to_vec()), Some(columns));
}

/// One object: as `out` says; its table is FIELD/VALUE rows of its leaves (dotted paths).
pub fn print_object(out: &OutputArgs, v: &Value) {
    render(out, v.clone(), None);
}

fn render(out: &OutputArgs, v: Value, columns: Option<&[(&str, &str)]>) {
    let queried = out.query.is_some();
    let v = out.apply_query(v);
    match out.format() {
        Format::Json => print_json(&v),
        Format::Jsonc => emit(&colour_json(&v, 0)),
        Format::Yaml => match serde_norway::to_string(&v) {
            Ok(s) => emit(s.trim_end()),
            Err(_) => print_json(&v),
        },
        Format::Tsv => print_tsv(&v),
        Format::None => {}
        Format::Table => match (&v, columns) {
            (Value::Array(items), Some(cols)) if !queried => {
                let headers: Vec<&str> = cols.iter().map(|c| c.0).collect();
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|it| cols.iter().map(|c| cell(it.pointer(c.1))).collect())
                    .collect();
                print_table(&headers, &rows);
            }
            _ => print_any_table(&v),
        },
    }
}

/// A table of any value: a list of objects gets the first object's fields as columns, a list
/// of scalars one `Result` column, an object FIELD/VALUE rows, a scalar itself.
fn print_any_table(v: &Value) {
    match v {
        Value::Array(items) => {
            if let Some(Value::Object(first)) = items.first() {
                let keys: Vec<&String> = first.keys().collect();
                let headers: Vec<String> = keys.iter().map(|k| header(k)).collect();
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|it| keys.iter().map(|k| cell(it.get(k.as_str()))).collect())
                    .collect();
                let hs: Vec<&str> = headers.iter().map(String::as_str).collect();
                print_table(&hs, &rows);
            } else {
                let rows: Vec<Vec<String>> = items.iter().map(|x| vec![cell(Some(x))]).collect();
                print_table(&["Result"], &rows);
            }
        }
        Value::Object(_) => {
            let mut rows = Vec::new();
            flatten("", v, &mut rows);
            print_table(&["FIELD", "VALUE"], &rows);
        }
        Value::Null => {}
        other => emit(&cell(Some(other))),
    }
}

/// `registrationId` → `REGISTRATION ID`.
fn header(key: &str) -> String {
    let mut h = String::new();
    for (i, c) in key.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            h.push(' ');
        }
        h.extend(c.to_uppercase());
    }
    h
}

/// az's tsv: one line per list item (or one for an object), its scalar values tab-separated
/// in field order; nested objects and lists are left out, strings are unquoted.
fn print_tsv(v: &Value) {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::Null => Some(String::new()),
            Value::String(s) => Some(s.clone()),
            Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
            _ => None,
        }
    }
    fn line(v: &Value) -> String {
        match v {
            Value::Object(m) => m.values().filter_map(scalar).collect::<Vec<_>>().join("\t"),
            Value::Array(a) => a.iter().filter_map(scalar).collect::<Vec<_>>().join("\t"),
            other => scalar(other).unwrap_or_default(),
        }
    }
    match v {
        Value::Array(items) => items.iter().for_each(|it| emit(&line(it))),
        Value::Null => {}
        other => emit(&line(other)),
    }
}

/// JSON with ANSI colours (keys blue, strings green, numbers and literals yellow), indented
/// like `print_json`.
fn colour_json(v: &Value, depth: usize) -> String {
    const KEY: &str = "\x1b[94m";
    const STR: &str = "\x1b[32m";
    const LIT: &str = "\x1b[33m";
    const END: &str = "\x1b[0m";
    let pad = "  ".repeat(depth + 1);
    let close = "  ".repeat(depth);
    match v {
        Value::Object(m) if !m.is_empty() => {
            let body: Vec<String> = m
                .iter()
                .map(|(k, x)| {
                    format!(
                        "{pad}{KEY}{}{END}: {}",
                        Value::from(k.as_str()),
                        colour_json(x, depth + 1)
                    )
                })
                .collect();
            format!("{{\n{}\n{close}}}", body.join(",\n"))
        }
        Value::Array(a) if !a.is_empty() => {
            let body: Vec<String> = a
                .iter()
                .map(|x| format!("{pad}{}", colour_json(x, depth + 1)))
                .collect();
            format!("[\n{}\n{close}]", body.join(",\n"))
        }
        Value::String(_) => format!("{STR}{v}{END}"),
        Value::Object(_) | Value::Array(_) => v.to_string(),
        other => format!("{LIT}{other}{END}"),
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
    let dps = e
        .chain()
        .find_map(|c| c.downcast_ref::<muster_client::Error>())
        .and_then(dps_error_body);
    let mut out = text;
    if let Some(body) = dps {
        out.push_str(&format!("\n  {body}"));
    }
    if let Some(h) = hint {
        out.push_str(&format!("\n  hint: {h}"));
    }
    out
}

/// The DPS error body of a service refusal, as one JSON line (what az prints).
fn dps_error_body(e: &muster_client::Error) -> Option<String> {
    match e {
        muster_client::Error::Service {
            status,
            error_code,
            message,
            tracking_id,
            ..
        } => Some(
            serde_json::json!({
                "errorCode": error_code,
                "trackingId": tracking_id,
                "message": message,
                "status": status,
            })
            .to_string(),
        ),
        _ => None,
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
