//! Test certificate authorities (rcgen): a CA, and server or client
//! certificates it signs, as PEM.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

pub use rcgen::ExtendedKeyUsagePurpose as Purpose;

pub struct Ca {
    pub cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// (certificate PEM, key PEM) for `names`, for a server or a client.
    pub fn issue(&self, names: &[&str], purpose: Purpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes a server chain (leaf, then this CA) and key for localhost
    /// into `dir`: (cert path, key path).
    pub fn server_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(&["localhost", "127.0.0.1"], Purpose::ServerAuth);
        let chain = format!("{cert}{}", self.pem());
        (write(dir, "cert.pem", &chain), write(dir, "key.pem", &key))
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
