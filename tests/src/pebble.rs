//! A local ACME CA for the gateway: Debian's `pebble` and `pebble-challtestsrv` (DNS-01 answered by
//! challtestsrv's DNS server, fed through its management API). Everything listens on 127.0.0.1.
//!
//! Binaries: `DSTACK_PEBBLE` / `DSTACK_PEBBLE_CHALLTESTSRV`, else `/usr/bin/pebble` and
//! `/usr/bin/pebble-challtestsrv` (`apt-get install pebble`).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::stack::{StackError, free_port, wait_until};

fn failed(what: &str, e: impl std::fmt::Display) -> StackError {
    StackError::Failed {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// The pebble binaries, or a [`StackError::Missing`] naming the package.
pub fn binaries() -> Result<(PathBuf, PathBuf), StackError> {
    let find = |var: &str, name: &str| -> Result<PathBuf, StackError> {
        let p = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new("/usr/bin").join(name));
        if p.is_file() {
            Ok(p)
        } else {
            Err(StackError::Missing {
                what: format!("{} ({var})", p.display()),
                hint: "apt-get install pebble".into(),
            })
        }
    };
    Ok((
        find("DSTACK_PEBBLE", "pebble")?,
        find("DSTACK_PEBBLE_CHALLTESTSRV", "pebble-challtestsrv")?,
    ))
}

/// A running pebble; dropping it kills both processes.
pub struct Pebble {
    pub directory_url: String,
    /// The ACME listener's port (on 127.0.0.1; `10.0.2.2:<port>` from a CVM).
    pub acme_port: u16,
    /// pebble's management API (its issuing roots at `/roots/0`).
    pub management: SocketAddr,
    /// challtestsrv's management API (the DNS-01 provider).
    pub chall_mgmt: SocketAddr,
    /// The CA we made for pebble's own HTTPS listeners (ACME and management).
    pub listener_ca_pem: PathBuf,
    procs: Vec<Child>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// A port free for both UDP and TCP (challtestsrv's DNS listens on both).
fn free_dns_port() -> Result<u16, StackError> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| failed("DNS port", e))?;
        let port = udp.local_addr().map_err(|e| failed("DNS port", e))?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(failed("DNS port", "no port free for both UDP and TCP"))
}

impl Pebble {
    /// Starts challtestsrv and pebble under `dir` (logs there too).
    pub async fn start(dir: &Path) -> Result<Self, StackError> {
        let (pebble, chall) = binaries()?;
        std::fs::create_dir_all(dir).map_err(|e| failed("pebble directory", e))?;
        // Debian's package ships no certificate for pebble's HTTPS listeners: make a CA and a 127.0.0.1 leaf.
        let tls = |e: rcgen::Error| failed("pebble listener certificate", e);
        let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dstack-e2e pebble listener CA");
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_key = rcgen::KeyPair::generate().map_err(tls)?;
        // 10.0.2.2: the host as a CVM under user-mode networking sees it (the gateway CVM's ACME client).
        let names = ["127.0.0.1", "localhost", "10.0.2.2"].map(str::to_owned).to_vec();
        let srv_cert = rcgen::CertificateParams::new(names)
            .map_err(tls)?
            .signed_by(&srv_key, &issuer)
            .map_err(tls)?;
        let listener_ca_pem = dir.join("listener-ca.pem");
        let write = |p: PathBuf, s: String| std::fs::write(p, s).map_err(|e| failed("pebble files", e));
        write(listener_ca_pem.clone(), ca_cert.pem())?;
        write(dir.join("cert.pem"), srv_cert.pem())?;
        write(dir.join("key.pem"), srv_key.serialize_pem())?;

        let (acme_port, mgmt_port, chall_port, dns_port) = (free_port()?, free_port()?, free_port()?, free_dns_port()?);
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": 5002,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }});
        write(dir.join("pebble-config.json"), config.to_string())?;
        let log = |name: &str| -> Result<Stdio, StackError> {
            Ok(Stdio::from(
                std::fs::File::create(dir.join(name)).map_err(|e| failed("pebble log", e))?,
            ))
        };
        let mut me = Self {
            directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
            acme_port,
            management: SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
            chall_mgmt: SocketAddr::from(([127, 0, 0, 1], chall_port)),
            listener_ca_pem,
            procs: Vec::new(),
        };
        let chall_child = Command::new(&chall)
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv6", ""])
            .args(["-management", &format!("127.0.0.1:{chall_port}")])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .spawn()
            .map_err(|e| failed(&format!("starting {}", chall.display()), e))?;
        me.procs.push(chall_child);
        let pebble_child = Command::new(&pebble)
            .arg("-config")
            .arg(dir.join("pebble-config.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // No random validation delays, no bad-nonce injection: the demo waits on it.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?)
            .spawn()
            .map_err(|e| failed(&format!("starting {}", pebble.display()), e))?;
        me.procs.push(pebble_child);
        for (what, addr) in [
            ("pebble-challtestsrv", me.chall_mgmt),
            ("pebble", SocketAddr::from(([127, 0, 0, 1], acme_port))),
            ("pebble management", me.management),
        ] {
            wait_until(what, Duration::from_secs(20), || {
                std::net::TcpStream::connect(addr).map(drop).map_err(|e| e.to_string())
            })
            .await?;
        }
        Ok(me)
    }
}

impl Pebble {
    /// pebble's issuing root (PEM) from its management API: what clients of certificates it issued trust.
    pub async fn issuing_root(&self) -> Result<String, StackError> {
        let listener_ca = std::fs::read(&self.listener_ca_pem).map_err(|e| failed("pebble CA", e))?;
        let listener_ca = CertificateDer::from_pem_slice(&listener_ca).map_err(|e| failed("pebble CA", e))?;
        let (status, root) = crate::gateway::https_get(
            self.management,
            ServerName::IpAddress(self.management.ip().into()),
            &listener_ca,
            "/roots/0",
        )
        .await
        .map_err(|e| failed("pebble's root (management API)", e))?;
        if status != 200 {
            return Err(failed("pebble's root (management API)", format!("HTTP {status}")));
        }
        Ok(String::from_utf8_lossy(&root).into_owned())
    }
}
