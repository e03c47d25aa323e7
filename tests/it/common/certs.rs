//! Certificates made by the tests themselves (rcgen): a CA, server
//! certificates for `localhost` / 127.0.0.1, and client certificates with a
//! chosen SAN. Files go to a temp dir that lives as long as the value.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use tempfile::TempDir;

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A leaf certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA cert").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A server certificate for 127.0.0.1, `localhost` and `extra_dns`.
    pub fn server(&self, extra_dns: &[&str]) -> Leaf {
        let mut dns = vec!["localhost".to_owned()];
        dns.extend(extra_dns.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(dns).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose SAN is `san`: a URI when it has `://`,
    /// else a DNS name.
    pub fn client(&self, san: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let san = if san.contains("://") {
            SanType::URI(san.try_into().expect("URI SAN"))
        } else {
            SanType::DnsName(san.try_into().expect("DNS SAN"))
        };
        params.subject_alt_names.push(san);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Leaf {
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Server TLS files in a temp dir: `cert.pem`, `key.pem`, `ca.pem`.
pub struct TlsFiles {
    pub dir: TempDir,
}

impl TlsFiles {
    pub fn new(server: &Leaf, client_ca: Option<&Ca>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        files.install(server);
        if let Some(ca) = client_ca {
            std::fs::write(files.ca(), &ca.pem).expect("write CA");
        }
        files
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Replaces the certificate, then the key, each by an atomic rename, as
    /// a secret volume does: in between, the files disagree for a moment.
    pub fn install(&self, server: &Leaf) {
        replace(&self.cert(), &server.cert);
        replace(&self.key(), &server.key);
    }

    /// The `tls:` YAML for these files (`client_ca` only when written).
    pub fn yaml(&self, reload_interval: &str) -> String {
        let ca = if self.ca().exists() {
            format!(", client_ca: {}", self.ca().display())
        } else {
            String::new()
        };
        format!(
            "{{ cert: {}, key: {}{ca}, reload_interval: {reload_interval} }}",
            self.cert().display(),
            self.key().display()
        )
    }
}

fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
