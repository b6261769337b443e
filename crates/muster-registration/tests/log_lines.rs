//! A burst of failing registrations writes a bounded log: the per-request warning is
//! rate-limited (`muster_proto::log_limit`) and says how many lines it held back.
//!
//! Its own test binary: the limiters are process-wide.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::{request, Fixture};
use muster_registration::DeviceRegistrar;
use tracing_subscriber::fmt::MakeWriter;

/// Everything the subscriber writes, kept for the test to count.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("lock").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn a_burst_of_failing_registrations_writes_a_bounded_log() {
    const BURST: usize = 50;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // The current-thread runtime runs every task of this test on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = Fixture::new(&["dev-refused"]).await;
    f.hub.refuse_puts.store(true, Ordering::SeqCst);
    let engine = f.engine();
    for _ in 0..BURST {
        let reply = engine.register(request("dev-refused")).await;
        // Each device still gets its answer: a failed registration naming the hub's refusal.
        assert_eq!(reply.body["status"], "failed", "{}", reply.body);
        assert_eq!(reply.body["registrationState"]["errorCode"], 500002);
    }

    let lines = captured.lines();
    let failed: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("assignment failed"))
        .collect();
    // Within one 10 s interval: the first failure only.
    assert_eq!(failed.len(), 1, "{lines:#?}");
    assert!(
        lines.len() <= 2,
        "{} lines for {BURST} requests: {lines:#?}",
        lines.len()
    );
}
