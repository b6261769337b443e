//! Crash safety of the real binary: registration storms over HTTPS and MQTT and a cascade
//! deprovisioning, each interrupted by `kill -9` at a random moment, then checked after the
//! restart: every acknowledged registration has its record and its hub device, no hub device
//! is left without a record (no orphan), no duplicate, every `assigning` record finishes, and
//! every acknowledged deprovisioning left neither record nor device.
//!
//! The kill moments come from a seed the test prints (`MUSTER_CRASH_SEED=N` replays one).
//! `MUSTER_CRASH_BIN=/path/to/muster` runs the same test against another build (how it was
//! shown to fail on a build without intents).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_client::{
    ConnectionFile, DeviceClient, DeviceKey, HubClient, RegisterOptions, RetryPolicy,
    ServiceClient, Transport,
};
use muster_proto::{EnrollmentGroup, RegistrationStatus};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

/// Devices per storm round; each round is killed once, then its unacknowledged devices
/// register again, so three rounds acknowledge more than 2,000 registrations.
const ROUND: usize = 700;
const ROUNDS: usize = 3;
/// Registrations (and deprovisionings) in flight at once.
const IN_FLIGHT: usize = 48;
/// Devices deprovisioned with cascade while the server is killed.
const DEPROVISIONS: usize = 300;
const GROUP: &str = "crash-storm";

/// splitmix64: the kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `lo..hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}

/// The `muster serve` process; killed (SIGKILL) when dropped.
struct ServerProcess {
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
    starts: usize,
    /// HTTPS and MQTT ports, found free once (port 0) and kept across restarts: the built-in
    /// hub's name includes its port, and records name their hub.
    ports: (u16, u16),
}

/// A port the system considers free on 127.0.0.1 now (bound with port 0, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl ServerProcess {
    fn binary() -> PathBuf {
        std::env::var_os("MUSTER_CRASH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_muster")))
    }

    fn new(dir: &Path) -> Self {
        Self {
            child: None,
            data_dir: dir.join("data"),
            log: dir.join("server.log"),
            starts: 0,
            ports: (free_port(), free_port()),
        }
    }

    /// Starts the server on 127.0.0.1 and waits until it says it is running.
    fn start(&mut self) -> ConnectionFile {
        let file = self.data_dir.join(ConnectionFile::FILE_NAME);
        let _ = std::fs::remove_file(&file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log file");
        let mut command = Command::new(Self::binary());
        for (k, _) in std::env::vars() {
            if k.starts_with("MUSTER_") {
                command.env_remove(k);
            }
        }
        command
            .args(["serve", "--dps-host", "127.0.0.1"])
            .arg("--https-port")
            .arg(self.ports.0.to_string())
            .arg("--mqtt-port")
            .arg(self.ports.1.to_string())
            .args(["--amqp-port", "0"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone().expect("log handle"));
        let mut child = command.spawn().expect("muster serve starts");
        self.starts += 1;
        // `serve` prints "Muster is running." once connection.json is written; the rest of
        // its output goes to the log.
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Muster is running") {
                    let _ = ready.send(());
                }
                let _ = writeln!(log, "{line}");
            }
        });
        self.child = Some(child);
        if started.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!(
                "muster serve did not start within 30 s:\n{}",
                self.log_tail()
            );
        }
        ConnectionFile::read(&self.data_dir).expect("connection.json after start")
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The clients of one server run (ports change with every start).
struct Clients {
    devices: DeviceClient,
    service: ServiceClient,
    hub: HubClient,
}

impl Clients {
    fn new(info: &ConnectionFile) -> Self {
        let ca = info.ca_certificate.as_deref();
        let devices = DeviceClient::new(&info.device_endpoint, &info.id_scope, ca)
            .expect("device client")
            .with_mqtt_port(info.mqtt_port)
            // One attempt: a kill must show up as a failure, not be retried away.
            .with_retry_policy(RetryPolicy {
                max_attempts: 1,
                max_polls: 30,
                default_wait: Duration::from_millis(200),
                max_wait: Duration::from_secs(2),
            });
        let service = ServiceClient::from_connection_string(&info.service_connection_string, ca)
            .expect("service client");
        let hub = info
            .hubs
            .iter()
            .find(|h| h.built_in)
            .map(|h| HubClient::from_connection_string(&h.connection_string, ca))
            .expect("the built-in hub")
            .expect("hub client");
        Self {
            devices,
            service,
            hub,
        }
    }
}

/// Registers `ids` (even positions over HTTPS, odd over MQTT), `IN_FLIGHT` at once; with
/// `kill_after = Some(n)`, `kill` is notified once `n` were acknowledged. Returns the ids
/// whose registration was acknowledged as assigned.
async fn storm(
    clients: &Clients,
    key: &str,
    ids: &[String],
    kill_after: Option<(usize, Arc<Notify>)>,
) -> HashSet<String> {
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let devices = clients.devices.clone();
        let key = DeviceKey::Group(key.to_string());
        let id = id.clone();
        let gate = gate.clone();
        let acked = acked.clone();
        let kill_after = kill_after.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let options = RegisterOptions {
                transport: if i % 2 == 0 {
                    Transport::Https
                } else {
                    Transport::Mqtt
                },
                payload: None,
                csr: None,
            };
            // While the server lives (no kill planned), a device that gets an error tries
            // again, as real devices do; what it got is printed for the log.
            let attempts = if kill_after.is_some() { 1 } else { 3 };
            let mut assigned = false;
            for attempt in 1..=attempts {
                match devices.register(&id, &key, &options).await {
                    Ok(r) if r.is_assigned() => {
                        assigned = true;
                        break;
                    }
                    Ok(r) if attempts > 1 => {
                        eprintln!("{id}: attempt {attempt} not assigned: {:?}", r.status)
                    }
                    Err(e) if attempts > 1 => eprintln!("{id}: attempt {attempt} failed: {e}"),
                    _ => {}
                }
            }
            if !assigned {
                return None;
            }
            let n = acked.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some((at, kill)) = kill_after {
                if n == at {
                    kill.notify_one();
                }
            }
            Some(id)
        });
    }
    let mut out = HashSet::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some(id)) = done {
            out.insert(id);
        }
    }
    out
}

/// What the store and the hub hold for the test's devices after a restart.
#[derive(Debug, Default)]
struct Census {
    records: usize,
    assigned: usize,
    hub_devices: usize,
    /// Hub devices with no record naming them.
    orphans: Vec<String>,
    /// Assigned records whose hub device is missing.
    missing_devices: Vec<String>,
    /// Registration ids listed more than once.
    duplicates: usize,
    /// Devices with an assigned record and their hub device.
    complete: HashSet<String>,
    /// Records still `assigning` when first looked at (all must finish).
    assigning_seen: usize,
}

async fn census(clients: &Clients, universe: &[String]) -> Census {
    let mut c = Census::default();
    // Every `assigning` record must finish; the restart's resume runs in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = true;
    let records = loop {
        let records = clients
            .service
            .query_registrations(GROUP, Some(1000))
            .collect_all()
            .await
            .expect("query registration records");
        let assigning = records
            .iter()
            .filter(|r| r.status == RegistrationStatus::Assigning)
            .count();
        if first {
            c.assigning_seen = assigning;
            first = false;
        }
        c.records = records.len();
        if assigning == 0 {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "{assigning} records still assigning 30 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut by_id: HashMap<String, &muster_proto::DeviceRegistrationState> = HashMap::new();
    for r in &records {
        if by_id
            .insert(r.registration_id.as_str().to_ascii_lowercase(), r)
            .is_some()
        {
            c.duplicates += 1;
        }
    }
    c.assigned = records
        .iter()
        .filter(|r| r.status == RegistrationStatus::Assigned)
        .count();
    // A device id is its registration id (group enrollment), so the test's universe covers
    // every hub device the storm could have written.
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for id in universe {
        let hub = clients.hub.clone();
        let id = id.clone();
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.ok();
            match hub.get_device(&id).await {
                Ok(_) => (id, true),
                Err(e) if e.is_not_found() => (id, false),
                Err(e) => panic!("reading hub device {id}: {e}"),
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (id, in_hub) = done.expect("hub read task");
        let record = by_id.get(&id.to_ascii_lowercase());
        let assigned_here = record.is_some_and(|r| {
            r.status == RegistrationStatus::Assigned
                && r.device_id
                    .as_deref()
                    .is_some_and(|d| d.eq_ignore_ascii_case(&id))
        });
        if in_hub && assigned_here {
            c.complete.insert(id.clone());
        }
        if in_hub {
            c.hub_devices += 1;
            if !assigned_here {
                c.orphans.push(id.clone());
            }
        } else if assigned_here {
            c.missing_devices.push(id.clone());
        }
    }
    c
}

fn check(stage: &str, census: &Census, acked: &HashSet<String>) {
    println!(
        "{stage}: {} records ({} assigned, {} were assigning at restart), {} hub devices, \
         {} acknowledged registrations checked, {} orphan hub devices, {} records without a hub \
         device, {} duplicates",
        census.records,
        census.assigned,
        census.assigning_seen,
        census.hub_devices,
        acked.len(),
        census.orphans.len(),
        census.missing_devices.len(),
        census.duplicates,
    );
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| census.missing_devices.contains(id))
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !census.complete.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{stage}: {} acknowledged registrations lack their record or hub device, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        census.orphans.is_empty(),
        "{stage}: {} orphan hub devices (no record), e.g. {:?}",
        census.orphans.len(),
        &census.orphans[..census.orphans.len().min(5)]
    );
    assert!(
        census.missing_devices.is_empty(),
        "{stage}: {} assigned records without their hub device ({} acknowledged), e.g. {:?}",
        census.missing_devices.len(),
        missing.len(),
        &census.missing_devices[..census.missing_devices.len().min(5)]
    );
    assert_eq!(census.duplicates, 0, "{stage}: duplicate records");
}

#[test]
fn kill_9_during_storms_and_cascade_leaves_no_orphans() {
    let seed = std::env::var("MUSTER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("crash test seed: {seed} (replay with MUSTER_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::new(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut info = server.start();
    let mut clients = Clients::new(&info);
    let group: EnrollmentGroup = serde_json::from_value(json!({
        "enrollmentGroupId": GROUP,
        "attestation": {"type": "symmetricKey"},
    }))
    .expect("group body");
    let group = rt
        .block_on(
            clients
                .service
                .create_or_update_enrollment_group(&group, None),
        )
        .expect("create the enrollment group");
    let key = group
        .attestation
        .symmetric_key
        .and_then(|k| k.primary_key)
        .expect("the group key");

    let mut universe: Vec<String> = Vec::new();
    let mut acked: HashSet<String> = HashSet::new();
    let mut kills = 0;
    for round in 0..ROUNDS {
        let ids: Vec<String> = (0..ROUND)
            .map(|i| format!("crash-{round}-{i:04}"))
            .collect();
        universe.extend(ids.iter().cloned());
        // Kill once a random number of this round's registrations were acknowledged.
        let kill_at = rng.between(ROUND / 10, ROUND * 6 / 10);
        let kill = Arc::new(Notify::new());
        let got = rt.block_on(async {
            let storm = storm(&clients, &key, &ids, Some((kill_at, kill.clone())));
            tokio::pin!(storm);
            tokio::select! {
                got = &mut storm => got,
                _ = kill.notified() => {
                    server.kill();
                    storm.await
                }
            }
        });
        kills += 1;
        println!(
            "round {round}: kill -9 after {kill_at} acknowledgements; {} of {ROUND} acknowledged",
            got.len()
        );
        acked.extend(got);
        info = server.start();
        clients = Clients::new(&info);
        let c = rt.block_on(census(&clients, &universe));
        check(&format!("after kill {kills}"), &c, &acked);
        // The devices that heard nothing register again, as real ones would.
        let again: Vec<String> = ids
            .iter()
            .filter(|id| !acked.contains(*id))
            .cloned()
            .collect();
        let got = rt.block_on(storm(&clients, &key, &again, None));
        assert_eq!(
            got.len(),
            again.len(),
            "round {round}: every retried registration is acknowledged"
        );
        acked.extend(got);
    }
    assert!(acked.len() >= 2_000, "{} acknowledged", acked.len());

    // Deprovisioning with cascade, killed at a random moment.
    let targets: Vec<String> = universe.iter().take(DEPROVISIONS).cloned().collect();
    let kill_at = rng.between(DEPROVISIONS / 10, DEPROVISIONS * 6 / 10);
    let kill = Arc::new(Notify::new());
    let done = rt.block_on(async {
        let gate = Arc::new(Semaphore::new(IN_FLIGHT));
        let count = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for id in &targets {
            let service = clients.service.clone();
            let (id, gate, count, kill) = (id.clone(), gate.clone(), count.clone(), kill.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.ok()?;
                service.deprovision(&id, None).await.ok()?;
                if count.fetch_add(1, Ordering::SeqCst) + 1 == kill_at {
                    kill.notify_one();
                }
                Some(id)
            });
        }
        let collect = async {
            let mut out = HashSet::new();
            while let Some(d) = tasks.join_next().await {
                if let Ok(Some(id)) = d {
                    out.insert(id);
                }
            }
            out
        };
        tokio::pin!(collect);
        tokio::select! {
            out = &mut collect => out,
            _ = kill.notified() => {
                server.kill();
                collect.await
            }
        }
    });
    kills += 1;
    println!(
        "cascade: kill -9 after {kill_at} acknowledgements; {} of {DEPROVISIONS} deprovisionings acknowledged",
        done.len()
    );
    info = server.start();
    clients = Clients::new(&info);
    let c = rt.block_on(census(&clients, &universe));
    // Deprovisionings the kill cut off may have finished or not: either way the orphan and
    // missing-device checks hold; only the untouched devices must all be complete.
    let targeted: HashSet<String> = targets.iter().cloned().collect();
    let remaining: HashSet<String> = acked.difference(&targeted).cloned().collect();
    check(&format!("after kill {kills} (cascade)"), &c, &remaining);
    let (records_left, devices_left) = rt.block_on(async {
        let mut records_left = 0;
        let mut devices_left = 0;
        for id in &done {
            if clients.service.get_registration(id).await.is_ok() {
                records_left += 1;
            }
            if clients.hub.get_device(id).await.is_ok() {
                devices_left += 1;
            }
        }
        (records_left, devices_left)
    });
    println!(
        "cascade: of {} acknowledged deprovisionings, {records_left} records and {devices_left} hub devices remain",
        done.len()
    );
    assert_eq!(
        (records_left, devices_left),
        (0, 0),
        "acknowledged deprovisionings leave nothing"
    );
    server.kill();
    println!(
        "crash test: {kills} kills, {} registrations acknowledged, {} deprovisionings acknowledged, {} server starts, {:.1} s",
        acked.len(),
        done.len(),
        server.starts,
        started.elapsed().as_secs_f64()
    );
}
