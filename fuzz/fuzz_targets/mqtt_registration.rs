//! The DPS registration session (`muster_device_api::mqtt::serve_connection`) over an
//! in-memory stream. The first input byte chooses the opening: bit 0 set sends a valid
//! CONNECT (and bit 1 a SUBSCRIBE to the response filter) before the rest of the input, so
//! the fuzzer reaches the packet handling behind CONNECT; otherwise the input is the whole
//! stream, CONNECT included.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use muster_device_api::mqtt::{serve_connection, MqttLimits};
use muster_fuzz::{encode, feed, paused_runtime, stub_registrar};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Subscribe};
use rumqttc::mqttbytes::QoS;

const USERNAME: &str = "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=fuzz";

fn opening(mode: u8) -> Vec<u8> {
    let mut packets = Vec::new();
    if mode & 1 != 0 {
        let mut connect = Connect::new("dev-1");
        connect.keep_alive = 30;
        connect.login = Some(Login::new(
            USERNAME,
            "SharedAccessSignature sr=0ne00000A0A%2Fregistrations%2Fdev-1&sig=AAAA&se=1900000000",
        ));
        packets.push(Packet::Connect(connect));
        if mode & 2 != 0 {
            packets.push(Packet::Subscribe(Subscribe::new(
                "$dps/registrations/res/#",
                QoS::AtLeastOnce,
            )));
        }
    }
    encode(&packets)
}

fuzz_target!(|data: &[u8]| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(paused_runtime);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = opening(mode);
    input.extend_from_slice(rest);
    let limits = MqttLimits {
        max_packet_size: 8 * 1024,
        max_inflight: 4,
        ..MqttLimits::default()
    };
    rt.block_on(feed(&input, |server| {
        serve_connection(server, stub_registrar(), Vec::new(), limits)
    }));
});
