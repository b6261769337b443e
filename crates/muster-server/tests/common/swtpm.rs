//! A real (software) TPM for device-side tests: `swtpm` started in a temporary directory on
//! loopback, driven with the `tpm2-tools` commands (Debian `swtpm`, `swtpm-tools`,
//! `tpm2-tools`; .ci/run installs them). It does what a TPM device SDK does
//! (device-protocol.md §7.2, §7.3): the EK at 0x81010001 and the SRK at 0x81000001 from the
//! standard templates, ActivateCredential + Import + Load of an activation blob, and
//! TPM2_HMAC with the imported key. The process is killed when the value is dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SwTpm {
    child: Child,
    dir: tempfile::TempDir,
    tcti: String,
}

/// Two free consecutive ports on `ip`: the swtpm TCTI takes the control port to be the
/// server port + 1.
fn free_ports(ip: Ipv4Addr) -> (u16, u16) {
    for _ in 0..100 {
        let a = TcpListener::bind((ip, 0)).unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind((ip, port + 1)).is_ok() {
            return (port, port + 1);
        }
    }
    panic!("no two consecutive free ports on {ip}");
}

/// Splits a blob into its TPM2B parts (u16 size ‖ bytes), each returned with its size.
fn tpm2b_parts(blob: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = blob;
    while rest.len() >= 2 {
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize + 2;
        assert!(rest.len() >= n, "truncated blob");
        parts.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    assert!(rest.is_empty(), "trailing bytes in blob");
    parts
}

impl SwTpm {
    /// Starts swtpm on `ip` and provisions the EK and SRK as the SDKs expect them.
    pub fn start(ip: Ipv4Addr) -> SwTpm {
        let dir = tempfile::tempdir().unwrap();
        let (port, ctrl) = free_ports(ip);
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr={ip}"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr={ip}"))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is not installed (Debian packages swtpm, swtpm-tools, tpm2-tools)");
        let tpm = SwTpm {
            child,
            dir,
            tcti: format!("swtpm:host={ip},port={port}"),
        };
        // Ready once it accepts connections on both sockets.
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in [port, ctrl] {
            while TcpStream::connect(SocketAddr::from((ip, p))).is_err() {
                assert!(Instant::now() < deadline, "swtpm did not start");
                std::thread::yield_now();
            }
        }
        tpm.run(&[
            "tpm2_createek",
            "-c",
            "0x81010001",
            "-G",
            "rsa",
            "-u",
            "ek.pub",
        ]);
        tpm.run(&[
            "tpm2_createprimary",
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "rsa2048:aes128cfb",
            "-a",
            "restricted|decrypt|fixedtpm|fixedparent|noda|userwithauth|sensitivedataorigin",
            "-c",
            "srk.ctx",
        ]);
        tpm.run(&[
            "tpm2_evictcontrol",
            "-C",
            "o",
            "-c",
            "srk.ctx",
            "0x81000001",
        ]);
        tpm.run(&["tpm2_flushcontext", "-t"]);
        tpm.run(&["tpm2_readpublic", "-c", "0x81010001", "-o", "ek.tpm2b"]);
        tpm.run(&["tpm2_readpublic", "-c", "0x81000001", "-o", "srk.tpm2b"]);
        tpm
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(self.dir.path())
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (is tpm2-tools installed?)", args[0]));
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The EK's `TPM2B_PUBLIC`, as the SDKs send it (base64 in JSON).
    pub fn endorsement_key(&self) -> Vec<u8> {
        std::fs::read(self.path("ek.tpm2b")).unwrap()
    }

    /// The SRK's `TPM2B_PUBLIC`.
    pub fn storage_root_key(&self) -> Vec<u8> {
        std::fs::read(self.path("srk.tpm2b")).unwrap()
    }

    /// ActivateCredential, Import and Load of an activation blob (§7.3); the key is kept as
    /// `name` for [`SwTpm::hmac`].
    pub fn import(&self, blob: &[u8], name: &str) {
        let parts = tpm2b_parts(blob);
        assert_eq!(parts.len(), 6, "an activation blob has six parts");
        // tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
        let mut cred = 0xBADC_C0DEu32.to_be_bytes().to_vec();
        cred.extend_from_slice(&1u32.to_be_bytes());
        cred.extend_from_slice(&parts[0]);
        cred.extend_from_slice(&parts[1]);
        let write = |f: &str, b: &[u8]| std::fs::write(self.path(f), b).unwrap();
        write("blob.cred", &cred);
        write("blob.dup", &parts[2]);
        write("blob.seed", &parts[3]);
        write(&format!("{name}.pub"), &parts[4]);
        self.run(&["tpm2_startauthsession", "--policy-session", "-S", "s.ctx"]);
        self.run(&["tpm2_policysecret", "-S", "s.ctx", "-c", "e"]);
        self.run(&[
            "tpm2_activatecredential",
            "-c",
            "0x81000001",
            "-C",
            "0x81010001",
            "-i",
            "blob.cred",
            "-o",
            "inner.key",
            "-P",
            "session:s.ctx",
        ]);
        self.run(&["tpm2_flushcontext", "s.ctx"]);
        self.run(&[
            "tpm2_import",
            "-C",
            "0x81000001",
            "-u",
            &format!("{name}.pub"),
            "-i",
            "blob.dup",
            "-s",
            "blob.seed",
            "-k",
            "inner.key",
            "-r",
            &format!("{name}.priv"),
        ]);
        self.run(&["tpm2_flushcontext", "-t"]);
    }

    /// HMAC-SHA256 of `data` inside the TPM with the key imported as `name`.
    pub fn hmac(&self, name: &str, data: &[u8]) -> Vec<u8> {
        std::fs::write(self.path("hmac.in"), data).unwrap();
        self.run(&[
            "tpm2_load",
            "-C",
            "0x81000001",
            "-u",
            &format!("{name}.pub"),
            "-r",
            &format!("{name}.priv"),
            "-c",
            &format!("{name}.ctx"),
        ]);
        self.run(&["tpm2_flushcontext", "-t"]);
        self.run(&[
            "tpm2_hmac",
            "-c",
            &format!("{name}.ctx"),
            "-g",
            "sha256",
            "-o",
            "hmac.out",
            "hmac.in",
        ]);
        self.run(&["tpm2_flushcontext", "-t"]);
        std::fs::read(self.path("hmac.out")).unwrap()
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
