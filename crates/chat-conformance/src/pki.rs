//! Certificates made at test time (rcgen): a CA, and a server certificate
//! for `localhost`, `127.0.0.1` and `::1` signed by it, written as PEM files
//! a server (in process or a child process) can load.

use std::path::{Path, PathBuf};

use chat_tls::{ClientTls, ServerTls};

/// A throwaway CA and server certificate in a temporary directory (removed
/// when this is dropped).
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

impl TestPki {
    /// A new CA with its own name, and a server certificate from it at
    /// [`TestPki::cert_path`] and [`TestPki::key_path`].
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_pem = issue(dir.path());
        Self { dir, ca_pem }
    }

    /// The server's certificate file.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The server's key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// The CA certificate file (for `chat --ca`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Replaces the files with a server certificate from a brand-new CA,
    /// as a renewal would (with a new CA, so a test can tell the two
    /// apart); [`TestPki::ca_pem`] becomes the new CA's.
    pub fn renew(&mut self) {
        self.ca_pem = issue(self.dir.path());
    }

    /// The server side, loaded from the files.
    pub fn server(&self) -> ServerTls {
        ServerTls::load(self.cert_path(), self.key_path()).expect("load the test certificate")
    }

    /// A client that trusts this CA only.
    pub fn client(&self) -> ClientTls {
        ClientTls::with_ca_pem(self.ca_pem.as_bytes()).expect("the test CA is valid PEM")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes a CA and a server certificate, writes `ca.pem`, `cert.pem` and
/// `key.pem` into `dir`, and returns the CA's PEM.
fn issue(dir: &Path) -> String {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // A name of its own: clients match issuers by name.
    let serial: u64 = rand::random();
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("chat test CA {serial:016x}"),
    );
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-signed CA");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .expect("server parameters");
    let cert = params
        .signed_by(&key, &ca)
        .expect("signed server certificate");
    // The key first: a server reloading between the two writes then finds
    // a mismatched pair and keeps its old one, rather than a half.
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write key.pem");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write cert.pem");
    ca.pem()
}
