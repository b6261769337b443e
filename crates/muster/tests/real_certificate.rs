//! The CLI against a server that presents a certificate given with `--tls-cert`:
//! `connection.json` names no local CA, so commands trust the system roots plus `--ca-cert`,
//! and a refused certificate's hint names the CA file that was tried.

use std::path::Path;
use std::process::{Command, Output};

use muster_server::{Config, Server};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

const BIN: &str = env!("CARGO_BIN_EXE_muster");

/// A self-signed CA written to `path`; returns it with its key.
fn ca(cn: &str, path: &Path) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(path, cert.pem()).unwrap();
    (cert, key)
}

fn muster(cwd: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("MUSTER_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c.output().unwrap()
}

#[test]
fn cli_trusts_the_issuer_it_is_given_and_names_the_file_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let (issuer, issuer_key) = ca("Example Issuing CA", &cwd.join("issuer.pem"));
    ca("Unrelated CA", &cwd.join("other.pem"));
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "dps.example");
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &issuer, &issuer_key).unwrap();
    std::fs::write(cwd.join("tls.pem"), leaf.pem()).unwrap();
    std::fs::write(cwd.join("tls.key"), key.serialize_pem()).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = cwd.join("data");
    let server = rt
        .block_on(Server::start(Config {
            data_dir: data.clone(),
            dps_host: "127.0.0.1".into(),
            https_port: 0,
            mqtt_port: 0,
            amqp_port: 0,
            tls_cert: Some(cwd.join("tls.pem")),
            tls_key: Some(cwd.join("tls.key")),
            ..Config::default()
        }))
        .unwrap();
    let data_dir = data.to_str().unwrap();
    let list = ["enrollment-group", "list", "--data-dir", data_dir];

    // No CA file: only the system roots, which don't know the issuer.
    let out = muster(cwd, &list);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not issued by a CA of the system roots") && err.contains("--ca-cert"),
        "{err}"
    );

    // The wrong CA file: the hint names it.
    let mut with_other = list.to_vec();
    with_other.extend(["--ca-cert", "other.pem"]);
    let out = muster(cwd, &with_other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the CA in other.pem"), "{err}");

    // The issuer: works.
    let mut with_issuer = list.to_vec();
    with_issuer.extend(["--ca-cert", "issuer.pem"]);
    let out = muster(cwd, &with_issuer);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(server.shutdown());
}
