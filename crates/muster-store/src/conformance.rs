//! The conformance suite every [`Store`] implementation must pass.
//!
//! Run it with [`run_all`], giving a function that returns a fresh, empty store each time it
//! is called; every check starts from its own store. Each check is also public so an
//! implementation can run one alone while debugging. Checks panic with a message naming what
//! was expected.
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread")]
//! async fn conformance() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let n = std::sync::atomic::AtomicUsize::new(0);
//!     muster_store::conformance::run_all(|| {
//!         let path = dir.path().join(format!("{}.db", n.fetch_add(1, Ordering::Relaxed)));
//!         async move { SqliteStore::open(&path).unwrap() }
//!     })
//!     .await;
//! }
//! ```
//!
//! Sealing ([`crate::sealing`]) has one more check that needs to see the bytes the
//! implementation keeps at rest, so it is not part of [`run_all`]: run
//! [`secrets_sealed_at_rest`] with a function that returns them (for SQLite, the database file
//! and its `-wal` and `-shm`).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::{
    Collection, Expect, Lease, ListQuery, Record, SearchField, SearchQuery, Store, Write,
    WriteOutcome,
};

const C: Collection = Collection::Enrollments;

/// Runs every check, each on a fresh store from `make`.
pub async fn run_all<S: Store, F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! run {
        ($($check:ident),* $(,)?) => {
            $(
                eprintln!("store conformance: {}", stringify!($check));
                $check(make().await).await;
            )*
        };
    }
    run!(
        get_missing_is_none,
        put_get_round_trip,
        etag_changes_on_every_write,
        expect_absent,
        expect_etag,
        expect_any_upserts,
        put_replaces_partition,
        delete_outcomes,
        empty_batch,
        batch_sees_earlier_items,
        batch_failed_expectation_skips_only_that_item,
        refused_required_write_rolls_the_batch_back,
        batch_spans_collections,
        list_is_ordered_by_key,
        list_limit,
        list_paging_visits_each_record_once,
        list_partition_filter,
        search_by_key_and_device_id,
        count_with_and_without_partition,
        collections_are_isolated,
        concurrent_writes_all_land,
        concurrent_conditional_creates_have_one_winner,
        unicode_and_large_bodies,
        secret_collections_are_queryable,
        audit_log_lists_in_time_order_and_prunes,
        issued_certificates_list_filter_and_revoke,
        counted_changes_move_on_every_write,
        claims_take_free_expired_and_own_records,
        racing_claimers_each_record_goes_to_one,
        expired_lease_is_taken_over,
        renewed_lease_is_not_taken,
        lease_written_with_a_put_and_kept_by_later_puts,
        released_claim_is_free,
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn put<S: Store>(store: &S, collection: Collection, key: &str, body: Value) -> String {
    put_in(store, collection, key, None, body).await
}

async fn put_in<S: Store>(
    store: &S,
    collection: Collection,
    key: &str,
    partition: Option<&str>,
    body: Value,
) -> String {
    let write =
        Write::put(collection, key, Expect::Any, body).with_partition(partition.map(str::to_owned));
    match one(store, write).await {
        WriteOutcome::Written { etag } => etag,
        other => panic!("unconditional put of {key} returned {other:?}, expected Written"),
    }
}

async fn one<S: Store>(store: &S, write: Write) -> WriteOutcome {
    let described = format!("{write:?}");
    let mut outcomes = batch(store, vec![write]).await;
    assert_eq!(
        outcomes.len(),
        1,
        "a batch of one write must return one outcome ({described})"
    );
    outcomes.remove(0)
}

async fn batch<S: Store>(store: &S, writes: Vec<Write>) -> Vec<WriteOutcome> {
    let n = writes.len();
    let outcomes = store
        .write(writes)
        .await
        .unwrap_or_else(|e| panic!("write of a {n}-item batch failed: {e}"));
    assert_eq!(outcomes.len(), n, "write must return one outcome per item");
    outcomes
}

async fn get<S: Store>(store: &S, collection: Collection, key: &str) -> Option<Record> {
    store
        .get(collection, key)
        .await
        .unwrap_or_else(|e| panic!("get {}/{key} failed: {e}", collection.as_str()))
}

async fn must_get<S: Store>(store: &S, collection: Collection, key: &str) -> Record {
    get(store, collection, key)
        .await
        .unwrap_or_else(|| panic!("{}/{key} should exist", collection.as_str()))
}

async fn list<S: Store>(store: &S, collection: Collection, query: ListQuery) -> Vec<Record> {
    let described = format!("{query:?}");
    store
        .list(collection, query)
        .await
        .unwrap_or_else(|e| panic!("list {} {described} failed: {e}", collection.as_str()))
}

async fn count<S: Store>(store: &S, collection: Collection, partition: Option<&str>) -> u64 {
    store
        .count(collection, partition)
        .await
        .unwrap_or_else(|e| panic!("count {} {partition:?} failed: {e}", collection.as_str()))
}

fn keys(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.key.clone()).collect()
}

fn all(limit: usize) -> ListQuery {
    ListQuery {
        limit,
        ..ListQuery::default()
    }
}

fn etag_of(outcome: &WriteOutcome) -> String {
    match outcome {
        WriteOutcome::Written { etag } => etag.clone(),
        other => panic!("expected Written, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Single records

/// Getting a key that was never written returns `None`, not an error.
pub async fn get_missing_is_none<S: Store>(store: S) {
    assert_eq!(get(&store, C, "nobody").await, None, "get of a missing key");
}

/// What a put stores is what a get returns: key, partition, etag and body.
pub async fn put_get_round_trip<S: Store>(store: S) {
    let body = json!({
        "registrationId": "device-1",
        "attestation": {"type": "symmetricKey"},
        "nested": [1, 2.5, null, true, {"a": "b"}],
        "provisioningStatus": "enabled",
    });
    let etag = put_in(
        &store,
        Collection::Registrations,
        "device-1",
        Some("group-a"),
        body.clone(),
    )
    .await;
    assert!(!etag.is_empty(), "the store must assign a non-empty etag");
    let record = must_get(&store, Collection::Registrations, "device-1").await;
    assert_eq!(record.key, "device-1", "round-tripped key");
    assert_eq!(
        record.partition.as_deref(),
        Some("group-a"),
        "round-tripped partition"
    );
    assert_eq!(
        record.etag, etag,
        "get must return the etag the put returned"
    );
    assert_eq!(record.body, body, "round-tripped body");

    put(&store, C, "no-partition", json!({})).await;
    assert_eq!(
        must_get(&store, C, "no-partition").await.partition,
        None,
        "a put without partition stores none"
    );

    // A body the caller serialized itself reads back the same, sealed collections included.
    for collection in [Collection::Registrations, Collection::HubDevices] {
        let write = Write::put_serialized(collection, "serialized", Expect::Absent, &body)
            .expect("serializable")
            .with_partition(Some("group-b".into()));
        let outcome = one(&store, write).await;
        assert!(
            matches!(outcome, WriteOutcome::Written { .. }),
            "{outcome:?}"
        );
        let record = must_get(&store, collection, "serialized").await;
        assert_eq!(record.body, body, "round-tripped serialized body");
        assert_eq!(record.partition.as_deref(), Some("group-b"));
    }
}

/// Every put gets a new etag, even when the body is identical.
pub async fn etag_changes_on_every_write<S: Store>(store: S) {
    let mut seen = HashSet::new();
    for i in 0..5 {
        let etag = put(&store, C, "k", json!({"same": true})).await;
        assert!(seen.insert(etag.clone()), "write {i} reused etag {etag}");
        assert_eq!(
            must_get(&store, C, "k").await.etag,
            etag,
            "get returns the latest etag"
        );
    }
    // Writes to other keys never reuse an etag either.
    let other = put(&store, C, "other", json!({"same": true})).await;
    assert!(seen.insert(other), "a write to another key reused an etag");
}

/// `Expect::Absent` creates a missing record and refuses an existing one.
pub async fn expect_absent<S: Store>(store: S) {
    let created = one(&store, Write::put(C, "k", Expect::Absent, json!({"v": 1}))).await;
    let etag = etag_of(&created);
    let again = one(&store, Write::put(C, "k", Expect::Absent, json!({"v": 2}))).await;
    assert_eq!(
        again,
        WriteOutcome::AlreadyExists,
        "Absent on an existing record"
    );
    let record = must_get(&store, C, "k").await;
    assert_eq!(
        record.body,
        json!({"v": 1}),
        "a refused put must not change the body"
    );
    assert_eq!(record.etag, etag, "a refused put must not change the etag");
}

/// `Expect::Etag` applies on a match, refuses a stale etag and a missing record.
pub async fn expect_etag<S: Store>(store: S) {
    let first = put(&store, C, "k", json!({"v": 1})).await;
    let second = etag_of(
        &one(
            &store,
            Write::put(C, "k", Expect::Etag(first.clone()), json!({"v": 2})),
        )
        .await,
    );
    assert_ne!(first, second, "a conditional put must assign a new etag");

    let stale = one(
        &store,
        Write::put(C, "k", Expect::Etag(first.clone()), json!({"v": 3})),
    )
    .await;
    assert_eq!(stale, WriteOutcome::EtagMismatch, "put with a stale etag");
    let record = must_get(&store, C, "k").await;
    assert_eq!(
        record.body,
        json!({"v": 2}),
        "a refused put must not change the body"
    );
    assert_eq!(
        record.etag, second,
        "a refused put must not change the etag"
    );

    let missing = one(
        &store,
        Write::put(C, "missing", Expect::Etag(second), json!({})),
    )
    .await;
    assert_eq!(
        missing,
        WriteOutcome::NotFound,
        "put with an etag on a missing record"
    );
    assert_eq!(
        get(&store, C, "missing").await,
        None,
        "a refused put must not create"
    );
}

/// `Expect::Any` creates and replaces.
pub async fn expect_any_upserts<S: Store>(store: S) {
    let created = put(&store, C, "k", json!({"v": 1})).await;
    let replaced = put(&store, C, "k", json!({"v": 2})).await;
    assert_ne!(created, replaced, "replacing must assign a new etag");
    let record = must_get(&store, C, "k").await;
    assert_eq!(record.body, json!({"v": 2}), "Any replaces the body");
    assert_eq!(
        count(&store, C, None).await,
        1,
        "replacing must not duplicate"
    );
}

/// A put replaces the partition too (including clearing it).
pub async fn put_replaces_partition<S: Store>(store: S) {
    let c = Collection::Registrations;
    put_in(&store, c, "d", Some("g1"), json!({})).await;
    put_in(&store, c, "d", Some("g2"), json!({})).await;
    assert_eq!(
        must_get(&store, c, "d").await.partition.as_deref(),
        Some("g2")
    );
    assert_eq!(
        count(&store, c, Some("g1")).await,
        0,
        "the old partition must be empty"
    );
    assert_eq!(count(&store, c, Some("g2")).await, 1);
    let in_g1 = list(
        &store,
        c,
        ListQuery {
            partition: Some("g1".into()),
            after: None,
            limit: 10,
        },
    )
    .await;
    assert!(
        in_g1.is_empty(),
        "the old partition must list nothing, got {:?}",
        keys(&in_g1)
    );

    put_in(&store, c, "d", None, json!({})).await;
    assert_eq!(
        must_get(&store, c, "d").await.partition,
        None,
        "a put without partition clears it"
    );
    assert_eq!(count(&store, c, Some("g2")).await, 0);
}

/// Delete outcomes: missing, applied, etag mismatch, etag match, `Absent` on an existing one.
pub async fn delete_outcomes<S: Store>(store: S) {
    assert_eq!(
        one(&store, Write::delete(C, "missing", Expect::Any)).await,
        WriteOutcome::NotFound,
        "delete of a missing record"
    );
    assert_eq!(
        one(
            &store,
            Write::delete(C, "missing", Expect::Etag("x".into()))
        )
        .await,
        WriteOutcome::NotFound,
        "delete with an etag of a missing record"
    );

    put(&store, C, "a", json!({})).await;
    assert_eq!(
        one(&store, Write::delete(C, "a", Expect::Any)).await,
        WriteOutcome::Deleted
    );
    assert_eq!(get(&store, C, "a").await, None, "a deleted record is gone");
    assert_eq!(
        one(&store, Write::delete(C, "a", Expect::Any)).await,
        WriteOutcome::NotFound,
        "deleting twice"
    );

    let etag = put(&store, C, "b", json!({})).await;
    assert_eq!(
        one(
            &store,
            Write::delete(C, "b", Expect::Etag(format!("{etag}-stale")))
        )
        .await,
        WriteOutcome::EtagMismatch,
        "delete with a wrong etag"
    );
    assert!(
        get(&store, C, "b").await.is_some(),
        "a refused delete must keep the record"
    );
    assert_eq!(
        one(&store, Write::delete(C, "b", Expect::Absent)).await,
        WriteOutcome::AlreadyExists,
        "delete expecting absence of an existing record"
    );
    assert_eq!(
        one(&store, Write::delete(C, "b", Expect::Etag(etag))).await,
        WriteOutcome::Deleted,
        "delete with the right etag"
    );
    assert_eq!(get(&store, C, "b").await, None);
    assert_eq!(count(&store, C, None).await, 0);
}

// ---------------------------------------------------------------------------------------------
// Batches

/// An empty batch is fine and returns no outcomes.
pub async fn empty_batch<S: Store>(store: S) {
    assert!(batch(&store, Vec::new()).await.is_empty());
}

/// Later items of a batch see the effects of earlier ones.
pub async fn batch_sees_earlier_items<S: Store>(store: S) {
    // Put then delete the same key.
    let outcomes = batch(
        &store,
        vec![
            Write::put(C, "k", Expect::Absent, json!({"v": 1})),
            Write::delete(C, "k", Expect::Any),
        ],
    )
    .await;
    assert!(
        matches!(outcomes[0], WriteOutcome::Written { .. }),
        "put: {:?}",
        outcomes[0]
    );
    assert_eq!(
        outcomes[1],
        WriteOutcome::Deleted,
        "delete after put in the same batch"
    );
    assert_eq!(
        get(&store, C, "k").await,
        None,
        "put then delete leaves nothing"
    );

    // Create twice: the second sees the first.
    let outcomes = batch(
        &store,
        vec![
            Write::put(C, "k", Expect::Absent, json!({"v": 1})),
            Write::put(C, "k", Expect::Absent, json!({"v": 2})),
        ],
    )
    .await;
    let etag = etag_of(&outcomes[0]);
    assert_eq!(
        outcomes[1],
        WriteOutcome::AlreadyExists,
        "second create in the same batch"
    );

    // An etag taken before the batch is stale after an earlier item rewrote the record.
    let outcomes = batch(
        &store,
        vec![
            Write::put(C, "k", Expect::Etag(etag.clone()), json!({"v": 3})),
            Write::delete(C, "k", Expect::Etag(etag.clone())),
            Write::put(C, "k", Expect::Etag(etag), json!({"v": 4})),
        ],
    )
    .await;
    let rewritten = etag_of(&outcomes[0]);
    assert_eq!(
        outcomes[1],
        WriteOutcome::EtagMismatch,
        "delete with the pre-batch etag"
    );
    assert_eq!(
        outcomes[2],
        WriteOutcome::EtagMismatch,
        "put with the pre-batch etag"
    );
    let record = must_get(&store, C, "k").await;
    assert_eq!((record.body, record.etag), (json!({"v": 3}), rewritten));

    // Delete then recreate.
    let outcomes = batch(
        &store,
        vec![
            Write::delete(C, "k", Expect::Any),
            Write::put(C, "k", Expect::Absent, json!({"v": 5})),
        ],
    )
    .await;
    assert_eq!(outcomes[0], WriteOutcome::Deleted);
    let recreated = etag_of(&outcomes[1]);
    let record = must_get(&store, C, "k").await;
    assert_eq!((record.body, record.etag), (json!({"v": 5}), recreated));
}

/// A failed expectation is reported and skipped; the other items still apply.
pub async fn batch_failed_expectation_skips_only_that_item<S: Store>(store: S) {
    put(&store, C, "exists", json!({"v": 0})).await;
    let outcomes = batch(
        &store,
        vec![
            Write::put(C, "a", Expect::Any, json!({"v": 1})),
            Write::put(C, "exists", Expect::Absent, json!({"v": 99})),
            Write::put(C, "b", Expect::Absent, json!({"v": 2})),
            Write::delete(C, "missing", Expect::Any),
            Write::put(C, "missing-2", Expect::Etag("nope".into()), json!({})),
            Write::put(C, "c", Expect::Any, json!({"v": 3})),
        ],
    )
    .await;
    assert!(
        matches!(outcomes[0], WriteOutcome::Written { .. }),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(outcomes[1], WriteOutcome::AlreadyExists);
    assert!(
        matches!(outcomes[2], WriteOutcome::Written { .. }),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(outcomes[3], WriteOutcome::NotFound);
    assert_eq!(outcomes[4], WriteOutcome::NotFound);
    assert!(
        matches!(outcomes[5], WriteOutcome::Written { .. }),
        "{:?}",
        outcomes[5]
    );
    assert_eq!(
        must_get(&store, C, "exists").await.body,
        json!({"v": 0}),
        "refused item applied"
    );
    for (key, v) in [("a", 1), ("b", 2), ("c", 3)] {
        assert_eq!(
            must_get(&store, C, key).await.body,
            json!({"v": v}),
            "{key} not applied"
        );
    }
    assert_eq!(get(&store, C, "missing-2").await, None);
    assert_eq!(count(&store, C, None).await, 4);
}

/// A required write's refusal undoes the whole batch, even the writes before it; an
/// optional write's refusal (and a delete that finds nothing) does not.
pub async fn refused_required_write_rolls_the_batch_back<S: Store>(store: S) {
    let etag = put(&store, C, "device", json!({"v": 0})).await;
    let outcomes = batch(
        &store,
        vec![
            Write::put(C, "record", Expect::Any, json!({"v": 1})),
            Write::delete(C, "marker", Expect::Any),
            Write::put(C, "device", Expect::Absent, json!({"v": 2})).required(),
            Write::put(C, "after", Expect::Any, json!({"v": 3})),
        ],
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::RolledBack,
            WriteOutcome::RolledBack,
            WriteOutcome::AlreadyExists,
            WriteOutcome::RolledBack,
        ]
    );
    assert_eq!(
        get(&store, C, "record").await,
        None,
        "rolled back write kept"
    );
    assert_eq!(
        get(&store, C, "after").await,
        None,
        "write after the refusal applied"
    );
    let device = must_get(&store, C, "device").await;
    assert_eq!((device.body, device.etag), (json!({"v": 0}), etag.clone()));

    // Met, the required write lets the batch through, with its optional refusals.
    let outcomes = batch(
        &store,
        vec![
            Write::put(C, "record", Expect::Etag("nope".into()), json!({"v": 1})),
            Write::delete(C, "marker", Expect::Any),
            Write::put(C, "device", Expect::Etag(etag), json!({"v": 2})).required(),
        ],
    )
    .await;
    assert_eq!(outcomes[0], WriteOutcome::NotFound);
    assert_eq!(outcomes[1], WriteOutcome::NotFound);
    assert!(
        matches!(outcomes[2], WriteOutcome::Written { .. }),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(must_get(&store, C, "device").await.body, json!({"v": 2}));

    // A batch of its own after a rolled-back one in the same group commit is unaffected.
    let (refused, kept) = tokio::join!(
        store.write(vec![
            Write::put(C, "x", Expect::Any, json!({})),
            Write::put(C, "device", Expect::Absent, json!({})).required(),
        ]),
        store.write(vec![Write::put(C, "y", Expect::Any, json!({}))]),
    );
    assert_eq!(
        refused.expect("refused batch"),
        vec![WriteOutcome::RolledBack, WriteOutcome::AlreadyExists]
    );
    assert!(matches!(
        kept.expect("kept batch")[0],
        WriteOutcome::Written { .. }
    ));
    assert_eq!(get(&store, C, "x").await, None);
    assert!(get(&store, C, "y").await.is_some());
}

/// A batch may touch several collections.
pub async fn batch_spans_collections<S: Store>(store: S) {
    let outcomes = batch(
        &store,
        vec![
            Write::put(
                Collection::Enrollments,
                "k",
                Expect::Absent,
                json!({"e": 1}),
            ),
            Write::put(
                Collection::Registrations,
                "k",
                Expect::Absent,
                json!({"r": 1}),
            )
            .with_partition(Some("g".into())),
            Write::put(
                Collection::Operations,
                "op",
                Expect::Absent,
                json!({"o": 1}),
            ),
        ],
    )
    .await;
    assert!(
        outcomes.iter().all(WriteOutcome::is_applied),
        "{outcomes:?}"
    );
    assert_eq!(
        must_get(&store, Collection::Enrollments, "k").await.body,
        json!({"e": 1})
    );
    assert_eq!(
        must_get(&store, Collection::Registrations, "k").await.body,
        json!({"r": 1})
    );
    assert_eq!(
        must_get(&store, Collection::Operations, "op").await.body,
        json!({"o": 1})
    );
}

// ---------------------------------------------------------------------------------------------
// Listing and counting

/// `list` orders by key in byte order (Rust's `str` order), whatever the insertion order.
pub async fn list_is_ordered_by_key<S: Store>(store: S) {
    let inserted = [
        "m", "b", "a-1", "a", "aa", "a.b", "a0", "z", "B", "10", "9", "é",
    ];
    for key in inserted {
        put(&store, C, key, json!({"key": key})).await;
    }
    let mut expected: Vec<String> = inserted.iter().map(|k| k.to_string()).collect();
    expected.sort();
    let records = list(&store, C, all(100)).await;
    assert_eq!(
        keys(&records),
        expected,
        "list must be ordered by key (byte order)"
    );
    for record in &records {
        assert_eq!(
            record.body,
            json!({"key": record.key}),
            "list returns each record's body"
        );
        assert_eq!(
            must_get(&store, C, &record.key).await.etag,
            record.etag,
            "list etag"
        );
    }
}

/// `limit` caps the number of records, taking the first keys.
pub async fn list_limit<S: Store>(store: S) {
    for i in 0..20 {
        put(&store, C, &format!("k{i:02}"), json!(i)).await;
    }
    let records = list(&store, C, all(5)).await;
    assert_eq!(keys(&records), ["k00", "k01", "k02", "k03", "k04"]);
    assert_eq!(
        list(&store, C, all(1000)).await.len(),
        20,
        "a large limit returns everything"
    );
}

/// Paging with `after` = the previous page's last key visits each record exactly once.
pub async fn list_paging_visits_each_record_once<S: Store>(store: S) {
    let total = 150;
    // Written in a scrambled order, in batches.
    let mut expected: Vec<String> = (0..total)
        .map(|i| format!("device-{:03}", (i * 37) % total))
        .collect();
    for chunk in expected.chunks(25) {
        let writes = chunk
            .iter()
            .map(|k| Write::put(C, k.clone(), Expect::Absent, json!({"id": k})))
            .collect();
        let outcomes = batch(&store, writes).await;
        assert!(
            outcomes.iter().all(WriteOutcome::is_applied),
            "{outcomes:?}"
        );
    }
    expected.sort();

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = list(
            &store,
            C,
            ListQuery {
                partition: None,
                after: after.clone(),
                limit: 10,
            },
        )
        .await;
        assert!(
            page.len() <= 10,
            "page {pages} has {} records, limit 10",
            page.len()
        );
        pages += 1;
        assert!(pages <= 16, "paging does not terminate");
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        seen.extend(keys(&page));
    }
    assert_eq!(
        seen, expected,
        "paging must visit every record exactly once, in order"
    );
}

/// A partition filter returns only that partition's records, in key order, and pages.
pub async fn list_partition_filter<S: Store>(store: S) {
    let c = Collection::Registrations;
    for i in 0..12 {
        let partition = match i % 3 {
            0 => Some("g1"),
            1 => Some("g2"),
            _ => None,
        };
        put_in(&store, c, &format!("d{i:02}"), partition, json!({"i": i})).await;
    }
    let g1 = list(
        &store,
        c,
        ListQuery {
            partition: Some("g1".into()),
            after: None,
            limit: 100,
        },
    )
    .await;
    assert_eq!(keys(&g1), ["d00", "d03", "d06", "d09"], "partition g1");
    assert!(g1.iter().all(|r| r.partition.as_deref() == Some("g1")));

    let page = list(
        &store,
        c,
        ListQuery {
            partition: Some("g2".into()),
            after: Some("d04".into()),
            limit: 2,
        },
    )
    .await;
    assert_eq!(
        keys(&page),
        ["d07", "d10"],
        "partition g2 after d04, limit 2"
    );

    let none = list(
        &store,
        c,
        ListQuery {
            partition: Some("g3".into()),
            after: None,
            limit: 100,
        },
    )
    .await;
    assert!(none.is_empty(), "unknown partition lists nothing");
    assert_eq!(
        list(&store, c, all(100)).await.len(),
        12,
        "no filter lists every partition"
    );
}

async fn search<S: Store>(
    store: &S,
    collection: Collection,
    field: SearchField,
    prefix: &str,
    limit: usize,
) -> Vec<String> {
    let query = SearchQuery {
        field,
        prefix: prefix.into(),
        limit,
    };
    let described = format!("{query:?}");
    let found = store
        .search(collection, query)
        .await
        .unwrap_or_else(|e| panic!("search {} {described} failed: {e}", collection.as_str()));
    keys(&found)
}

/// `search` finds registration records by a prefix of their key or of their body's
/// `deviceId` (case-insensitively), ordered by that field then key, within the limit, and
/// follows rewrites and deletes (the device id index is kept with the record).
pub async fn search_by_key_and_device_id<S: Store>(store: S) {
    use SearchField::{DeviceId, Key};
    let c = Collection::Registrations;
    let records = [
        ("sensor-01", Some("g1"), "Dev-B"),
        ("sensor-02", None, "dev-a"),
        ("sensor-10", Some("g2"), "other-1"),
        ("sensor-1", None, "DEV-A2"),
        ("pump-01", Some("g1"), "sensor-01"),
    ];
    for (key, partition, device) in records {
        put_in(
            &store,
            c,
            key,
            partition,
            json!({"registrationId": key, "deviceId": device, "status": "assigned"}),
        )
        .await;
    }
    // A record of another collection with a matching key is not found.
    put(&store, Collection::Operations, "sensor-00", json!({})).await;

    assert_eq!(
        search(&store, c, Key, "sensor-0", 10).await,
        ["sensor-01", "sensor-02"],
        "key prefix"
    );
    assert_eq!(
        search(&store, c, Key, "sensor-1", 10).await,
        ["sensor-1", "sensor-10"],
        "an exact key sorts before longer keys with it as prefix"
    );
    assert_eq!(search(&store, c, Key, "sensor-01", 10).await, ["sensor-01"]);
    assert_eq!(
        search(&store, c, Key, "sensor", 2).await,
        ["sensor-01", "sensor-02"],
        "limit"
    );
    assert!(search(&store, c, Key, "nothing", 10).await.is_empty());

    assert_eq!(
        search(&store, c, DeviceId, "dev-a", 10).await,
        ["sensor-02", "sensor-1"],
        "device id prefix, case-insensitive, ordered by device id"
    );
    assert_eq!(
        search(&store, c, DeviceId, "DEV-", 10).await,
        ["sensor-02", "sensor-1", "sensor-01"],
        "an upper-case prefix matches too"
    );
    assert_eq!(
        search(&store, c, DeviceId, "sensor-01", 10).await,
        ["pump-01"],
        "device ids, not keys"
    );
    assert!(search(&store, c, DeviceId, "nothing", 10).await.is_empty());

    // The index follows rewrites and deletes.
    put_in(
        &store,
        c,
        "sensor-02",
        None,
        json!({"registrationId": "sensor-02", "deviceId": "renamed"}),
    )
    .await;
    one(&store, Write::delete(c, "sensor-1", Expect::Any)).await;
    assert!(search(&store, c, DeviceId, "dev-a", 10).await.is_empty());
    assert_eq!(
        search(&store, c, DeviceId, "RENAMED", 10).await,
        ["sensor-02"]
    );
    assert_eq!(
        search(&store, c, Key, "sensor-1", 10).await,
        ["sensor-10"],
        "deleted"
    );

    // A record without a device id is found by key only.
    put(
        &store,
        c,
        "no-device",
        json!({"registrationId": "no-device"}),
    )
    .await;
    assert_eq!(search(&store, c, Key, "no-", 10).await, ["no-device"]);
    assert!(search(&store, c, DeviceId, "no-", 10).await.is_empty());

    // Other collections keep no device id index.
    let refused = store
        .search(
            Collection::HubDevices,
            SearchQuery {
                field: DeviceId,
                prefix: "x".into(),
                limit: 1,
            },
        )
        .await;
    assert!(
        refused.is_err(),
        "device id search of hub devices must be refused"
    );
}

/// `count` counts a collection, or one partition of it.
pub async fn count_with_and_without_partition<S: Store>(store: S) {
    let c = Collection::HubDevices;
    assert_eq!(count(&store, c, None).await, 0, "empty collection");
    for i in 0..7 {
        put_in(
            &store,
            c,
            &format!("dev{i}"),
            Some(if i < 5 { "hub-a" } else { "hub-b" }),
            json!({}),
        )
        .await;
    }
    put(&store, c, "loose", json!({})).await;
    assert_eq!(count(&store, c, None).await, 8);
    assert_eq!(count(&store, c, Some("hub-a")).await, 5);
    assert_eq!(count(&store, c, Some("hub-b")).await, 2);
    assert_eq!(count(&store, c, Some("hub-c")).await, 0);
    one(&store, Write::delete(c, "dev0", Expect::Any)).await;
    assert_eq!(
        count(&store, c, Some("hub-a")).await,
        4,
        "count after delete"
    );
}

/// The same key in two collections is two records.
pub async fn collections_are_isolated<S: Store>(store: S) {
    let a = Collection::Enrollments;
    let b = Collection::EnrollmentGroups;
    let etag_a = put(&store, a, "same", json!({"in": "a"})).await;
    let created_b = one(
        &store,
        Write::put(b, "same", Expect::Absent, json!({"in": "b"})),
    )
    .await;
    assert!(
        created_b.is_applied(),
        "Absent in another collection must not see the key: {created_b:?}"
    );
    assert_eq!(must_get(&store, a, "same").await.body, json!({"in": "a"}));
    assert_eq!(must_get(&store, b, "same").await.body, json!({"in": "b"}));
    assert_eq!(get(&store, Collection::Settings, "same").await, None);

    assert_eq!(
        one(
            &store,
            Write::put(b, "same", Expect::Etag(etag_a.clone()), json!({}))
        )
        .await,
        WriteOutcome::EtagMismatch,
        "an etag from another collection must not match"
    );
    put(&store, a, "only-a", json!({})).await;
    assert_eq!(count(&store, a, None).await, 2);
    assert_eq!(count(&store, b, None).await, 1);
    assert_eq!(keys(&list(&store, b, all(10)).await), ["same"]);

    assert_eq!(
        one(&store, Write::delete(a, "same", Expect::Etag(etag_a))).await,
        WriteOutcome::Deleted
    );
    assert!(
        get(&store, b, "same").await.is_some(),
        "delete in one collection must not touch another"
    );
    for collection in Collection::ALL {
        let n = count(&store, *collection, None).await;
        let expected = match collection {
            Collection::Enrollments | Collection::EnrollmentGroups => 1,
            _ => 0,
        };
        assert_eq!(n, expected, "count of {}", collection.as_str());
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency

/// 50 tasks writing at once: every write lands, each with its own etag.
pub async fn concurrent_writes_all_land<S: Store>(store: S) {
    let store = Arc::new(store);
    let tasks = 50;
    let per_task = 4;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            let mut etags = Vec::new();
            for i in 0..per_task {
                let key = format!("t{t:02}-{i}");
                let body = json!({"task": t, "i": i});
                let write = Write::put(C, key.clone(), Expect::Absent, body)
                    .with_partition(Some(format!("p{}", t % 5)));
                etags.push((key, etag_of(&one(&*store, write).await)));
            }
            etags
        }));
    }
    let mut all_etags = HashSet::new();
    let mut written = Vec::new();
    for handle in handles {
        let etags = handle
            .await
            .unwrap_or_else(|e| panic!("writer task failed: {e}"));
        for (key, etag) in etags {
            assert!(
                all_etags.insert(etag.clone()),
                "etag {etag} handed out twice"
            );
            written.push((key, etag));
        }
    }
    assert_eq!(
        count(&*store, C, None).await,
        (tasks * per_task) as u64,
        "every write must land"
    );
    assert_eq!(
        count(&*store, C, Some("p0")).await,
        (tasks / 5 * per_task) as u64
    );
    for (key, etag) in written {
        let record = must_get(&*store, C, &key).await;
        assert_eq!(
            record.etag, etag,
            "{key} must carry the etag its write returned"
        );
    }
}

/// 50 tasks racing to create the same key: exactly one wins, the rest see `AlreadyExists`.
pub async fn concurrent_conditional_creates_have_one_winner<S: Store>(store: S) {
    let store = Arc::new(store);
    let mut handles = Vec::new();
    for t in 0..50 {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            one(
                &*store,
                Write::put(C, "contended", Expect::Absent, json!({"winner": t})),
            )
            .await
        }));
    }
    let mut winners = Vec::new();
    for handle in handles {
        match handle
            .await
            .unwrap_or_else(|e| panic!("writer task failed: {e}"))
        {
            WriteOutcome::Written { etag } => winners.push(etag),
            WriteOutcome::AlreadyExists => {}
            other => panic!("racing create returned {other:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one create must win, got {}",
        winners.len()
    );
    assert_eq!(must_get(&*store, C, "contended").await.etag, winners[0]);
}

// ---------------------------------------------------------------------------------------------
// Contents

/// Unicode keys, partitions and bodies, and a 1 MiB body, round-trip exactly.
pub async fn unicode_and_large_bodies<S: Store>(store: S) {
    let unicode = json!({
        "text": "héllo wörld ✓ 日本語 🚀 \u{0} \"quoted\" \\ back\nslash",
        "emoji-key-🔑": ["ä", "€", "𝄞"],
    });
    let key = "ключ-🔑";
    put_in(&store, C, key, Some("раздел"), unicode.clone()).await;
    let record = must_get(&store, C, key).await;
    assert_eq!(record.body, unicode, "unicode body");
    assert_eq!(
        record.partition.as_deref(),
        Some("раздел"),
        "unicode partition"
    );
    assert_eq!(
        keys(
            &list(
                &store,
                C,
                ListQuery {
                    partition: Some("раздел".into()),
                    after: None,
                    limit: 10
                }
            )
            .await
        ),
        [key]
    );

    let big = "x".repeat(1024 * 1024);
    let large = json!({"payload": big, "tail": "end"});
    put(&store, C, "large", large.clone()).await;
    assert_eq!(must_get(&store, C, "large").await.body, large, "1 MiB body");
    let listed = list(&store, C, all(10)).await;
    let listed = listed
        .iter()
        .find(|r| r.key == "large")
        .unwrap_or_else(|| panic!("large not listed"));
    assert_eq!(listed.body, large, "1 MiB body via list");
}

// ---------------------------------------------------------------------------------------------
// Sealing

/// A key-like secret no encoding of the rest of a body could contain by chance.
fn secret_for(collection: Collection, n: usize) -> String {
    format!("S3cret{}{n}Xq9", collection.as_str().replace('_', ""))
}

/// Sealing keeps secret collections usable: key order, partition filter, paging, counts,
/// conditional writes and deletes work as for any other collection.
pub async fn secret_collections_are_queryable<S: Store>(store: S) {
    for collection in Collection::ALL
        .iter()
        .copied()
        .filter(Collection::is_secret)
    {
        let name = collection.as_str();
        for (i, key) in ["c", "a", "b"].iter().enumerate() {
            let body = json!({"id": key, "primaryKey": secret_for(collection, i)});
            put_in(&store, collection, key, Some("p"), body).await;
        }
        put_in(&store, collection, "z", Some("q"), json!({"id": "z"})).await;
        let listed = list(
            &store,
            collection,
            ListQuery {
                partition: Some("p".into()),
                after: Some("a".into()),
                limit: 10,
            },
        )
        .await;
        assert_eq!(keys(&listed), ["b", "c"], "{name}: partition, after, order");
        assert_eq!(
            listed[0].body,
            json!({"id": "b", "primaryKey": secret_for(collection, 2)}),
            "{name}: body round-trips through list"
        );
        assert_eq!(count(&store, collection, Some("p")).await, 3, "{name}");
        let etag = must_get(&store, collection, "a").await.etag;
        let outcome = one(
            &store,
            Write::put(collection, "a", Expect::Etag(etag), json!({"id": "a2"})),
        )
        .await;
        assert!(outcome.is_applied(), "{name}: conditional put {outcome:?}");
        assert_eq!(
            must_get(&store, collection, "a").await.body,
            json!({"id": "a2"})
        );
        let outcome = one(&store, Write::delete(collection, "z", Expect::Any)).await;
        assert_eq!(outcome, WriteOutcome::Deleted, "{name}");
        assert_eq!(get(&store, collection, "z").await, None, "{name}");
    }
}

/// No secret written to a secret collection appears in the bytes the store keeps at rest
/// (`at_rest` returns them, read after the writes committed), neither as written nor in
/// the base64 form keys take; while a marker written to a collection that is not secret does,
/// which proves `at_rest` sees the data.
pub async fn secrets_sealed_at_rest<S: Store, F>(store: S, at_rest: F)
where
    F: Fn() -> Vec<u8>,
{
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut secrets = Vec::new();
    for collection in Collection::ALL
        .iter()
        .copied()
        .filter(Collection::is_secret)
    {
        for i in 0..3 {
            let secret = secret_for(collection, i);
            let body = json!({
                "attestation": {"symmetricKey": {"primaryKey": b64.encode(&secret)}},
                "connectionString": format!("SharedAccessKey={secret}"),
            });
            put_in(&store, collection, &format!("record-{i}"), Some("p"), body).await;
            secrets.push((collection, secret.clone()));
            secrets.push((collection, b64.encode(&secret)));
        }
        // An update writes the body again.
        let body = json!({"primaryKey": secret_for(collection, 9)});
        put(&store, collection, "record-0", body).await;
        secrets.push((collection, secret_for(collection, 9)));
    }
    let marker = "NotSecretMarker7c1";
    put(
        &store,
        Collection::Registrations,
        "marker",
        json!({"m": marker}),
    )
    .await;

    let bytes = at_rest();
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        contains(marker),
        "the bytes at rest must hold the clear marker of a collection that is not secret, or \
         this check proves nothing ({} bytes)",
        bytes.len()
    );
    for (collection, secret) in &secrets {
        assert!(
            !contains(secret),
            "a secret of {} is readable at rest: {secret}",
            collection.as_str()
        );
    }
    for collection in Collection::ALL
        .iter()
        .copied()
        .filter(Collection::is_secret)
    {
        let record = must_get(&store, collection, "record-1").await;
        assert_eq!(
            record.body["connectionString"],
            json!(format!("SharedAccessKey={}", secret_for(collection, 1))),
            "{}: the sealed body reads back",
            collection.as_str()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The audit log

/// Audit entries ([`crate::audit`]) written out of time order list in time order, filtered
/// and paged, and pruning deletes exactly the entries before the cutoff.
pub async fn audit_log_lists_in_time_order_and_prunes<S: Store>(store: S) {
    use crate::audit::{self, AuditEntry, AuditFilter, AuditSource};
    use muster_proto::runtime::SeededEntropy;
    use muster_proto::Timestamp;

    let start = Timestamp::from_unix_millis(1_700_000_000_000).expect("valid time");
    let at = |secs: i64| Timestamp(start.0 + chrono::Duration::seconds(secs));
    let entropy = SeededEntropy::new(1);
    for (secs, policy, id) in [(30, "owner", "c"), (10, "owner", "a"), (20, "reader", "b")] {
        let entry = AuditEntry {
            time: at(secs),
            policy: Some(policy.into()),
            source: AuditSource::Api,
            method: "PUT".into(),
            route: "/enrollments/{id}".into(),
            id: Some(id.into()),
            status: 200,
            error_code: None,
        };
        audit::append(&store, &entry, &entropy)
            .await
            .unwrap_or_else(|e| panic!("appending audit entry {id}: {e}"));
    }
    let ids = |page: &audit::AuditPage| -> Vec<String> {
        page.entries
            .iter()
            .map(|(_, e)| e.id.clone().unwrap_or_default())
            .collect()
    };
    let everything = audit::list(&store, &AuditFilter::default(), None, 10, 100)
        .await
        .expect("listing the audit log");
    assert_eq!(
        ids(&everything),
        ["a", "b", "c"],
        "audit entries in time order"
    );
    let owner = AuditFilter {
        policy: Some("owner".into()),
        ..AuditFilter::default()
    };
    let first = audit::list(&store, &owner, None, 1, 100)
        .await
        .expect("first page");
    assert_eq!(ids(&first), ["a"]);
    let second = audit::list(&store, &owner, first.next_after.clone(), 1, 100)
        .await
        .expect("second page");
    assert_eq!(ids(&second), ["c"], "the next page starts after the first");

    let pruned = audit::prune_before(&store, at(20), 1)
        .await
        .expect("pruning");
    assert_eq!(pruned, 1, "only the entry before the cutoff is pruned");
    let left = audit::list(&store, &AuditFilter::default(), None, 10, 100)
        .await
        .expect("listing after pruning");
    assert_eq!(ids(&left), ["b", "c"]);
}

// ---------------------------------------------------------------------------------------------
// Issued certificates

/// Issued certificates: recorded once per serial, listed by serial in pages, one
/// registration's through its partition, revoked once (a second revocation keeps the first).
pub async fn issued_certificates_list_filter_and_revoke<S: Store>(store: S) {
    use crate::issued::{self, Revoked};
    use muster_proto::issued_certificate::IssuedCertificate;
    use muster_proto::Timestamp;

    let at =
        |secs: i64| Timestamp::from_unix_millis(1_700_000_000_000 + secs * 1000).expect("time");
    let cert = |serial: &str, rid: &str| IssuedCertificate {
        serial_number: serial.into(),
        sha256_thumbprint: format!("{serial}{}", "0".repeat(64 - serial.len())),
        registration_id: rid.into(),
        enrollment_type: "group".into(),
        enrollment_group_id: Some("sensors".into()),
        issuing_ca: "local".into(),
        subject_name: format!("CN={rid}"),
        issuer_name: "CN=Muster Device Issuing CA".into(),
        not_before_utc: at(0),
        not_after_utc: at(86_400),
        issued_date_time_utc: at(300),
        revoked_date_time_utc: None,
        revocation_reason: None,
    };
    for (serial, rid) in [("3C", "Dev-1"), ("1A", "dev-2"), ("2B", "dev-1")] {
        let write = issued::record_write(&cert(serial, rid)).expect("encoding");
        assert!(one(&store, write).await.is_applied(), "recording {serial}");
    }
    let again = issued::record_write(&cert("1A", "dev-9")).expect("encoding");
    assert_eq!(
        one(&store, again).await,
        WriteOutcome::AlreadyExists,
        "a serial is recorded once"
    );
    let serials = |certs: &[IssuedCertificate]| -> Vec<String> {
        certs.iter().map(|c| c.serial_number.clone()).collect()
    };
    let (all, next) = issued::list(&store, None, None, 10).await.expect("listing");
    assert_eq!(serials(&all), ["1A", "2B", "3C"], "listed by serial");
    assert_eq!(next, None, "a short page is the last");
    let (first, next) = issued::list(&store, None, None, 2).await.expect("page 1");
    assert_eq!(serials(&first), ["1A", "2B"]);
    let (second, next) = issued::list(&store, None, next, 2).await.expect("page 2");
    assert_eq!(
        serials(&second),
        ["3C"],
        "the next page starts after the first"
    );
    assert_eq!(next, None);
    let (dev1, _) = issued::list(&store, Some("DEV-1"), None, 10)
        .await
        .expect("one registration's");
    assert_eq!(
        serials(&dev1),
        ["2B", "3C"],
        "filtered by registration id, any case"
    );

    let revoked = issued::revoke(&store, "2b", at(600), Some("key lost".into()))
        .await
        .expect("revoking");
    let Revoked::Now(now) = revoked else {
        panic!("the first revocation applies: {revoked:?}")
    };
    assert_eq!(now.revoked_date_time_utc, Some(at(600)));
    let stored = issued::get(&store, "2B")
        .await
        .expect("get")
        .expect("still there");
    assert_eq!(stored.revocation_reason.as_deref(), Some("key lost"));
    assert!(stored.is_revoked());
    let twice = issued::revoke(&store, "2B", at(900), Some("other".into()))
        .await
        .expect("revoking again");
    assert!(
        matches!(&twice, Revoked::Already(c) if c.revocation_reason.as_deref() == Some("key lost")),
        "a second revocation keeps the first: {twice:?}"
    );
    let (dev1, _) = issued::list(&store, Some("dev-1"), None, 10)
        .await
        .expect("after revoke");
    assert_eq!(serials(&dev1), ["2B", "3C"], "revoking keeps the partition");
    assert_eq!(
        issued::revoke(&store, "FF", at(0), None)
            .await
            .expect("unknown"),
        Revoked::NotFound
    );
}

// ---------------------------------------------------------------------------------------------
// Change counters

/// Where a store counts a collection's changes ([`Store::changes`] is `Some`), every write to
/// it moves the counter before the writer hears it committed: puts, deletes, and writes in a
/// batch with other collections.
pub async fn counted_changes_move_on_every_write<S: Store>(store: S) {
    let groups = Collection::EnrollmentGroups;
    let writes = [
        vec![Write::put(groups, "g", Expect::Any, json!({"n": 1}))],
        vec![
            Write::put(Collection::Registrations, "r", Expect::Any, json!({})),
            Write::put(groups, "g", Expect::Any, json!({"n": 2})),
        ],
        vec![Write::delete(groups, "g", Expect::Any)],
    ];
    for batch_writes in writes {
        let before = store.changes(groups);
        let described = format!("{batch_writes:?}");
        batch(&store, batch_writes).await;
        if let (Some(before), Some(after)) = (before, store.changes(groups)) {
            assert_ne!(before, after, "the counter did not move on {described}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Claims

/// The collection claims are checked on (the one the engine claims).
const CL: Collection = Collection::PendingAssignments;

async fn claim<S: Store>(
    store: &S,
    owner: &str,
    now: i64,
    until: i64,
    limit: usize,
) -> Vec<String> {
    store
        .claim(CL, owner, now, until, limit)
        .await
        .unwrap_or_else(|e| panic!("claim by {owner} failed: {e}"))
        .into_iter()
        .map(|r| r.key)
        .collect()
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A claim returns records nobody holds, in key order with their bodies and etags, up to
/// its limit; it leaves etags alone; another claimer gets none of them while the lease
/// runs; the holder claiming again gets its own records back (a restarted node).
pub async fn claims_take_free_expired_and_own_records<S: Store>(store: S) {
    let mut etags = Vec::new();
    for k in ["c", "a", "b"] {
        etags.push((k, put(&store, CL, k, json!({"k": k})).await));
    }
    let first = store
        .claim(CL, "node-1", 1_000, 31_000, 2)
        .await
        .unwrap_or_else(|e| panic!("claim failed: {e}"));
    let got: Vec<&str> = first.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        got,
        ["a", "b"],
        "a claim takes free records in key order, up to its limit"
    );
    for r in &first {
        assert_eq!(r.body, json!({"k": r.key}), "a claim returns the body");
        let (_, etag) = etags.iter().find(|(k, _)| *k == r.key).expect("written");
        assert_eq!(
            &r.etag, etag,
            "a claim returns the etag and does not change it"
        );
        assert_eq!(&must_get(&store, CL, &r.key).await.etag, etag);
    }
    assert_eq!(
        claim(&store, "node-2", 2_000, 32_000, 10).await,
        names(&["c"]),
        "another node gets only what is not held"
    );
    assert_eq!(
        claim(&store, "node-1", 3_000, 33_000, 10).await,
        names(&["a", "b"]),
        "the holder claiming again gets its own records back"
    );
    assert!(
        claim(&store, "node-3", 4_000, 34_000, 10).await.is_empty(),
        "nothing is free while the leases run"
    );
    one(&store, Write::delete(CL, "a", Expect::Any)).await;
    assert_eq!(
        claim(&store, "node-1", 5_000, 35_000, 10).await,
        names(&["b"]),
        "a deleted record is no longer claimed"
    );
    put(&store, CL, "a", json!({"k": "again"})).await;
    assert_eq!(
        claim(&store, "node-3", 6_000, 36_000, 10).await,
        names(&["a"]),
        "a record written again after its delete starts unclaimed"
    );
}

/// Two claimers racing over the same records: each record goes to exactly one of them.
pub async fn racing_claimers_each_record_goes_to_one<S: Store>(store: S) {
    let store = Arc::new(store);
    let n = 60;
    for i in 0..n {
        put(&*store, CL, &format!("r{i:03}"), json!({"i": i})).await;
    }
    let mut handles = Vec::new();
    for node in ["node-a", "node-b"] {
        for _ in 0..4 {
            let store = Arc::clone(&store);
            handles.push(tokio::spawn(async move {
                let got = claim(&*store, node, 1_000, 31_000, 7).await;
                (node, got)
            }));
        }
    }
    let mut by_node: std::collections::HashMap<&str, HashSet<String>> = Default::default();
    for handle in handles {
        let (node, got) = handle
            .await
            .unwrap_or_else(|e| panic!("claim task failed: {e}"));
        by_node.entry(node).or_default().extend(got);
    }
    let a = by_node.remove("node-a").unwrap_or_default();
    let b = by_node.remove("node-b").unwrap_or_default();
    let both: Vec<&String> = a.intersection(&b).collect();
    assert!(both.is_empty(), "records claimed by both nodes: {both:?}");
    // Whatever the first round left free goes to one of them now; nothing is lost.
    let mut rest = claim(&*store, "node-a", 2_000, 31_000, 1000).await;
    rest.retain(|k| !a.contains(k));
    let total = a.len() + b.len() + rest.len();
    assert_eq!(total, n, "every record is claimed by exactly one node");
    assert!(
        claim(&*store, "node-c", 3_000, 33_000, 1000)
            .await
            .is_empty(),
        "a third node finds nothing free"
    );
}

/// A lease that lapsed (`until <= now`) is taken over by another node, and the old holder
/// can no longer renew it.
pub async fn expired_lease_is_taken_over<S: Store>(store: S) {
    put(&store, CL, "work", json!({})).await;
    assert_eq!(
        claim(&store, "dead", 1_000, 31_000, 10).await,
        names(&["work"])
    );
    assert!(
        claim(&store, "alive", 30_999, 60_999, 10).await.is_empty(),
        "a running lease is not taken"
    );
    assert_eq!(
        claim(&store, "alive", 31_000, 61_000, 10).await,
        names(&["work"]),
        "a lapsed lease is taken over"
    );
    let renewed = store
        .renew(CL, "dead", &names(&["work"]), 90_000)
        .await
        .unwrap_or_else(|e| panic!("renew failed: {e}"));
    assert!(
        renewed.is_empty(),
        "the old holder must not renew a taken record"
    );
    assert!(
        claim(&store, "third", 60_000, 90_000, 10).await.is_empty(),
        "the new lease holds"
    );
}

/// A lease renewed before it lapsed is not taken when the original expiry passes; renewing
/// reports only what the caller holds.
pub async fn renewed_lease_is_not_taken<S: Store>(store: S) {
    put(&store, CL, "mine", json!({})).await;
    put(&store, CL, "theirs", json!({})).await;
    assert_eq!(
        claim(&store, "me", 1_000, 31_000, 1).await,
        names(&["mine"])
    );
    assert_eq!(
        claim(&store, "them", 1_000, 31_000, 1).await,
        names(&["theirs"])
    );
    let renewed = store
        .renew(CL, "me", &names(&["mine", "theirs", "gone"]), 61_000)
        .await
        .unwrap_or_else(|e| panic!("renew failed: {e}"));
    assert_eq!(
        renewed,
        names(&["mine"]),
        "only the caller's own leases are renewed"
    );
    assert_eq!(
        claim(&store, "other", 40_000, 70_000, 10).await,
        names(&["theirs"]),
        "the renewed lease holds past its first expiry; the other lapsed"
    );
    assert_eq!(
        claim(&store, "other", 61_000, 91_000, 10).await,
        names(&["mine", "theirs"])
    );
}

/// A put with a lease writes the record already claimed (no node can take it in between);
/// a later put without one keeps the claim.
pub async fn lease_written_with_a_put_and_kept_by_later_puts<S: Store>(store: S) {
    let lease = Lease {
        owner: "writer".into(),
        until_ms: 31_000,
    };
    let outcome = one(
        &store,
        Write::put(CL, "born-claimed", Expect::Absent, json!({"v": 1})).with_lease(lease),
    )
    .await;
    assert!(outcome.is_applied(), "{outcome:?}");
    assert!(
        claim(&store, "other", 1_000, 31_000, 10).await.is_empty(),
        "a record written with a lease is claimed from its first write"
    );
    put(&store, CL, "born-claimed", json!({"v": 2})).await;
    assert!(
        claim(&store, "other", 2_000, 32_000, 10).await.is_empty(),
        "a put without a lease keeps the claim"
    );
    assert_eq!(
        claim(&store, "writer", 2_000, 32_000, 10).await,
        names(&["born-claimed"])
    );
    assert_eq!(
        must_get(&store, CL, "born-claimed").await.body,
        json!({"v": 2})
    );
    assert_eq!(
        claim(&store, "other", 32_000, 62_000, 10).await,
        names(&["born-claimed"]),
        "it lapses like any claim"
    );
}

/// A released claim is free at once; a release by another node changes nothing.
pub async fn released_claim_is_free<S: Store>(store: S) {
    put(&store, CL, "k", json!({})).await;
    assert_eq!(
        claim(&store, "holder", 1_000, 31_000, 10).await,
        names(&["k"])
    );
    store
        .release(CL, "stranger", &names(&["k"]))
        .await
        .unwrap_or_else(|e| panic!("release failed: {e}"));
    assert!(
        claim(&store, "other", 2_000, 32_000, 10).await.is_empty(),
        "a stranger cannot release another node's claim"
    );
    store
        .release(CL, "holder", &names(&["k"]))
        .await
        .unwrap_or_else(|e| panic!("release failed: {e}"));
    assert_eq!(
        claim(&store, "other", 2_000, 32_000, 10).await,
        names(&["k"]),
        "a released record is claimable at once"
    );
}
