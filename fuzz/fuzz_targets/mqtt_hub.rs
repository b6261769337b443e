//! The built-in hub's device session (`muster_hub::device_mqtt::serve_connection`) over an
//! in-memory stream, against a hub with one SAS device on a SQLite store in a temporary
//! folder (made once per process). The first input byte chooses the opening: bit 0 set sends
//! that device's valid CONNECT, bit 1 adds SUBSCRIBEs to every device filter, so the fuzzer
//! reaches telemetry, twin and method handling; otherwise the input is the whole stream.
#![no_main]

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use muster_fuzz::{encode, feed};
use muster_hub::{DeviceEndpointLimits, DeviceInput, HubRegistry, IfMatch};
use muster_proto::runtime::{ManualClock, SeededEntropy};
use muster_proto::{SasToken, Timestamp};
use muster_store::{SqliteStore, Store};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;

const HOST: &str = "hub.fuzz";
const DEVICE: &str = "dev-1";
const NOW: i64 = 1_800_000_000;
const KEY1: &[u8] = b"device-key-one-device-key-one-00";
const KEY2: &[u8] = b"device-key-two-device-key-two-00";

struct Setup {
    rt: tokio::runtime::Runtime,
    hub: HubRegistry,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    // A running clock, unlike the other session target: the store's writer is a thread, and
    // while the session awaits it a paused clock would jump to the next timer (the token expiry,
    // the keep-alive) and close the session before the rest of the input is read.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    // tmpfs when there is one: every connect writes the device's connection state.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary folder");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("the store opens"));
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_unix_millis(NOW * 1000).expect("a valid time"),
    ));
    let limits = DeviceEndpointLimits {
        max_packet_size: 8 * 1024,
        ..DeviceEndpointLimits::default()
    };
    let hub = HubRegistry::with_limits(
        store,
        HOST.into(),
        Vec::new(),
        clock,
        Arc::new(SeededEntropy::new(1)),
        limits,
    );
    rt.block_on(hub.create_or_update_device(
        DeviceInput::sas(DEVICE, Some((B64.encode(KEY1), B64.encode(KEY2)))),
        &IfMatch::None,
    ))
    .expect("the device is created");
    Setup { rt, hub, _dir: dir }
}

fn opening(mode: u8) -> Vec<u8> {
    let mut packets = Vec::new();
    if mode & 1 != 0 {
        let mut connect = Connect::new(DEVICE);
        connect.keep_alive = 60;
        connect.login = Some(Login::new(
            format!("{HOST}/{DEVICE}/?api-version=2021-04-12"),
            SasToken::generate(&format!("{HOST}/devices/{DEVICE}"), KEY1, None, NOW + 3600),
        ));
        packets.push(Packet::Connect(connect));
        if mode & 2 != 0 {
            let filters = [
                format!("devices/{DEVICE}/messages/devicebound/#"),
                "$iothub/twin/res/#".to_string(),
                "$iothub/twin/PATCH/properties/desired/#".to_string(),
                "$iothub/methods/POST/#".to_string(),
            ];
            packets.push(Packet::Subscribe(Subscribe::new_many(
                filters
                    .into_iter()
                    .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce)),
            )));
        }
    }
    encode(&packets)
}

fuzz_target!(|data: &[u8]| {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    let s = SETUP.get_or_init(setup);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = opening(mode);
    input.extend_from_slice(rest);
    let hub = s.hub.clone();
    s.rt.block_on(feed(&input, |server| {
        muster_hub::device_mqtt::serve_connection(server, hub, Vec::new())
    }));
});
