//! The audit log on SQLite: chronological keys, filtered paging, retention with a controlled
//! clock.

use muster_proto::runtime::{Clock, ManualClock, OsEntropy};
use muster_proto::Timestamp;
use muster_store::audit::{self, AuditEntry, AuditFilter, AuditSource};
use muster_store::{Collection, SqliteStore, Store};

const DAY_SECS: i64 = 24 * 3600;

fn entry(time: Timestamp, policy: &str, id: &str) -> AuditEntry {
    AuditEntry {
        time,
        policy: Some(policy.into()),
        source: AuditSource::Api,
        method: "PUT".into(),
        route: "/enrollments/{id}".into(),
        id: Some(id.into()),
        status: 200,
        error_code: None,
    }
}

fn start() -> Timestamp {
    Timestamp::from_unix_millis(1_700_000_000_000).expect("valid time")
}

#[tokio::test]
async fn entries_list_in_time_order_filtered_and_paged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("m.db")).expect("open");
    let clock = ManualClock::new(start());
    // Written out of time order on purpose: the key, not the write order, decides.
    for (offset, policy, id) in [
        (30, "owner", "c"),
        (10, "owner", "a"),
        (20, "reader", "b"),
        (40, "owner", "a"),
    ] {
        let t = Timestamp(start().0 + chrono::Duration::seconds(offset));
        audit::append(&store, &entry(t, policy, id), &OsEntropy)
            .await
            .expect("append");
    }
    clock.advance_secs(60);

    let all = audit::list(&store, &AuditFilter::default(), None, 10, 100)
        .await
        .expect("list");
    let ids: Vec<_> = all
        .entries
        .iter()
        .map(|(_, e)| e.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b", "c", "a"]);
    assert_eq!(all.next_after, None);

    let by_policy = AuditFilter {
        policy: Some("OWNER".into()),
        ..Default::default()
    };
    let page1 = audit::list(&store, &by_policy, None, 2, 100)
        .await
        .expect("page 1");
    assert_eq!(page1.entries.len(), 2);
    let page2 = audit::list(&store, &by_policy, page1.next_after.clone(), 2, 100)
        .await
        .expect("page 2");
    let ids: Vec<_> = page2
        .entries
        .iter()
        .map(|(_, e)| e.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["a"], "the last owner entry, at +40 s");

    let window = AuditFilter {
        from: Some(Timestamp(start().0 + chrono::Duration::seconds(20))),
        to: Some(Timestamp(start().0 + chrono::Duration::seconds(40))),
        id: None,
        policy: None,
    };
    let w = audit::list(&store, &window, None, 10, 100)
        .await
        .expect("window");
    let ids: Vec<_> = w
        .entries
        .iter()
        .map(|(_, e)| e.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["b", "c"], "from is inclusive, to exclusive");

    // A scan limit smaller than the log still pages through everything.
    let by_id = AuditFilter {
        id: Some("a".into()),
        ..Default::default()
    };
    let mut after = None;
    let mut found = 0;
    for _ in 0..10 {
        let p = audit::list(&store, &by_id, after, 10, 1)
            .await
            .expect("scan");
        found += p.entries.len();
        after = p.next_after;
        if after.is_none() {
            break;
        }
    }
    assert_eq!(found, 2);
}

#[tokio::test]
async fn retention_prunes_only_entries_older_than_the_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("m.db")).expect("open");
    let clock = ManualClock::new(start());
    audit::append(&store, &entry(clock.now(), "owner", "old"), &OsEntropy)
        .await
        .expect("append old");
    clock.advance_secs(50 * DAY_SECS);
    audit::append(&store, &entry(clock.now(), "owner", "newer"), &OsEntropy)
        .await
        .expect("append newer");

    // 50 days on: nothing is older than 90 days yet.
    assert_eq!(
        audit::prune_expired(&store, &clock, 90)
            .await
            .expect("prune"),
        0
    );
    assert_eq!(
        store
            .count(Collection::AuditLog, None)
            .await
            .expect("count"),
        2
    );

    // 91 days after the first entry: only it goes.
    clock.advance_secs(41 * DAY_SECS);
    assert_eq!(
        audit::prune_expired(&store, &clock, 90)
            .await
            .expect("prune"),
        1
    );
    let left = audit::list(&store, &AuditFilter::default(), None, 10, 100)
        .await
        .expect("list");
    let ids: Vec<_> = left
        .entries
        .iter()
        .map(|(_, e)| e.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["newer"]);
}
