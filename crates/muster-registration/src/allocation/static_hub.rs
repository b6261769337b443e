//! Static: the enrollment names exactly one hub. Like DPS, an enrollment with no hub list
//! still provisions when exactly one hub takes part in allocation.

use muster_proto::linked_hub::LinkedHub;
use muster_proto::ErrorCode;

use crate::DeviceFailure;

pub fn choose(candidates: &[LinkedHub]) -> Result<&LinkedHub, DeviceFailure> {
    match candidates {
        [one] => Ok(one),
        [] => Err(DeviceFailure::new(
            ErrorCode::NoHubAvailable,
            "static allocation found no hub",
        )),
        _ => Err(DeviceFailure::new(
            ErrorCode::NoHubAvailable,
            "static allocation needs the enrollment to name exactly one hub in iotHubs",
        )),
    }
}
