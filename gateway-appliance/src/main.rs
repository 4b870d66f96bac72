//! `dstack-gateway`: runs the SNI proxy (and the ACME certbot when enabled) from `gateway.toml`;
//! with `[core.rpc] enabled`, also the WireGuard data plane (boringtun, tun device `core.wg.interface`)
//! and `RegisterCvm` over RA-TLS; with `[core.admin] enabled`, health, status and metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use dstack_gateway::acme::{AcmeClient, AcmeSettings, Certbot, ChallTestSrv};
use dstack_gateway::admin::AdminState;
use dstack_gateway::attest::{RaTlsIdentity, ServerIdentity, build_verifier, rpc_router, server_config};
use dstack_gateway::config::GatewayConfig;
use dstack_gateway::dns::UdpDnsClient;
use dstack_gateway::proxy::tls::{TlsTerminator, protocol_versions};
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::registration::{AdmissionPolicy, Registrar};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::wg::{DeviceConfig, WgDevice, decode_key, public_key_b64};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(version, about = "dstack gateway: SNI proxy, ACME, CVM registration")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "gateway.toml")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// pebble-challtestsrv management address used as the DNS-01 provider (test deployments).
    #[arg(long)]
    challtestsrv: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let mut config = GatewayConfig::load(&args.config)?;
    let proxy_cfg = config.core.proxy.clone();
    let tls = Arc::new(TlsTerminator::new(protocol_versions(&proxy_cfg.tls_versions)?));
    if args.check {
        use std::io::Write;
        // A closed stdout (e.g. piped into `head`) is not an error worth a panic.
        let _ = writeln!(std::io::stdout(), "{config:#?}");
        return Ok(());
    }
    match tls.load_files(&proxy_cfg.cert_chain, &proxy_cfg.cert_key) {
        Ok(()) => info!("loaded certificate {}", proxy_cfg.cert_chain.display()),
        Err(e) => warn!("TLS termination disabled until a certificate exists: {e}"),
    }

    let certbot_cfg = config.core.certbot.clone();
    if certbot_cfg.enabled {
        let Some(mgmt) = args.challtestsrv else {
            anyhow::bail!("certbot enabled but no DNS-01 provider configured (only --challtestsrv is implemented)");
        };
        let settings = AcmeSettings {
            directory_url: certbot_cfg.acme_url.clone(),
            ca_file: certbot_cfg.acme_ca_file.clone(),
            contacts: certbot_cfg.contacts.clone(),
            credentials_path: certbot_cfg.work_dir.join("acme-account.json"),
            order_timeout: std::time::Duration::from_secs(300),
        };
        let client = AcmeClient::open(settings, Box::new(ChallTestSrv::new(mgmt)))
            .await
            .context("ACME account")?;
        let bot = Certbot {
            client,
            base_domain: proxy_cfg.base_domain.clone(),
            cert_path: proxy_cfg.cert_chain.clone(),
            key_path: proxy_cfg.cert_key.clone(),
            renew_before: certbot_cfg.renew_before_expiration,
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            bot.run(certbot_cfg.renew_interval, |chain, key| {
                if let Err(e) = tls.load_files(chain, key) {
                    warn!("reloading renewed certificate: {e}");
                }
            })
            .await;
        });
    }

    let table = RoutingTable::new();
    let (registrar, wg) = if config.core.rpc.enabled {
        let (r, w) = start_registration(&mut config, &table).await?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    if config.core.recycle.enabled {
        let (table, rc, registrar) = (table.clone(), config.core.recycle.clone(), registrar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(rc.interval).await;
                // With a data plane, handshakes refresh liveness and removed peers leave it.
                let gone = match &registrar {
                    Some(r) => r.recycle(SystemTime::now()).unwrap_or_else(|e| {
                        warn!("recycle: {e}");
                        Vec::new()
                    }),
                    None => table.recycle(SystemTime::now(), rc.timeout),
                };
                if !gone.is_empty() {
                    info!(count = gone.len(), "recycled stale instances");
                }
            }
        });
    }
    let resolver = UdpDnsClient::from_system(proxy_cfg.timeouts.dns_resolve).context("DNS resolver")?;
    let listen = std::net::SocketAddr::new(proxy_cfg.listen_addr, proxy_cfg.listen_port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    info!(%listen, base_domain = %proxy_cfg.base_domain, "proxy listening");
    let state = Arc::new(ProxyState {
        config: proxy_cfg,
        table,
        resolver: Arc::new(resolver),
        tls,
        stats: Stats::default(),
    });
    if config.core.admin.enabled {
        let addr = config.core.admin.address;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding admin {addr}"))?;
        info!(%addr, "admin listening (/health, /status, /metrics)");
        tokio::spawn(dstack_gateway::admin::serve(
            listener,
            AdminState {
                proxy: state.clone(),
                registrar,
                wg,
            },
        ));
    }
    dstack_gateway::proxy::run(listener, state, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

/// The WireGuard device and the `RegisterCvm` server over RA-TLS.
async fn start_registration(
    config: &mut GatewayConfig,
    table: &RoutingTable,
) -> anyhow::Result<(Arc<Registrar>, Arc<WgDevice>)> {
    let wgc = &mut config.core.wg;
    anyhow::ensure!(
        !wgc.private_key.is_empty(),
        "core.wg.private_key is required with core.rpc.enabled"
    );
    let key = decode_key(&wgc.private_key).context("core.wg.private_key")?;
    let public = public_key_b64(&key);
    if wgc.public_key.is_empty() {
        wgc.public_key = public;
    } else {
        anyhow::ensure!(
            wgc.public_key == public,
            "core.wg.public_key does not match core.wg.private_key"
        );
    }
    let dev = WgDevice::start(DeviceConfig {
        ifname: wgc.interface.clone(),
        private_key: key,
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], wgc.listen_port)),
        address: wgc.ip,
        mtu: 1420,
        routes: Vec::new(),
    })
    .await
    .context("WireGuard device")?;
    let wg = Arc::new(dev);
    info!(interface = %wgc.interface, port = wgc.listen_port, "WireGuard up");

    let verifier = build_verifier(&config.core.attestation)?;
    let allowed = &config.core.attestation.allowed_apps;
    let policy = AdmissionPolicy {
        allowed_apps: (!allowed.is_empty()).then(|| allowed.iter().map(|a| a.to_ascii_lowercase()).collect()),
    };
    let rpc = config.core.rpc.clone();
    let registrar = Arc::new(Registrar::new(
        Arc::new(config.clone()),
        table.clone(),
        Box::new(RaTlsIdentity::new(verifier)),
        wg.clone(),
        policy,
    ));
    let identity = match (&rpc.cert_chain, &rpc.cert_key) {
        (Some(c), Some(k)) => ServerIdentity::load(c, k)?,
        _ => {
            warn!("core.rpc: no cert_chain/cert_key; using a self-signed certificate");
            ServerIdentity::self_signed(&config.core.rpc_domain)?
        }
    };
    let tls = server_config(identity, Vec::new())?;
    let listener = tokio::net::TcpListener::bind(rpc.address)
        .await
        .with_context(|| format!("binding rpc {}", rpc.address))?;
    info!(address = %rpc.address, "RegisterCvm listening (RA-TLS)");
    let router = Arc::new(rpc_router(registrar.clone()));
    tokio::spawn(async move {
        if let Err(e) = dstack_rpc::serve_tls(listener, tls, router, std::future::pending()).await {
            warn!("rpc server stopped: {e}");
        }
    });
    Ok((registrar, wg))
}
