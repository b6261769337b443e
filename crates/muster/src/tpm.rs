//! The TPM device side of the CLI: `muster tpm show-ek` (what an operator enrolls) and the
//! TPM half of `muster device register --tpm`. Needs the cargo feature `tpm` (libtss2);
//! without it both say how to get it.

use clap::{Args, Subcommand};

use crate::output::OutputArgs;

/// The TCTI used when none is given: the kernel's resource-managed TPM.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Which TPM to use.
#[derive(Args, Debug, Clone)]
pub struct TctiArgs {
    /// TSS TCTI of the TPM: device:/dev/tpmrm0, tabrmd, swtpm:host=127.0.0.1,port=2321, ...
    #[arg(long, env = "MUSTER_TPM_TCTI", default_value = DEFAULT_TCTI)]
    pub tcti: String,
}

#[derive(Subcommand, Debug)]
pub enum TpmCommand {
    /// Print the TPM's endorsement key (base64 TPM2B_PUBLIC, for `muster enrollment create
    /// --attestation-type tpm --endorsement-key`) and the registration id the Azure C and
    /// Node SDKs derive from it (lower-case base32 of its SHA-256, no padding).
    ///
    /// The EK is read from persistent handle 0x81010001, or created from the TCG default
    /// RSA-2048 template and persisted there; the SRK likewise at 0x81000001.
    ///
    /// Examples:
    ///   muster tpm show-ek
    ///   muster tpm show-ek --tcti swtpm:host=127.0.0.1,port=2321 -o json
    #[command(verbatim_doc_comment, name = "show-ek")]
    ShowEk {
        #[command(flatten)]
        tpm: TctiArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[cfg(feature = "tpm")]
pub fn run(c: TpmCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use base64::Engine as _;
    match c {
        TpmCommand::ShowEk { tpm, out } => {
            let mut tpm = muster_client::Tpm::open(&tpm.tcti)
                .with_context(|| format!("opening the TPM at '{}'", tpm.tcti))?;
            let ek = tpm.endorsement_key()?;
            let v = serde_json::json!({
                "registrationId": muster_attestation::tpm::registration_id(&ek),
                "endorsementKey": base64::engine::general_purpose::STANDARD.encode(&ek),
            });
            crate::output::print_object(&out, &v);
            Ok(())
        }
    }
}

#[cfg(not(feature = "tpm"))]
pub fn run(_: TpmCommand) -> anyhow::Result<()> {
    Err(not_built())
}

#[cfg(not(feature = "tpm"))]
fn not_built() -> anyhow::Error {
    anyhow::anyhow!(
        "this muster was built without TPM support: build it with `cargo build --release \
         --features tpm` (needs the libtss2-dev and pkg-config packages)"
    )
}

/// Registers the device whose EK is in the TPM at `tcti` over HTTPS; the registration id
/// defaults to the one derived from the EK. Returns it with the outcome.
#[cfg(feature = "tpm")]
pub async fn register(
    client: &muster_client::DeviceClient,
    registration_id: Option<String>,
    tcti: &str,
    options: &muster_client::RegisterOptions,
) -> anyhow::Result<(String, muster_client::Registration)> {
    use anyhow::Context as _;
    let mut tpm =
        muster_client::Tpm::open(tcti).with_context(|| format!("opening the TPM at '{tcti}'"))?;
    let rid = match registration_id {
        Some(r) => r,
        None => tpm.registration_id()?,
    };
    let r = client
        .register_tpm(&rid, &mut tpm, options)
        .await
        .with_context(|| format!("registering '{rid}'"))?;
    Ok((rid, r))
}

#[cfg(not(feature = "tpm"))]
pub async fn register(
    _: &muster_client::DeviceClient,
    _: Option<String>,
    _: &str,
    _: &muster_client::RegisterOptions,
) -> anyhow::Result<(String, muster_client::Registration)> {
    Err(not_built())
}
