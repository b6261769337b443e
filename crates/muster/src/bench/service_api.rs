//! `muster bench service-api`: the DPS service API at scale. (a) Bulk-creates individual
//! enrollments (`POST /enrollments`, mode `create`, up to 10,000 per call) and times it;
//! (b) measures paging queries (`POST /enrollments/query` and `POST
//! /registrations/{groupId}/query`, `x-ms-max-item-count` 100) at offsets spread over the
//! whole collection: one walk with the largest pages collects the continuation tokens the
//! server returns, then each measured query resumes from one of them (or starts at the top).
//! With `--server-pid`, the server's CPU time and memory over each phase.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use muster_client::{Pager, ServiceClient};
use muster_proto::{BulkOperationMode, DeviceRegistrationState, IndividualEnrollment};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use super::latency::LatencySummary;
use super::report::{latency_cell, print_rows, usage_rows};
use super::server_usage::{ServerUsage, UsageMonitor};
use crate::conn::ServiceConn;

/// The largest page the service API serves, for the walk that collects tokens.
const WALK_PAGE_SIZE: u32 = 1000;

#[derive(Args, Debug)]
pub struct ServiceApiArgs {
    /// Individual enrollments to bulk-create (0: skip)
    #[arg(long, default_value_t = 100_000)]
    pub enrollments: u64,
    /// Enrollments per bulk call (Muster takes up to 10,000)
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
    /// Enrollment registration ids are PREFIX<n>
    #[arg(long, default_value = "bulk-")]
    pub prefix: String,
    /// Paging queries to measure per collection (0: skip)
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    /// x-ms-max-item-count of the measured queries
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Also measure the registration records of this enrollment group
    #[arg(long)]
    pub group_id: Option<String>,
    /// Also measure this process (the server): CPU time and resident memory per phase
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ServiceConn,
}

#[derive(Debug, Serialize)]
pub struct BulkCreateReport {
    pub enrollments: u64,
    pub calls: u64,
    pub failed_items: u64,
    pub secs: f64,
    pub enrollments_per_sec: f64,
    /// Per bulk call.
    pub call_latency: LatencySummary,
    pub server: Option<ServerUsage>,
}

#[derive(Debug, Serialize)]
pub struct QueryReport {
    /// `enrollments` or `registrations/{groupId}`.
    pub collection: String,
    /// Items in the collection (counted by the walk).
    pub items: u64,
    /// The walk with pages of 1,000 that collected the continuation tokens.
    pub walk_pages: u64,
    pub walk_secs: f64,
    pub page_size: u32,
    pub queries: usize,
    /// The offsets measured (the first item of each page), smallest and largest.
    pub min_offset: u64,
    pub max_offset: u64,
    pub latency: LatencySummary,
    pub server: Option<ServerUsage>,
}

#[derive(Debug, Serialize)]
pub struct ServiceApiReport {
    pub bulk_create: Option<BulkCreateReport>,
    pub queries: Vec<QueryReport>,
}

/// `count` offsets, evenly spread over the `walk_pages` pages of the walk (by index), for a
/// collection walked in pages of [`WALK_PAGE_SIZE`]: index 0 is the top of the collection.
pub fn spread_page_indices(walk_pages: usize, count: usize) -> Vec<usize> {
    if walk_pages == 0 || count == 0 {
        return Vec::new();
    }
    (0..count).map(|j| j * walk_pages / count).collect()
}

fn monitor(pid: Option<u32>) -> anyhow::Result<Option<UsageMonitor>> {
    pid.map(UsageMonitor::start).transpose()
}

async fn finish(m: Option<UsageMonitor>) -> anyhow::Result<Option<ServerUsage>> {
    match m {
        Some(m) => Ok(Some(m.finish().await?)),
        None => Ok(None),
    }
}

async fn bulk_create(
    client: &ServiceClient,
    a: &ServiceApiArgs,
) -> anyhow::Result<BulkCreateReport> {
    let batch = a.batch.clamp(1, 10_000) as u64;
    let usage = monitor(a.server_pid)?;
    let mut call_latencies = Vec::new();
    let mut failed = 0u64;
    let started = Instant::now();
    let mut next = 0u64;
    while next < a.enrollments {
        let end = (next + batch).min(a.enrollments);
        let items = (next..end)
            .map(|i| {
                serde_json::from_value::<IndividualEnrollment>(json!({
                    "registrationId": format!("{}{i}", a.prefix),
                    "attestation": { "type": "symmetricKey" },
                }))
            })
            .collect::<Result<Vec<_>, _>>()
            .context("--prefix makes an invalid registration id")?;
        let t0 = Instant::now();
        let result = client
            .bulk_enrollments(BulkOperationMode::Create, &items)
            .await
            .context("bulk create")?;
        call_latencies.push(t0.elapsed());
        failed += result.errors.len() as u64;
        next = end;
    }
    let secs = started.elapsed().as_secs_f64();
    let server = finish(usage).await?;
    let created = a.enrollments.saturating_sub(failed);
    Ok(BulkCreateReport {
        enrollments: a.enrollments,
        calls: call_latencies.len() as u64,
        failed_items: failed,
        secs,
        enrollments_per_sec: if secs > 0.0 {
            created as f64 / secs
        } else {
            0.0
        },
        call_latency: LatencySummary::from_samples(call_latencies),
        server,
    })
}

/// Walks `make()` with the largest pages, keeping the continuation token that starts each page.
async fn walk<T: DeserializeOwned>(
    mut pager: Pager<T>,
) -> anyhow::Result<(u64, Vec<Option<String>>, Duration)> {
    let started = Instant::now();
    let mut starts: Vec<Option<String>> = vec![None];
    let mut items = 0u64;
    while let Some(page) = pager.next_page().await.context("walking the query")? {
        items += page.len() as u64;
        match pager.continuation() {
            Some(c) => starts.push(Some(c.to_string())),
            None => break,
        }
    }
    Ok((items, starts, started.elapsed()))
}

async fn measure_queries<T: DeserializeOwned>(
    collection: String,
    make: impl Fn(Option<u32>) -> Pager<T>,
    a: &ServiceApiArgs,
) -> anyhow::Result<QueryReport> {
    let (items, starts, walk_time) = walk(make(Some(WALK_PAGE_SIZE))).await?;
    if items == 0 {
        bail!("{collection} is empty: nothing to page through");
    }
    let picks = spread_page_indices(starts.len(), a.queries);
    let usage = monitor(a.server_pid)?;
    let mut latencies = Vec::with_capacity(picks.len());
    for &index in &picks {
        let mut pager = make(Some(a.page_size));
        if let Some(token) = &starts[index] {
            pager = pager.resume_from(token.clone());
        }
        let t0 = Instant::now();
        let page = pager.next_page().await.with_context(|| {
            format!(
                "querying {collection} at offset {}",
                index as u64 * WALK_PAGE_SIZE as u64
            )
        })?;
        latencies.push(t0.elapsed());
        if page.map(|p| p.is_empty()).unwrap_or(true) {
            bail!(
                "{collection}: an empty page at offset {}",
                index as u64 * WALK_PAGE_SIZE as u64
            );
        }
    }
    let server = finish(usage).await?;
    let offset = |i: Option<&usize>| i.map(|i| *i as u64 * WALK_PAGE_SIZE as u64).unwrap_or(0);
    Ok(QueryReport {
        collection,
        items,
        walk_pages: starts.len() as u64,
        walk_secs: walk_time.as_secs_f64(),
        page_size: a.page_size,
        queries: latencies.len(),
        min_offset: offset(picks.iter().min()),
        max_offset: offset(picks.iter().max()),
        latency: LatencySummary::from_samples(latencies),
        server,
    })
}

pub async fn run(a: ServiceApiArgs) -> anyhow::Result<()> {
    let (client, _) = a.conn.client()?;
    let bulk = if a.enrollments > 0 {
        Some(bulk_create(&client, &a).await?)
    } else {
        None
    };
    let mut queries = Vec::new();
    if a.queries > 0 {
        let c = client.clone();
        queries.push(
            measure_queries::<IndividualEnrollment>(
                "enrollments".into(),
                move |size| c.query_enrollments(size),
                &a,
            )
            .await?,
        );
        if let Some(group) = &a.group_id {
            let c = client.clone();
            let g = group.clone();
            queries.push(
                measure_queries::<DeviceRegistrationState>(
                    format!("registrations/{group}"),
                    move |size| c.query_registrations(&g, size),
                    &a,
                )
                .await?,
            );
        }
    }
    let report = ServiceApiReport {
        bulk_create: bulk,
        queries,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &ServiceApiReport) {
    if let Some(b) = &r.bulk_create {
        let mut rows = vec![
            (
                "created".to_string(),
                format!(
                    "{} in {} calls ({} failed items)",
                    b.enrollments - b.failed_items,
                    b.calls,
                    b.failed_items
                ),
            ),
            (
                "time".into(),
                format!(
                    "{:.2} s ({:.0} enrollments/s)",
                    b.secs, b.enrollments_per_sec
                ),
            ),
            ("per call".into(), latency_cell(&b.call_latency)),
        ];
        if let Some(u) = &b.server {
            usage_rows(&mut rows, u);
        }
        print_rows("service API: bulk create of individual enrollments", &rows);
    }
    for q in &r.queries {
        let mut rows = vec![
            ("items".to_string(), q.items.to_string()),
            (
                "walk".into(),
                format!(
                    "{} pages of {WALK_PAGE_SIZE} in {:.2} s",
                    q.walk_pages, q.walk_secs
                ),
            ),
            (
                "queries".into(),
                format!(
                    "{} of {} items, offsets {}..{}",
                    q.queries, q.page_size, q.min_offset, q.max_offset
                ),
            ),
            ("latency".into(), latency_cell(&q.latency)),
        ];
        if let Some(u) = &q.server {
            usage_rows(&mut rows, u);
        }
        print_rows(&format!("service API: query {}", q.collection), &rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_spread_over_the_collection() {
        assert_eq!(spread_page_indices(1000, 4), vec![0, 250, 500, 750]);
        assert_eq!(spread_page_indices(3, 5), vec![0, 0, 1, 1, 2]);
        assert_eq!(spread_page_indices(0, 5), Vec::<usize>::new());
        assert_eq!(spread_page_indices(7, 0), Vec::<usize>::new());
        let many = spread_page_indices(1001, 200);
        assert_eq!(many.len(), 200);
        assert!(many.windows(2).all(|w| w[0] <= w[1]) && *many.last().unwrap() < 1001);
    }
}
