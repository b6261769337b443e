//! The human-readable reports: one aligned `name  value` table per run.

use super::latency::LatencySummary;
use super::register::RegisterReport;
use super::server_usage::ServerUsage;

/// Prints `rows` as two aligned columns.
pub fn print_rows(title: &str, rows: &[(String, String)]) {
    println!("{title}");
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:width$}  {v}");
    }
}

pub fn latency_cell(l: &LatencySummary) -> String {
    format!(
        "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms ({} samples)",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.samples
    )
}

pub fn usage_rows(rows: &mut Vec<(String, String)>, usage: &ServerUsage) {
    rows.push((
        "server CPU".into(),
        format!(
            "{:.2} s (user {:.2}, system {:.2})",
            usage.cpu_secs, usage.cpu_user_secs, usage.cpu_system_secs
        ),
    ));
    rows.push((
        "server RSS".into(),
        format!(
            "peak {:.1} MiB, end {:.1} MiB, VmHWM {:.1} MiB ({} samples)",
            usage.peak_rss_kib as f64 / 1024.0,
            usage.end_rss_kib as f64 / 1024.0,
            usage.hwm_kib as f64 / 1024.0,
            usage.rss_samples
        ),
    ));
}

pub fn print_register(r: &RegisterReport) {
    let mode = serde_json::to_value(r.mode)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let target = serde_json::to_value(r.target)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut rows = vec![
        ("target".to_string(), format!("{target} at {}", r.endpoint)),
        (
            "load".into(),
            match r.rate {
                Some(rate) => format!(
                    "{rate:.0} devices/s (open loop), at most {} in flight",
                    r.concurrency
                ),
                None => format!("{} in flight (closed loop)", r.concurrency),
            },
        ),
        ("attempted".into(), r.attempted.to_string()),
        ("assigned".into(), r.assigned.to_string()),
        ("errors".into(), r.errors.to_string()),
    ];
    for (kind, n) in &r.errors_by_kind {
        rows.push((format!("  {kind}"), n.to_string()));
    }
    rows.push(("wall time".into(), format!("{:.2} s", r.wall_secs)));
    rows.push((
        "throughput".into(),
        format!("{:.0} assigned/s", r.throughput_per_sec),
    ));
    rows.push(("latency".into(), latency_cell(&r.latency)));
    if let Some(lag) = r.max_start_lag_ms {
        rows.push(("max start lag".into(), format!("{lag:.1} ms")));
    }
    if let Some(u) = &r.server {
        usage_rows(&mut rows, u);
        if r.assigned > 0 {
            rows.push((
                "server CPU/device".into(),
                format!("{:.3} ms", u.cpu_secs * 1000.0 / r.assigned as f64),
            ));
        }
    }
    if let Some(c) = &r.reference {
        rows.push((
            "reference saw".into(),
            format!(
                "{} connections ({} resumed), {} requests, {} failed handshakes",
                c.connections, c.resumed_handshakes, c.requests, c.failed_handshakes
            ),
        ));
    }
    let title = match &r.label {
        Some(l) => format!("{l} ({mode})"),
        None => mode,
    };
    print_rows(&title, &rows);
}
